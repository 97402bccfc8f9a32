"""Fused losses from hidden states (linear_dpo_loss, linear_policy_loss, linear_sequence_logprobs).

Each fused op is checked against (1) the unfused path on the same backend and dtype: ``linear_logprobs``, then
the loss on its token log-probs from :mod:`fastalign.reference.linear_losses` (``sequence_logprobs`` + ``dpo_loss``;
``ppo_policy_loss`` + ``kl_penalty``): same loss, same gradients, same stats; and (2) a float64 ground truth under
the three-way rule, against plain PyTorch in the test dtype. On CPU the Triton kernels run in the interpreter;
shapes are small but odd, with logit std ~3.
"""
import math

import pytest
import torch

import fastalign as fa
from fastalign.reference import linear_losses as ref_ll
from fastalign.reference import rl as ref_rl
from fastalign.reference.logprobs import linear_logprobs_naive
from helpers.accuracy import assert_close_3way

IGNORE = -100
TOL = {  # fused vs unfused on the same kernels: only the per-token gradient's rounding may differ
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4),
}


def make_batch(rows, t, d, v, dtype, device, *, seed, bias=False, logit_std=3.0):
    """Hidden (rows, T, D), weight (V, D) at a realistic logit scale, labels sampled from the model itself (so
    log-probs and ratios look like a policy's), a prompt prefix and right padding ignored (~30% of positions)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * logit_std / math.sqrt(d)
    b = torch.randn(v, generator=g) if bias else None
    logits = hidden.double() @ weight.double().T + (b.double() if bias else 0)
    labels = torch.multinomial(torch.softmax(logits.view(-1, v), -1), 1, generator=g).view(rows, t)
    for i in range(rows):
        start = int(torch.randint(1, max(2, t // 3), (1,), generator=g))
        stop = int(torch.randint(start + 2, t + 1, (1,), generator=g))
        labels[i, :start] = IGNORE
        labels[i, stop:] = IGNORE
    cast = lambda x: x.to(device=device, dtype=dtype) if x is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def leaves(*tensors):
    return [x.detach().clone().requires_grad_() if x is not None else None for x in tensors]


def grads_of(loss, tensors):
    present = [x for x in tensors if x is not None]
    got = iter(torch.autograd.grad(loss, present))
    return [next(got) if x is not None else None for x in tensors]


def truth_logprobs(hidden, weight, bias, labels, **kw):
    """float64 log-probs (and entropy) of the test-dtype inputs, differentiable."""
    up = lambda x: x.double() if x is not None else None  # noqa: E731
    return linear_logprobs_naive(up(hidden), up(weight), labels, bias=up(bias), **kw)


def plain_logprobs(hidden, weight, bias, labels, return_entropy=False):
    """What a user would write in the test dtype: logits in that dtype, log-softmax in fp32."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    out = fa.logprobs_from_logits(logits, labels, return_entropy=return_entropy)
    return out.logprobs, out.entropy


def check_three_way(fast, plain, truth, dtype, name):
    if dtype == torch.float64:
        # fp32-level, not ~1e-12: head_backward takes per-token upstream gradients in fp32 even for fp64 heads
        atol = 1e-6 * truth.abs().max().item() + 1e-12
        torch.testing.assert_close(fast.double(), truth.double(), rtol=1e-6, atol=atol, msg=lambda m: f"{name}: {m}")
        return
    assert_close_3way(fast, plain, truth, dtype, name=name)


def check_same(a, b, dtype, name):
    torch.testing.assert_close(a.double(), b.double(), msg=lambda m: f"{name}: {m}", **TOL[dtype])


# ------------------------------------------------------------------------------------------------------------ DPO

DPO_TYPES = {
    "sigmoid": dict(loss_type="sigmoid", beta=0.1),
    "cdpo": dict(loss_type="sigmoid", beta=0.1, label_smoothing=0.15),
    "sigmoid_norm": dict(loss_type="sigmoid", beta=0.5, length_normalize=True),
    "robust": dict(loss_type="robust", beta=0.2, label_smoothing=0.1),
    "hinge": dict(loss_type="hinge", beta=0.05),
    "ipo": dict(loss_type="ipo", beta=0.3),
    "simpo": dict(loss_type="simpo", beta=2.0, gamma=0.8, label_smoothing=0.05),
    "sigmoid_norm_type": dict(loss_type="sigmoid_norm", beta=0.4),
    "exo_pair": dict(loss_type="exo_pair", beta=0.1, label_smoothing=1e-3),
    "nca_pair": dict(loss_type="nca_pair", beta=0.1),
    "bco_pair": dict(loss_type="bco_pair", beta=0.2),
    "sppo_hard": dict(loss_type="sppo_hard", beta=0.5),
    "aot": dict(loss_type="aot", beta=0.1, label_smoothing=0.1),
    "aot_unpaired": dict(loss_type="aot_unpaired", beta=0.3),
    "apo_zero": dict(loss_type="apo_zero", beta=0.1),
    "apo_down": dict(loss_type="apo_down", beta=0.1),
    "discopop": dict(loss_type="discopop", beta=0.05, discopop_tau=0.3),
    "sft": dict(loss_type="sft", beta=0.1),  # reference-free: the NLL per chosen token
    "mpo": dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], beta=0.1),
    "mix": dict(loss_type=["ipo", "aot", "apo_down", "hinge"], loss_weights=[0.1, 1.0, -0.5, 2.0], beta=0.2),
}


def _reference_free(kw):
    types = [kw["loss_type"]] if isinstance(kw["loss_type"], str) else kw["loss_type"]
    return all(t in ("simpo", "sft") for t in types)


def dpo_refs(rows, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows // 2, generator=g) * 4 - 25).to(device) for _ in range(2)]


def composed_dpo(logp, labels, refs, kw):
    """sequence_logprobs + dpo_loss on per-token log-probs (the unfused path)."""
    refs = (None, None) if _reference_free(kw) else refs
    return ref_ll.dpo_loss_from_logprobs(logp, labels != IGNORE, *refs, **kw)


def run_dpo_case(name, backend, dtype, device, *, seed, bias=False, shape=(6, 11, 48, 317)):
    kw = DPO_TYPES[name]
    hidden, weight, b, labels = make_batch(*shape, dtype, device, seed=seed, bias=bias)
    refs = dpo_refs(shape[0], device, seed)
    fused_refs = (None, None) if _reference_free(kw) else refs

    h, w, bb = leaves(hidden, weight, b)
    loss, stats = fa.linear_dpo_loss(h, w, labels, *fused_refs, bias=bb, backend=backend, **kw)
    fused = grads_of(loss, (h, w, bb))

    h, w, bb = leaves(hidden, weight, b)
    logp = fa.linear_logprobs(h, w, labels, bias=bb, backend=backend).logprobs
    loss_u, stats_u = composed_dpo(logp, labels, refs, kw)
    unfused = grads_of(loss_u, (h, w, bb))

    check_same(loss, loss_u, dtype, f"{name} loss vs unfused")
    for key in stats_u:
        check_same(stats[key], stats_u[key], dtype, f"{name} stat {key}")
    for which, a, c in zip(("dh", "dw", "db"), fused, unfused):
        if a is not None:
            assert a.dtype == dtype and torch.isfinite(a).all()
            check_same(a, c, dtype, f"{name} {which} vs unfused")

    h, w, bb = leaves(hidden, weight, b)
    loss_p, _ = composed_dpo(plain_logprobs(h, w, bb, labels)[0], labels, refs, kw)
    plain = grads_of(loss_p, (h, w, bb))
    h64, w64, b64 = leaves(*(x.double() if x is not None else None for x in (hidden, weight, b)))
    loss_t, _ = composed_dpo(truth_logprobs(h64, w64, b64, labels)[0], labels, [r.double() for r in refs], kw)
    truth = grads_of(loss_t, (h64, w64, b64))
    check_three_way(loss.reshape(1), loss_p.reshape(1), loss_t.reshape(1), dtype, f"{name} loss vs truth")
    for which, a, p, t in zip(("dh", "dw", "db"), fused, plain, truth):
        if a is not None:
            check_three_way(a, p, t, dtype, f"{name} {which} vs truth")
    return loss


@pytest.mark.parametrize("name", list(DPO_TYPES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_dpo_torch_backend(name, dtype, device):
    run_dpo_case(name, "torch", dtype, device, seed=10 + list(DPO_TYPES).index(name), bias=name == "ipo")


@pytest.mark.parametrize("name", list(DPO_TYPES))
def test_dpo_triton_fp32(name, device):
    run_dpo_case(name, "triton", torch.float32, device, seed=20 + list(DPO_TYPES).index(name), bias=name == "cdpo")


@pytest.mark.parametrize("name", ["sigmoid", "ipo", "simpo"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dpo_triton_half(name, dtype, device):
    run_dpo_case(name, "triton", dtype, device, seed=30 + list(DPO_TYPES).index(name), bias=name == "ipo")


def test_dpo_gradient_is_constant_per_sequence(device):
    # sum-reduced DPO: dL/dlogp_n = dL/dS_b for every response token n of sequence b; checked through the head:
    # the fused dh equals the head backward fed with that per-token constant
    hidden, weight, _, labels = make_batch(4, 9, 24, 131, torch.float64, device, seed=3)
    refs = dpo_refs(4, device, 3)
    h = hidden.clone().requires_grad_()
    loss, _ = fa.linear_dpo_loss(h, weight, labels, *refs, beta=0.4, backend="torch")
    loss.backward()
    s = fa.linear_sequence_logprobs(hidden, weight, labels, backend="torch").requires_grad_()
    dlds = torch.autograd.grad(fa.dpo_loss(s[:2], s[2:], *refs, beta=0.4)[0], s)[0]
    per_token = torch.where(labels != IGNORE, dlds[:, None], 0.0)
    h2 = hidden.clone().requires_grad_()
    (fa.linear_logprobs(h2, weight, labels, backend="torch").logprobs * per_token).sum().backward()
    torch.testing.assert_close(h.grad, h2.grad, rtol=1e-7, atol=1e-10)


def test_dpo_reference_logps_can_carry_gradients(device):
    hidden, weight, _, labels = make_batch(6, 7, 16, 97, torch.float64, device, seed=4)
    refs = [r.double().requires_grad_() for r in dpo_refs(6, device, 4)]
    loss, _ = fa.linear_dpo_loss(hidden, weight, labels, *refs, backend="torch")
    got = torch.autograd.grad(loss, refs)
    refs2 = [r.detach().clone().requires_grad_() for r in refs]
    logp = fa.linear_logprobs(hidden, weight, labels, backend="torch").logprobs
    want = torch.autograd.grad(composed_dpo(logp, labels, refs2, DPO_TYPES["sigmoid"])[0], refs2)
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c)


def test_dpo_temperature_softcap_and_no_grad(device):
    hidden, weight, b, labels = make_batch(4, 10, 20, 151, torch.float64, device, seed=5, bias=True)
    refs = dpo_refs(4, device, 5)
    kw = dict(temperature=0.7, softcap=6.0)
    loss, stats = fa.linear_dpo_loss(hidden, weight, labels, *refs, bias=b, backend="torch", **kw)
    want, want_stats = ref_ll.linear_dpo_loss(hidden, weight, labels, *refs, bias=b, **DPO_TYPES["sigmoid"], **kw)
    torch.testing.assert_close(loss, want)
    with torch.no_grad():
        h = hidden.clone().requires_grad_()
        loss_ng, stats_ng = fa.linear_dpo_loss(h, weight, labels, *refs, bias=b, backend="torch", **kw)
    assert loss_ng.grad_fn is None
    torch.testing.assert_close(loss_ng, loss)
    assert all(torch.equal(stats[k], stats_ng[k]) for k in stats)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dpo_non_contiguous_inputs(backend, device):
    hidden, weight, _, labels = make_batch(4, 9, 48, 203, torch.float32, device, seed=6)
    refs = dpo_refs(4, device, 6)
    wide = torch.zeros(4, 9, 96, device=device)
    wide[..., ::2] = hidden
    h_nc = wide[..., ::2]  # a strided view
    lab_nc = torch.stack([labels, labels], -1)[..., 0]
    assert not h_nc.is_contiguous() and not lab_nc.is_contiguous()
    w_nc = weight.T.contiguous().T  # column-major weight
    h1, w1 = leaves(hidden, weight)
    loss1, _ = fa.linear_dpo_loss(h1, w1, labels, *refs, backend=backend)
    g1 = grads_of(loss1, (h1, w1))
    h2 = h_nc.requires_grad_()
    w2 = w_nc.requires_grad_()
    loss2, _ = fa.linear_dpo_loss(h2, w2, lab_nc, *refs, backend=backend)
    g2 = grads_of(loss2, (h2, w2))
    check_same(loss1, loss2, torch.float32, "loss")
    for a, c in zip(g1, g2):
        check_same(a, c, torch.float32, "grad")


# ---------------------------------------------------------------------------------------------------- policy loss

POLICY_CASES = {
    "ppo": dict(agg="token-mean"),
    "grpo": dict(agg="seq-mean-token-mean", kl_coef=0.05, kl_kind="k3", clip_high=0.28, seq_adv=True),
    "dual-clip-entropy": dict(agg="seq-mean-token-sum", dual_clip=3.0, entropy_coef=0.01, kl_coef=0.1,
                              kl_kind="k2"),
    "dr-grpo-mask": dict(agg="seq-mean-token-sum-norm", norm_len=16, kl_coef=0.02, kl_kind="k1",
                         entropy_coef=0.02, seq_adv=True, explicit_mask=True),
}


def policy_inputs(labels, truth_logp, seed, *, seq_adv=False, explicit_mask=False, with_ref=True):
    g = torch.Generator().manual_seed(seed)
    device = labels.device
    noise = lambda s: (torch.randn(labels.shape, generator=g, dtype=torch.float64) * s).to(device)  # noqa: E731
    base = truth_logp.detach()
    old = (base + noise(0.25)).float()  # ratios exp(+-0.25): a fair share of tokens clipped at 0.2
    ref = (base + noise(0.4)).float() if with_ref else None
    adv = torch.randn(labels.shape[0] if seq_adv else labels.shape, generator=g).to(device)
    mask = None
    if explicit_mask:  # drop a few more response tokens than the labels do
        mask = (labels != IGNORE) & (torch.rand(labels.shape, generator=g) < 0.8).to(device)
    return old, adv, mask, ref


def composed_policy(logp, entropy, labels, old, adv, mask, ref, cfg):
    """ppo_policy_loss + kl_coef * KL - entropy_coef * entropy on per-token log-probs (the unfused path)."""
    valid = (labels != IGNORE) if mask is None else (mask != 0)
    return ref_ll.policy_loss_from_logprobs(logp, entropy, valid, old, adv, ref, **fused_kwargs(cfg))


def fused_kwargs(cfg):
    return {k: v for k, v in cfg.items() if k not in ("seq_adv", "explicit_mask")}


def run_policy_case(name, backend, dtype, device, *, seed, shape=(5, 12, 48, 293)):
    cfg = POLICY_CASES[name]
    need_entropy = bool(cfg.get("entropy_coef"))
    hidden, weight, _, labels = make_batch(*shape, dtype, device, seed=seed)
    truth_lp, _ = truth_logprobs(hidden, weight, None, labels)
    old, adv, mask, ref = policy_inputs(labels, truth_lp, seed, seq_adv=cfg.get("seq_adv", False),
                                        explicit_mask=cfg.get("explicit_mask", False))

    h, w = leaves(hidden, weight)
    loss, stats = fa.linear_policy_loss(h, w, labels, old, adv, mask, ref_logprobs=ref, backend=backend,
                                        **fused_kwargs(cfg))
    fused = grads_of(loss, (h, w))

    h, w = leaves(hidden, weight)
    out = fa.linear_logprobs(h, w, labels, return_entropy=need_entropy, backend=backend)
    loss_u, stats_u = composed_policy(out.logprobs, out.entropy, labels, old, adv, mask, ref, cfg)
    unfused = grads_of(loss_u, (h, w))
    check_same(loss, loss_u, dtype, f"{name} loss vs unfused")
    for key in ref_rl.POLICY_STATS:
        check_same(stats[key], stats_u[key], dtype, f"{name} stat {key}")
    for which, a, c in zip(("dh", "dw"), fused, unfused):
        assert a.dtype == dtype and torch.isfinite(a).all()
        check_same(a, c, dtype, f"{name} {which} vs unfused")
    if ref is not None:
        assert "kl" in stats
    assert ("entropy" in stats) == need_entropy

    h, w = leaves(hidden, weight)
    loss_p, _ = composed_policy(*plain_logprobs(h, w, None, labels, need_entropy), labels, old, adv, mask, ref, cfg)
    plain = grads_of(loss_p, (h, w))
    h64, w64 = leaves(hidden.double(), weight.double())
    loss_t, _ = composed_policy(*truth_logprobs(h64, w64, None, labels, return_entropy=need_entropy), labels,
                                old.double(), adv.double(), mask, ref.double() if ref is not None else None, cfg)
    truth = grads_of(loss_t, (h64, w64))
    check_three_way(loss.reshape(1), loss_p.reshape(1), loss_t.reshape(1), dtype, f"{name} loss vs truth")
    for which, a, p, t in zip(("dh", "dw"), fused, plain, truth):
        check_three_way(a, p, t, dtype, f"{name} {which} vs truth")


@pytest.mark.parametrize("name", list(POLICY_CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_policy_torch_backend(name, dtype, device):
    run_policy_case(name, "torch", dtype, device, seed=40 + list(POLICY_CASES).index(name))


@pytest.mark.parametrize("name", list(POLICY_CASES))
def test_policy_triton_fp32(name, device):
    run_policy_case(name, "triton", torch.float32, device, seed=50 + list(POLICY_CASES).index(name))


@pytest.mark.parametrize("name", ["grpo", "dual-clip-entropy"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_policy_triton_half(name, dtype, device):
    run_policy_case(name, "triton", dtype, device, seed=60 + list(POLICY_CASES).index(name))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_policy_matches_grpo_formula_written_out(agg, device):
    # TRL GRPOTrainer's loss, written out independently of fastalign.reference.rl (fp64, grpo = seq-mean-token-mean,
    # bnpo = token-mean): per_token = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * k3 - entropy_coef * H
    hidden, weight, _, labels = make_batch(4, 10, 24, 157, torch.float64, device, seed=7)
    logp, entropy = truth_logprobs(hidden, weight, None, labels, return_entropy=True)
    old, adv, _, ref = policy_inputs(labels, logp, 7, seq_adv=True)
    old, ref = old.double(), ref.double()
    m = (labels != IGNORE).double()
    r = torch.exp(logp - old)
    a = adv.double()[:, None]
    per_token = -torch.min(r * a, torch.clamp(r, 0.8, 1.2) * a)
    per_token = per_token + 0.04 * (torch.exp(ref - logp) - (ref - logp) - 1) - 0.01 * entropy
    if agg == "token-mean":
        want = (per_token * m).sum() / m.sum()
    else:
        want = ((per_token * m).sum(-1) / m.sum(-1)).mean()
    loss, stats = fa.linear_policy_loss(hidden, weight, labels, old, adv, ref_logprobs=ref, kl_coef=0.04,
                                        entropy_coef=0.01, agg=agg, backend="torch")
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["entropy"], (entropy * m).sum() / m.sum())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_on_policy_without_old_logprobs(backend, device):
    # old_logprobs=None: the ratio is exactly 1 (no clipping) and the loss equals passing the detached log-probs
    hidden, weight, _, labels = make_batch(4, 9, 32, 127, torch.float32, device, seed=15)
    adv = torch.randn(4, generator=torch.Generator().manual_seed(15)).to(device)
    h, w = leaves(hidden, weight)
    loss, stats = fa.linear_policy_loss(h, w, labels, None, adv, agg="seq-mean-token-mean", backend=backend)
    got = grads_of(loss, (h, w))
    h, w = leaves(hidden, weight)
    logp = fa.linear_logprobs(h, w, labels, backend=backend).logprobs
    want, _ = fa.ppo_policy_loss(logp, logp.detach(), adv, labels != IGNORE, agg="seq-mean-token-mean",
                                 backend="torch")
    check_same(loss, want, torch.float32, "loss")
    for a, c in zip(got, grads_of(want, (h, w))):
        check_same(a, c, torch.float32, "grad")
    assert stats["ratio_min"].item() == 1.0 == stats["ratio_max"].item() and stats["clip_frac"].item() == 0.0


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_policy_garbage_at_masked_positions_does_not_leak(backend, device):
    hidden, weight, _, labels = make_batch(3, 10, 32, 111, torch.float32, device, seed=8)
    truth_lp, _ = truth_logprobs(hidden, weight, None, labels)
    old, adv, mask, ref = policy_inputs(labels, truth_lp, 8, explicit_mask=True)
    outside = ~mask
    dirty = [x.masked_fill(outside, v) for x, v in ((old, float("nan")), (adv, float("inf")), (ref, 200.0))]
    kw = dict(kl_coef=0.1, entropy_coef=0.01, backend=backend)
    res = []
    for o, a, r in ((old, adv, ref), dirty):
        h, w = leaves(hidden, weight)
        loss, stats = fa.linear_policy_loss(h, w, labels, o, a, mask, ref_logprobs=r, **kw)
        res.append((loss, *grads_of(loss, (h, w)), stats["kl"]))
    for clean, got in zip(*res):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, clean)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_masked_is_zero_loss_and_zero_grads(backend, device):
    hidden, weight, _, labels = make_batch(4, 8, 32, 101, torch.float32, device, seed=9)
    labels = torch.full_like(labels, IGNORE)
    zeros = torch.zeros(labels.shape, device=device)
    h, w = leaves(hidden, weight)
    loss, stats = fa.linear_policy_loss(h, w, labels, zeros, zeros + 1.0, ref_logprobs=zeros, kl_coef=0.1,
                                        entropy_coef=0.01, agg="seq-mean-token-mean", backend=backend)
    dh, dw = grads_of(loss, (h, w))
    assert loss.item() == 0.0 and all(torch.isfinite(v).all() for v in stats.values())
    assert (dh == 0).all() and (dw == 0).all()
    h, w = leaves(hidden, weight)
    seq = fa.linear_sequence_logprobs(h, w, labels, average=True, backend=backend)
    assert (seq == 0).all()
    dh, dw = grads_of((seq * torch.arange(1.0, 5.0, device=device)).sum(), (h, w))
    assert (dh == 0).all() and (dw == 0).all()


# ------------------------------------------------------------------------------------------- sequence log-probs

@pytest.mark.parametrize(
    "backend,dtype", [("torch", torch.float64), ("torch", torch.float32), ("triton", torch.float32),
                      ("triton", torch.float16), ("triton", torch.bfloat16)], ids=str,
)
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_matches_unfused(backend, dtype, average, device):
    hidden, weight, b, labels = make_batch(5, 11, 48, 263, dtype, device, seed=11 + average, bias=True)
    upstream = torch.randn(5, generator=torch.Generator().manual_seed(1)).to(device)  # not all ones
    h, w, bb = leaves(hidden, weight, b)
    seq = fa.linear_sequence_logprobs(h, w, labels, bias=bb, average=average, backend=backend)
    fused = grads_of((seq * upstream).sum(), (h, w, bb))
    h, w, bb = leaves(hidden, weight, b)
    logp = fa.linear_logprobs(h, w, labels, bias=bb, backend=backend).logprobs
    seq_u = fa.sequence_logprobs(logp, labels != IGNORE, average=average)
    unfused = grads_of((seq_u * upstream).sum(), (h, w, bb))
    assert seq.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    check_same(seq, seq_u, dtype, "sequence log-probs")
    for a, c in zip(fused, unfused):
        check_same(a, c, dtype, "grad")


# ------------------------------------------------------------------------------------------ mini-model training

def train_curve(objective, fused, backend, steps, device, *, seed=16, rows=6, t=10, d=32, v=211):
    """Adam on a tiny model (embedding -> tanh(linear) -> LM head) with a fixed batch; returns the loss curve."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(v, d, generator=g) * 0.5, torch.randn(d, d, generator=g) / math.sqrt(d),
              torch.randn(v, d, generator=g) * 3 / math.sqrt(d)]
    emb, proj, head = [p.to(device).requires_grad_() for p in params]
    ids = torch.randint(0, v, (rows, t), generator=g).to(device)
    labels = ids.roll(-1, 1)
    labels[:, :3] = IGNORE
    labels[:, -1] = IGNORE
    refs = dpo_refs(rows, device, seed)
    old = (torch.randn(rows, t, generator=g) * 0.3 - 5).to(device)
    adv = torch.randn(rows, generator=g).to(device)
    opt = torch.optim.Adam([emb, proj, head], lr=3e-2)
    curve = []
    for _ in range(steps):
        hidden = torch.tanh(emb[ids] @ proj)
        if objective == "dpo":
            if fused:
                loss, _ = fa.linear_dpo_loss(hidden, head, labels, *refs, beta=0.5, backend=backend)
            else:
                logp = fa.linear_logprobs(hidden, head, labels, backend=backend).logprobs
                loss, _ = composed_dpo(logp, labels, refs, dict(loss_type="sigmoid", beta=0.5))
        else:
            cfg = dict(agg="seq-mean-token-mean", kl_coef=0.1, kl_kind="k3", entropy_coef=0.01)
            if fused:
                loss, _ = fa.linear_policy_loss(hidden, head, labels, old, adv, ref_logprobs=old, backend=backend,
                                                **cfg)
            else:
                out = fa.linear_logprobs(hidden, head, labels, return_entropy=True, backend=backend)
                loss, _ = composed_policy(out.logprobs, out.entropy, labels, old, adv, None, old, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        curve.append(loss.item())
    return torch.tensor(curve, dtype=torch.float64)


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
@pytest.mark.parametrize("backend,steps", [("torch", 30), ("triton", 3)])
def test_mini_model_loss_curves_match(objective, backend, steps, device):
    fused = train_curve(objective, True, backend, steps, device)
    plain = train_curve(objective, False, backend, steps, device)
    assert fused[-1] < fused[0]  # it learns
    torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------- gradcheck

def test_gradcheck_fused_losses_float64(device):
    hidden, weight, b, labels = make_batch(4, 6, 8, 37, torch.float64, device, seed=12, bias=True)
    refs = dpo_refs(4, device, 12)
    h, w, bb = leaves(hidden, weight, b)
    truth_lp, _ = truth_logprobs(hidden, weight, b, labels)
    old, adv, _, ref = policy_inputs(labels, truth_lp, 12)
    old, adv, ref = old.double(), adv.double(), ref.double()

    def dpo(h, w, bb):
        return fa.linear_dpo_loss(h, w, labels, *[r.double() for r in refs], bias=bb, beta=0.5, backend="torch")[0]

    def simpo(h, w, bb):
        return fa.linear_dpo_loss(h, w, labels, bias=bb, beta=2.0, loss_type="simpo", gamma=0.5, backend="torch")[0]

    def mpo_and_more(h, w, bb):
        return fa.linear_dpo_loss(h, w, labels, *[r.double() for r in refs], bias=bb, beta=0.5, backend="torch",
                                  loss_type=["sigmoid", "bco_pair", "sft", "aot", "discopop"],
                                  loss_weights=[0.8, 0.2, 1.0, 0.5, 0.3])[0]

    def policy(h, w, bb):
        return fa.linear_policy_loss(h, w, labels, old, adv, ref_logprobs=ref, kl_coef=0.1, entropy_coef=0.05,
                                     dual_clip=3.0, bias=bb, backend="torch")[0]

    def seq(h, w, bb):
        return fa.linear_sequence_logprobs(h, w, labels, bias=bb, average=True, backend="torch")

    for fn in (dpo, simpo, mpo_and_more, policy, seq):
        # atol: the head backward takes per-token upstream gradients in fp32
        assert torch.autograd.gradcheck(fn, (h, w, bb), atol=1e-5, rtol=1e-4), fn.__name__


# -------------------------------------------------------------------------------------------------------- errors

def _dpo_args(device, rows=4):
    hidden, weight, _, labels = make_batch(rows, 6, 8, 37, torch.float32, device, seed=13)
    return hidden, weight, labels, *dpo_refs(rows, device, 13)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a, k: ((a[0][:3], a[1], a[2][:3], *a[3:]), k), ValueError, "odd batch"),
        (lambda a, k: ((*a[:3], a[3][:1], a[4]), k), ValueError, "ref_chosen_logps"),
        (lambda a, k: ((*a[:4], a[4][:, None]), k), ValueError, "ref_rejected_logps"),
        (lambda a, k: (a, {**k, "beta": 0.0}), ValueError, "beta"),
        (lambda a, k: (a, {**k, "beta": -0.1}), ValueError, "beta"),
        (lambda a, k: (a, {**k, "loss_type": "dpo"}), ValueError, "loss_type"),
        (lambda a, k: (a, {**k, "loss_type": "hinge", "label_smoothing": 0.1}), ValueError, "label_smoothing"),
        (lambda a, k: (a, {**k, "gamma": 1.0}), ValueError, "gamma"),
        (lambda a, k: (a, {**k, "loss_type": "simpo"}), ValueError, "reference-free"),
        (lambda a, k: (a, {**k, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}), ValueError, "loss_weights"),
        (lambda a, k: (a, {**k, "loss_type": "sigmoid_norm", "length_normalize": False}), ValueError,
         "by definition"),
        (lambda a, k: (a[:3], {**k, "loss_type": ["sft", "bco_pair"]}), ValueError, "required"),
        (lambda a, k: (a[:3], k), ValueError, "required"),
        (lambda a, k: ((a[0][:, 0], *a[1:]), k), ValueError, "hidden"),
        (lambda a, k: ((a[0], a[1], a[2][:, :3], *a[3:]), k), ValueError, "labels"),
    ],
)
def test_linear_dpo_bad_input_names_the_argument(mutate, exc, match, device):
    args, kw = mutate(_dpo_args(device), {"backend": "torch"})
    with pytest.raises(exc, match=match):
        fa.linear_dpo_loss(*args, **kw)


def test_fused_loss_checks_on_cuda_are_device_side_without_a_host_sync(monkeypatch):
    """The fused losses' data checks (labels, empty sequences, mask against labels) sync nothing on CUDA, so a
    CUDA graph can capture a training step: on the deferred path, simulated on CPU, forward and backward read no
    tensor on the host; each check becomes a device-side assert naming its op."""
    from fastalign.ops import _checks

    monkeypatch.setattr(_checks, "deferred_checks", lambda device: True)
    asserted = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg: asserted.append(msg))
    hidden, weight, labels, rc, rr = _dpo_args("cpu")
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    old = torch.full(labels.shape, -3.0)
    adv = torch.linspace(-1, 1, labels.numel()).view(labels.shape)
    with monkeypatch.context() as m:
        def sync(*args, **kwargs):
            raise AssertionError("a host sync on the checked path")

        for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
            m.setattr(torch.Tensor, name, sync)
        loss, _ = fa.linear_dpo_loss(h, w, labels, rc, rr, backend="torch")
        loss.backward()
        loss, _ = fa.linear_policy_loss(h, w, labels, old, adv, labels != IGNORE, entropy_coef=0.01, backend="torch")
        loss.backward()
    assert any(msg.startswith("linear_dpo_loss: a sequence has no response token") for msg in asserted)
    assert any(msg.startswith("linear_policy_loss: labels must lie") for msg in asserted)
    assert any(msg.startswith("linear_policy_loss: mask marks positions") for msg in asserted)


def test_fused_loss_deferred_check_fails_naming_the_op(monkeypatch):
    from fastalign.ops import _checks

    monkeypatch.setattr(_checks, "deferred_checks", lambda device: True)  # CPU: _assert_async fails at once
    hidden, weight, labels, rc, rr = _dpo_args("cpu")
    labels = labels.clone()
    labels[3] = IGNORE
    with pytest.raises(RuntimeError, match="linear_dpo_loss: a sequence has no response token"):
        fa.linear_dpo_loss(hidden, weight, labels, rc, rr, backend="torch")


def test_linear_dpo_sequence_without_response_token(device):
    hidden, weight, labels, rc, rr = _dpo_args(device)
    labels = labels.clone()
    labels[3] = IGNORE  # the rejected response of pair 1
    with pytest.raises(ValueError, match=r"has no response token.*\(labels row 3, the rejected response of pair 1\)"):
        fa.linear_dpo_loss(hidden, weight, labels, rc, rr, backend="torch")


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (lambda z: dict(kl_coef=0.1), ValueError, "ref_logprobs"),
        (lambda z: dict(agg="sum"), ValueError, "agg"),
        (lambda z: dict(kl_kind="k4", ref_logprobs=z), ValueError, "kl_kind"),
        (lambda z: dict(dual_clip=1.0), ValueError, "dual_clip"),
        (lambda z: dict(clip_low=0.0), ValueError, "clip_low"),
        (lambda z: dict(norm_len=0), ValueError, "norm_len"),
        (lambda z: dict(advantages=z[:, :3]), ValueError, "advantages"),
        (lambda z: dict(old_logprobs=z[:, :3]), ValueError, "old_logprobs"),
        (lambda z: dict(ref_logprobs=z[:2]), ValueError, "ref_logprobs"),
        (lambda z: dict(mask=torch.ones_like(z, dtype=torch.bool)), ValueError, "mask marks positions"),
        (lambda z: dict(entropy_coef="0.1"), TypeError, "entropy_coef"),
    ],
)
def test_linear_policy_bad_input_names_the_argument(change, exc, match, device):
    hidden, weight, _, labels = make_batch(3, 7, 8, 37, torch.float32, device, seed=14)
    zeros = torch.zeros(labels.shape, device=device)
    kw = dict(old_logprobs=zeros, advantages=zeros, backend="torch")
    kw.update(change(zeros))
    with pytest.raises(exc, match=match):
        fa.linear_policy_loss(hidden, weight, labels, **kw)
