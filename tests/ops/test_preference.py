"""Public preference ops against TRL 1.16's own loss code run on tensors, and their input checks.

TRL 1.16 keeps its DPO loss inside ``DPOTrainer._compute_loss`` (a method that runs the model), the CPO/SimPO loss
in ``CPOTrainer.cpo_loss`` and the Bradley-Terry loss in ``RewardTrainer.compute_loss``. The tests call these
methods unbound, with a stand-in ``self`` that holds just the attributes they read and a stand-in model that
returns fixed per-token log-probs: TRL's arithmetic runs unchanged on our tensors.
"""
import collections
import types
import zlib

import pytest
import torch

import fastalign as fa

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_reward = pytest.importorskip("trl.trainer.reward_trainer")


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def _trainer_self(**attrs):
    return types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_accelerator(), aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1, **attrs,
    )


def _batch(b=5, t=13, seed=0):
    """Per-token log-probs (2B, T - 1) of TRL's shifted layout and completion_mask (2B, T) whose first column is
    prompt, so completion_mask.sum(1) (TRL's IPO length) equals the shifted mask's token count."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2 * b, t, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(1, t // 2, (1,), generator=g))
        stop = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[i, start:stop] = 1
    logp = -torch.rand(2 * b, t - 1, generator=g, dtype=torch.float64) * 4 * mask[:, 1:]
    ref_c = torch.randn(b, generator=g, dtype=torch.float64) * 3 - 15
    ref_r = torch.randn(b, generator=g, dtype=torch.float64) * 3 - 15
    return logp, mask, ref_c, ref_r


def _trl_dpo(loss_type, beta, logp, mask, ref_c, ref_r, label_smoothing=0.0, loss_weights=None, discopop_tau=0.05):
    def model(**_):
        zeros = torch.zeros_like(logp)
        return types.SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = _trainer_self(
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=types.SimpleNamespace(discopop_tau=discopop_tau),
    )
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


# (TRL loss_type, label_smoothing, loss_weights, discopop_tau): every type of TRL 1.16's DPOTrainer, and combinations
TRL_CASES = [
    ("sigmoid", 0.0, None, None),
    ("sigmoid_norm", 0.0, None, None),
    ("hinge", 0.0, None, None),
    ("ipo", 0.0, None, None),
    ("robust", 0.0, None, None),
    ("robust", 0.2, None, None),
    ("exo_pair", 1e-3, None, None),
    ("exo_pair", 0.3, None, None),
    ("nca_pair", 0.0, None, None),
    ("bco_pair", 0.0, None, None),
    ("sppo_hard", 0.0, None, None),
    ("aot", 0.0, None, None),
    ("aot", 0.1, None, None),
    ("aot_unpaired", 0.15, None, None),
    ("apo_zero", 0.0, None, None),
    ("apo_down", 0.0, None, None),
    ("discopop", 0.0, None, None),
    ("discopop", 0.0, None, 0.4),
    ("sft", 0.0, None, None),
    (("sigmoid", "bco_pair", "sft"), 0.0, [0.8, 0.2, 1.0], None),  # MPO
    (("ipo", "sigmoid"), 0.0, None, None),  # ipo length-normalised, sigmoid not, in one loss
    (("robust", "exo_pair", "hinge", "aot"), 0.1, [1.0, 0.5, 2.0, 0.25], None),
    (("apo_down", "sigmoid_norm", "discopop", "sppo_hard"), 0.0, [0.3, -0.2, 1.5, 0.01], 0.1),
]


def _case_id(case):
    types_, eps, weights, tau = case
    name = "+".join(types_) if isinstance(types_, tuple) else types_
    return name + (f"-eps{eps}" if eps else "") + (f"-tau{tau}" if tau else "")


@pytest.mark.parametrize("case", TRL_CASES, ids=_case_id)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_matches_trl_dpo_trainer(case, beta):
    trl_type, eps, weights, tau = case
    logp, mask, ref_c, ref_r = _batch(seed=zlib.crc32(f"{_case_id(case)} {beta}".encode()))
    want, metrics = _trl_dpo(trl_type, beta, logp, mask, ref_c, ref_r, label_smoothing=eps, loss_weights=weights,
                             discopop_tau=tau or 0.05)
    seq = fa.sequence_logprobs(logp, mask[:, 1:])
    lengths = mask.sum(1)  # TRL's IPO / sigmoid_norm length, and the token count of sft
    b = ref_c.shape[0]
    loss_type = list(trl_type) if isinstance(trl_type, tuple) else trl_type
    uses_lengths = bool({"ipo", "sigmoid_norm", "sft"} & set(loss_type if isinstance(loss_type, list) else [loss_type]))
    loss, stats = fa.dpo_loss(
        seq[:b], seq[b:], ref_c, ref_r, beta=beta, loss_type=loss_type, loss_weights=weights, label_smoothing=eps,
        discopop_tau=tau, chosen_lengths=lengths[:b] if uses_lengths else None,
        rejected_lengths=lengths[b:] if uses_lengths else None,
    )
    # TRL computes exo_pair's log(eps) and log(1 - eps) from a float32 tensor: ~1e-7 of rounding in its value
    tol = dict(rel=1e-6, abs=1e-6) if "exo_pair" in trl_type else dict(rel=1e-12, abs=1e-12)
    assert loss.item() == pytest.approx(want.item(), **tol)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert stats[key].item() == pytest.approx(metrics[key], rel=1e-6, abs=1e-6), key


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_sigmoid_length_normalize_is_trl_sigmoid_norm(beta):
    logp, mask, ref_c, ref_r = _batch(seed=21)
    want, _ = _trl_dpo("sigmoid_norm", beta, logp, mask, ref_c, ref_r)
    seq, lengths, b = fa.sequence_logprobs(logp, mask[:, 1:]), mask.sum(1), ref_c.shape[0]
    loss, _ = fa.dpo_loss(seq[:b], seq[b:], ref_c, ref_r, beta=beta, chosen_lengths=lengths[:b],
                          rejected_lengths=lengths[b:], length_normalize=True)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


def test_dpo_gradient_matches_trl():
    # the gradient w.r.t. the per-token log-probs of a combination, through TRL's code and through ours
    logp, mask, ref_c, ref_r = _batch(seed=22)
    types_, weights = ["sigmoid", "bco_pair", "sft", "aot", "ipo"], [0.8, 0.2, 1.0, 0.5, 0.1]
    x = logp.clone().requires_grad_()
    want, _ = _trl_dpo(types_, 0.3, x, mask, ref_c, ref_r, loss_weights=weights)
    (g_trl,) = torch.autograd.grad(want, x)
    y = logp.clone().requires_grad_()
    seq, lengths, b = fa.sequence_logprobs(y, mask[:, 1:]), mask.sum(1), ref_c.shape[0]
    loss, _ = fa.dpo_loss(seq[:b], seq[b:], ref_c, ref_r, beta=0.3, loss_type=types_, loss_weights=weights,
                          chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    (g,) = torch.autograd.grad(loss, y)
    # TRL sums every column (a model's log-probs are 0 at ignored labels), so compare on the completion tokens
    on = mask[:, 1:] != 0
    torch.testing.assert_close(g[on], g_trl[on], rtol=1e-12, atol=1e-14)
    assert (g[~on] == 0).all()


def _trl_cpo(loss_type, beta, chosen, rejected, label_smoothing=0.0, simpo_gamma=0.5):
    trainer = types.SimpleNamespace(beta=beta, loss_type=loss_type, simpo_gamma=simpo_gamma,
                                    label_smoothing=label_smoothing, alpha=0.0, accelerator=_accelerator())
    losses, chosen_rewards, rejected_rewards = trl_cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    return losses.mean(), chosen_rewards, rejected_rewards


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_conservative_dpo_matches_trl_label_smoothed_sigmoid(eps):
    # TRL 1.16's DPOTrainer sigmoid dropped label smoothing; its cDPO formula lives on in CPOTrainer.cpo_loss, which
    # takes logits = a - b: feeding it the log-ratios (pi - ref) gives exactly cDPO
    logp, mask, ref_c, ref_r = _batch(seed=11)
    seq = fa.sequence_logprobs(logp, mask[:, 1:])
    b = ref_c.shape[0]
    want, _, _ = _trl_cpo("sigmoid", 0.3, seq[:b] - ref_c, seq[b:] - ref_r, label_smoothing=eps)
    loss, _ = fa.dpo_loss(seq[:b], seq[b:], ref_c, ref_r, beta=0.3, label_smoothing=eps)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("eps,gamma", [(0.0, 0.5), (0.1, 1.6)])
def test_simpo_matches_trl_cpo_trainer(eps, gamma):
    logp, mask, _, _ = _batch(seed=12)
    b = logp.shape[0] // 2
    # TRL's SimPO runs on average log-probs (average_log_prob=True for simpo)
    avg = fa.sequence_logprobs(logp, mask[:, 1:], average=True)
    want, want_c, want_r = _trl_cpo("simpo", 2.0, avg[:b], avg[b:], label_smoothing=eps, simpo_gamma=gamma)
    loss, stats = fa.dpo_loss(avg[:b], avg[b:], beta=2.0, loss_type="simpo", label_smoothing=eps, gamma=gamma)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert stats["rewards/chosen"].item() == pytest.approx(want_c.mean().item(), rel=1e-12)
    assert stats["rewards/rejected"].item() == pytest.approx(want_r.mean().item(), rel=1e-12)
    # the same from sums plus lengths
    seq = fa.sequence_logprobs(logp, mask[:, 1:])
    lengths = mask.sum(1)
    loss2, _ = fa.dpo_loss(seq[:b], seq[b:], beta=2.0, loss_type="simpo", label_smoothing=eps, gamma=gamma,
                           chosen_lengths=lengths[:b], rejected_lengths=lengths[b:])
    assert loss2.item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("margin,center", [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_matches_trl_reward_trainer(margin, center):
    g = torch.Generator().manual_seed(5)
    b = 9
    rewards = torch.randn(2 * b, 1, generator=g, dtype=torch.float64) * 2
    inputs = {"input_ids": torch.zeros(2 * b, 4, dtype=torch.long), "attention_mask": torch.ones(2 * b, 4)}
    margins = torch.rand(b, generator=g, dtype=torch.float64)
    if margin:
        inputs["margin"] = margins
    trainer = _trainer_self(args=types.SimpleNamespace(center_rewards_coefficient=center))
    want = trl_reward.RewardTrainer.compute_loss(trainer, lambda **_: types.SimpleNamespace(logits=rewards), inputs)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    # reward heads return (B, 1): accepted as is
    loss, stats = fa.reward_loss(rewards[:b], rewards[b:], margin=margins if margin else None,
                                 center_rewards_coef=center)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    assert stats["accuracy"].item() == pytest.approx(metrics["accuracy"], rel=1e-6)
    assert stats["margin"].item() == pytest.approx(metrics["margin"], rel=1e-6)


def test_stats_are_detached_and_loss_differentiable():
    logp, mask, ref_c, ref_r = _batch(seed=3)
    x = logp.clone().requires_grad_()
    seq = fa.sequence_logprobs(x, mask[:, 1:])
    b = ref_c.shape[0]
    loss, stats = fa.dpo_loss(seq[:b], seq[b:], ref_c, ref_r)
    assert all(not v.requires_grad for v in stats.values())
    loss.backward()
    # sum-reduced DPO: the gradient is the same for every response token of a sequence and 0 elsewhere
    for row in range(2 * b):
        g = x.grad[row][mask[row, 1:] != 0]
        torch.testing.assert_close(g, g[:1].expand_as(g))
        assert (x.grad[row][mask[row, 1:] == 0] == 0).all()


def _pairs(b=4):
    return [torch.randn(b, dtype=torch.float64) for _ in range(4)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta=0.0), "beta"),
        (dict(beta=-1.0), "beta"),
        (dict(loss_type="kto"), "loss_type"),
        (dict(loss_type="hinge", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
        (dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(gamma=0.5), "gamma"),
        (dict(loss_type=[]), "loss_type"),
        (dict(loss_type=["sigmoid", "kto"]), "'kto'"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="hinge", loss_weights=[float("nan")]), r"loss_weights\[0\]"),
        (dict(loss_type="exo_pair"), r"label_smoothing must lie in \(0, 1\) for loss_type='exo_pair'"),
        (dict(loss_type=["sigmoid", "robust"], label_smoothing=0.1), "TRL's 'sigmoid' ignores it"),
        (dict(loss_type=["hinge", "nca_pair"], label_smoothing=0.1), "label_smoothing is not defined"),
        (dict(discopop_tau=0.1), "discopop_tau only applies"),
        (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be > 0"),
        (dict(loss_type=["simpo", "sigmoid"]), "cannot be combined"),
        (dict(loss_type=["sft", "simpo"]), "reference-free"),
        (dict(loss_type="sigmoid_norm"), "needs chosen_lengths"),
        (dict(length_normalize=True), "needs chosen_lengths"),
    ],
)
def test_dpo_loss_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fa.dpo_loss(*_pairs(), **kwargs)


def test_dpo_loss_rejects_bad_shapes_and_references():
    c, r, rc, rr = _pairs()
    with pytest.raises(ValueError, match="rejected_logps"):
        fa.dpo_loss(c, r[:3], rc, rr)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        fa.dpo_loss(c, r, rc, rr[:3])
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps are required"):
        fa.dpo_loss(c, r)
    with pytest.raises(TypeError, match="ref_rejected_logps"):
        fa.dpo_loss(c, r, rc, None)
    with pytest.raises(ValueError, match="reference-free"):
        fa.dpo_loss(c, r, rc, rr, loss_type="simpo")
    with pytest.raises(ValueError, match="chosen_logps"):
        fa.dpo_loss(c[:, None], r[:, None], rc, rr)
    with pytest.raises(ValueError, match="chosen_lengths"):
        fa.dpo_loss(c, r, rc, rr, chosen_lengths=torch.tensor([1, 0, 2, 3]), rejected_lengths=torch.ones(4).long())
    with pytest.raises(ValueError, match="both"):
        fa.dpo_loss(c, r, rc, rr, chosen_lengths=torch.ones(4).long())
    ones = torch.ones(4).long()
    # lengths no listed type uses: an error, not a silently different loss (sigmoid_norm is its own type)
    with pytest.raises(ValueError, match="does not use them.*sigmoid_norm"):
        fa.dpo_loss(c, r, rc, rr, chosen_lengths=ones, rejected_lengths=ones)
    with pytest.raises(ValueError, match="length-normalised by definition"):
        fa.dpo_loss(c, r, rc, rr, loss_type="sigmoid_norm", chosen_lengths=ones, rejected_lengths=ones,
                    length_normalize=False)
    with pytest.raises(ValueError, match="needs chosen_lengths"):
        fa.dpo_loss(c, r, loss_type=["sft", "simpo"])
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps are required"):
        fa.dpo_loss(c, r, loss_type=["sft", "bco_pair"], chosen_lengths=ones, rejected_lengths=ones)


def test_reward_loss_and_sequence_logprobs_reject_bad_input():
    c = torch.randn(4)
    with pytest.raises(ValueError, match="rejected_rewards"):
        fa.reward_loss(c, torch.randn(5))
    with pytest.raises(ValueError, match="margin"):
        fa.reward_loss(c, c, margin=torch.ones(3))
    with pytest.raises(ValueError, match="center_rewards_coef"):
        fa.reward_loss(c, c, center_rewards_coef=-1.0)
    with pytest.raises(ValueError, match="mask"):
        fa.sequence_logprobs(torch.randn(2, 5), torch.ones(2, 4))
    with pytest.raises(TypeError, match="logprobs"):
        fa.sequence_logprobs(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 5))
