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


def _trl_dpo(loss_type, beta, logp, mask, ref_c, ref_r, label_smoothing=0.0):
    def model(**_):
        zeros = torch.zeros_like(logp)
        return types.SimpleNamespace(log_probs=logp, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    trainer = _trainer_self(
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type],
        loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing, use_weighting=False,
    )
    inputs = dict(input_ids=torch.zeros_like(mask), attention_mask=torch.ones_like(mask), completion_mask=mask,
                  ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    loss = trl_dpo.DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize(
    "trl_type,loss_type,normalise,eps",
    [
        ("sigmoid", "sigmoid", False, 0.0),
        ("hinge", "hinge", False, 0.0),
        ("ipo", "ipo", True, 0.0),  # TRL's IPO divides the log-ratios by the completion length
        ("robust", "robust", False, 0.0),
        ("robust", "robust", False, 0.2),
        ("sigmoid_norm", "sigmoid", True, 0.0),
    ],
)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_dpo_loss_matches_trl_dpo_trainer(trl_type, loss_type, normalise, eps, beta):
    logp, mask, ref_c, ref_r = _batch(seed=zlib.crc32(f"{trl_type} {eps} {beta}".encode()))
    want, metrics = _trl_dpo(trl_type, beta, logp, mask, ref_c, ref_r, label_smoothing=eps)
    seq = fa.sequence_logprobs(logp, mask[:, 1:])
    lengths = mask.sum(1) if normalise else None
    b = ref_c.shape[0]
    loss, stats = fa.dpo_loss(
        seq[:b], seq[b:], ref_c, ref_r, beta=beta, loss_type=loss_type, label_smoothing=eps,
        chosen_lengths=lengths[:b] if normalise else None, rejected_lengths=lengths[b:] if normalise else None,
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-12)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected"):
        assert stats[key].item() == pytest.approx(metrics[key], rel=1e-6, abs=1e-6), key


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
