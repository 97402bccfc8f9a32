"""linear_logprobs: every backend against float64 truth, under the three-way accuracy rule; errors; edge cases;
the kernels compiled for sm_90 without a GPU.

On CPU the Triton kernels run in the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU);
on a GPU the same tests compile them for real.
"""
import math

import pytest
import torch

import fastalign as fa
from fastalign.reference.logprobs import linear_logits_naive, linear_logprobs_naive, linear_stats_naive
from helpers.accuracy import ATOL, assert_close_3way
from helpers.heads import plain_logits, plain_torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_inputs(shape, d, v, dtype, device, *, seed, bias=False, logit_std=3.0, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g)
    weight = torch.randn(v, d, generator=g) * logit_std / math.sqrt(d)
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_frac] = -100
    cast = lambda t: t.to(device=device, dtype=dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels.to(device)


def run(fn, hidden, weight, bias, labels, grads, **kw):
    """Forward + backward of sum(logp * g) + sum(entropy * e) on private leaf copies."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    logp, entropy = fn(h, w, labels, bias=b, **kw)
    g, e = grads
    loss = (logp.float() * g).sum()
    if entropy is not None:
        loss = loss + (entropy.float() * e).sum()
    loss.backward()
    return dict(logp=logp, entropy=entropy, dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)


def fast(backend):
    def fn(h, w, labels, **kw):
        out = fa.linear_logprobs(h, w, labels, backend=backend, **kw)
        return out.logprobs, out.entropy

    return fn


CASES = [
    # shape, d, v, bias, temperature, softcap, entropy
    ((37,), 40, 1007, False, 1.0, None, False),
    ((37,), 40, 1007, True, 1.0, None, True),
    ((3, 13), 48, 523, False, 0.7, None, True),
    ((29,), 33, 389, True, 1.3, 5.0, True),
]


# Every case on the kernels (default GEMM-epilogue backward); the fully fused atomic backward on fp32/fp16; the
# torch path runs the same code for every dtype, so two cases cover its halves.
MATRIX = (
    [("triton", dtype, case) for dtype in DTYPES for case in range(len(CASES))]
    + [("triton-atomic", dtype, case) for dtype in DTYPES[:2] for case in range(len(CASES))]
    + [("torch", dtype, case) for dtype in DTYPES for case in range(len(CASES)) if dtype == torch.float32 or case < 2]
)


@pytest.mark.parametrize("backend,dtype,case", MATRIX, ids=[f"{b}-{str(d)[6:]}-{c}" for b, d, c in MATRIX])
def test_matches_float64_truth(backend, dtype, case, device, monkeypatch):
    shape, d, v, bias, temperature, softcap, entropy = CASES[case]
    if backend == "triton-atomic":
        monkeypatch.setenv("FASTALIGN_LOGPROBS_BWD", "atomic")
        backend = "triton"
    hidden, weight, b, labels = make_inputs(shape, d, v, dtype, device, seed=100 + case, bias=bias)
    gen = torch.Generator().manual_seed(7 + case)
    grads = (torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device))
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=entropy)

    def truth_fn(h, w, lab, **k):
        return linear_logprobs_naive(h, w, lab, **k)

    truth = run(truth_fn, hidden.double(), weight.double(), b.double() if b is not None else None, labels, grads, **kw)
    same = run(plain_torch, hidden, weight, b, labels, grads, **kw)
    mine = run(fast(backend), hidden, weight, b, labels, grads, **kw)

    assert mine["logp"].dtype == torch.float32 and mine["logp"].shape == shape
    assert mine["dh"].dtype == dtype and mine["dw"].dtype == dtype
    for key in ("logp", "entropy", "dh", "dw", "db"):
        if truth[key] is None:
            assert mine[key] is None
            continue
        assert_close_3way(mine[key], same[key], truth[key], dtype, name=f"{backend}/{dtype}/{key}")
    ignored = labels == -100
    assert (mine["logp"][ignored] == 0).all()
    assert (mine["dh"][ignored] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_only_equals_forward_with_grad(backend, device):
    hidden, weight, _, labels = make_inputs((41,), 24, 700, torch.float32, device, seed=5)
    with torch.no_grad():
        a = fa.linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    b = fa.linear_logprobs(hidden.requires_grad_(), weight, labels, return_entropy=True, backend=backend)
    torch.testing.assert_close(a.logprobs, b.logprobs.detach(), rtol=0, atol=0)
    torch.testing.assert_close(a.entropy, b.entropy.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_non_contiguous_inputs_and_grads(backend, device):
    hidden, weight, bias, labels = make_inputs((2, 19), 32, 300, torch.float32, device, seed=9, bias=True)
    # hidden as a transposed view, weight as a strided column slice, labels transposed too
    hidden_nc = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    wide = torch.zeros(weight.shape[0], 2 * weight.shape[1], device=device)
    wide[:, ::2] = weight
    weight_nc = wide[:, ::2]
    labels_nc = labels.t().contiguous().t()
    assert not hidden_nc.is_contiguous() and not weight_nc.is_contiguous() and not labels_nc.is_contiguous()
    g = torch.randn(19, 2, device=device).t()  # a non-contiguous upstream gradient
    e = torch.randn(2, 19, device=device)
    ref = run(fast("torch"), hidden, weight, bias, labels, (g.contiguous(), e), return_entropy=True)

    def grads_via_view(h, w, lab, **kw):
        out = fa.linear_logprobs(h, w, lab, backend=backend, **kw)
        return out.logprobs, out.entropy

    h = hidden_nc.detach().requires_grad_()
    w = weight_nc.detach().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    logp, ent = grads_via_view(h, w, labels_nc, bias=b, return_entropy=True)
    ((logp * g).sum() + (ent * e).sum()).backward()
    torch.testing.assert_close(logp, ref["logp"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.grad, ref["dh"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, ref["dw"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b.grad, ref["db"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_flat_labels_and_batched_labels_agree(backend, device):
    hidden, weight, _, labels = make_inputs((3, 11), 24, 257, torch.float32, device, seed=11)
    a = fa.linear_logprobs(hidden, weight, labels, backend=backend).logprobs
    b = fa.linear_logprobs(hidden, weight, labels.reshape(-1), backend=backend).logprobs
    assert a.shape == (3, 11) and b.shape == (3, 11)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_all_ignored_is_zero_not_nan(backend, device):
    hidden, weight, bias, labels = make_inputs((13,), 24, 300, torch.float32, device, seed=3, bias=True)
    labels[:] = -100
    out = run(fast(backend), hidden, weight, bias, labels, (torch.randn(13), torch.randn(13)), return_entropy=True)
    for key, t in out.items():
        assert torch.isfinite(t).all() and (t == 0).all(), key


def test_custom_ignore_index_and_all_negative_logits(device):
    # every logit near -200: a running max initialised at 0 instead of -inf underflows every exp to 0 (a bug
    # peers shipped); this case catches it, random logits around 0 do not
    hidden, weight, _, labels = make_inputs((23,), 16, 333, torch.float32, device, seed=4, ignore_frac=0.0)
    labels[::4] = 7777
    bias = torch.full((333,), -200.0, device=device)
    a = fa.linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=7777, backend="triton").logprobs
    t = fa.linear_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(), ignore_index=7777,
                           backend="torch").logprobs
    torch.testing.assert_close(a.double(), t, rtol=1e-5, atol=1e-4)
    assert (a[::4] == 0).all() and (a[1::4] < 0).all()


# ------------------------------------------------------------------ logit_scale and TRL's per-token statistics

STAT_CASES = [
    # shape, d, v, bias, temperature, softcap, logit_scale
    ((41,), 40, 1007, False, 1.0, None, 1.0),
    ((3, 13), 48, 523, True, 0.7, None, 0.45),
    ((29,), 33, 389, True, 1.3, 5.0, 2.5),
]
STAT_MATRIX = [(b, dtype, case) for b in ("triton", "torch") for dtype in DTYPES for case in range(len(STAT_CASES))
               if b == "triton" or dtype == torch.float32 or case == 1]


def _stats_out(fn_out):
    return {"mean_logits": fn_out.mean_logits, "is_top1": fn_out.is_top1, "log_sum_sq_probs": fn_out.log_sum_sq_probs}


def _plain_stats(h, w, labels, *, bias, temperature, softcap, logit_scale):
    """The statistics a user would compute from the model's logits in the inputs' dtype (the softmax in fp32)."""
    z = plain_logits(h, w, bias=bias, softcap=softcap, logit_scale=logit_scale).float() / temperature
    valid = labels != -100
    lse = torch.logsumexp(z, -1)
    return {"mean_logits": torch.where(valid, z.mean(-1), 0.0),
            "is_top1": (z.argmax(-1) == labels) & valid,
            "log_sum_sq_probs": torch.where(valid, torch.logsumexp(2 * z, -1) - 2 * lse, 0.0)}, z


@pytest.mark.parametrize("backend,dtype,case", STAT_MATRIX,
                         ids=[f"{b}-{str(d)[6:]}-{c}" for b, d, c in STAT_MATRIX])
def test_stats_and_logit_scale_match_float64_truth(backend, dtype, case, device):
    shape, d, v, bias, temperature, softcap, logit_scale = STAT_CASES[case]
    hidden, weight, b, labels = make_inputs(shape, d, v, dtype, device, seed=300 + case, bias=bias)
    gen = torch.Generator().manual_seed(31 + case)
    grads = (torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device))
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    up = lambda t: t.double() if t is not None else None  # noqa: E731
    z64 = linear_logits_naive(up(hidden), up(weight), up(b), temperature, softcap, logit_scale)
    # a trained model's labels are often its arg-max: make about a third of the valid ones so
    predicted = (torch.rand(shape, generator=gen) < 0.35).to(device) & (labels != -100)
    labels = torch.where(predicted, z64.argmax(-1), labels)

    truth = run(linear_logprobs_naive, up(hidden), up(weight), up(b), labels, grads, return_entropy=True, **kw)
    truth_stats = linear_stats_naive(up(hidden), up(weight), labels, bias=up(b), **kw)
    same = run(plain_torch, hidden, weight, b, labels, grads, return_entropy=True, **kw)
    same_stats, same_z = _plain_stats(hidden, weight, labels, bias=b, **kw)

    def mine_fn(h, w, lab, **k):
        out = fa.linear_logprobs(h, w, lab, backend=backend, return_mean_logits=True, return_is_top1=True,
                                 return_log_sum_sq_probs=True, **k)
        mine_fn.out = out
        return out.logprobs, out.entropy

    mine = run(mine_fn, hidden, weight, b, labels, grads, return_entropy=True, **kw)
    stats = _stats_out(mine_fn.out)
    # the gradients with all statistics requested are the gradients of logp and entropy alone
    for key in ("logp", "entropy", "dh", "dw", "db"):
        if truth[key] is not None:
            assert_close_3way(mine[key], same[key], truth[key], dtype, name=f"{backend}/{dtype}/{key}")
    for key in ("mean_logits", "log_sum_sq_probs"):
        assert stats[key].dtype == torch.float32 and stats[key].shape == shape and not stats[key].requires_grad
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], dtype, name=f"{backend}/{dtype}/{key}")
    top1 = stats["is_top1"]
    assert top1.dtype == torch.bool and top1.shape == shape
    # where the label's logit and the best other one are closer than the same-dtype logits' own error, rounding
    # may flip the arg-max for any implementation; everywhere else the answer must be the truth's
    safe = labels.clamp(min=0)
    z_label = z64.gather(-1, safe[..., None])[..., 0]
    best_other = z64.scatter(-1, safe[..., None], float("-inf")).amax(-1)
    noise = 2 * (same_z.double() - z64).abs().amax(-1) + ATOL[dtype]
    decided = (z_label - best_other).abs() > noise
    assert truth_stats["is_top1"].any() and (~truth_stats["is_top1"] & (labels != -100)).any()
    assert (top1[decided] == truth_stats["is_top1"][decided]).all()
    ignored = labels == -100
    assert not top1[ignored].any()
    assert (stats["mean_logits"][ignored] == 0).all() and (stats["log_sum_sq_probs"][ignored] == 0).all()


def _exact_tie_inputs(device):
    """Small integers, so every logit is exact in any dtype and every engine: ties are real ties.

    Rows 5 and 900 of W are equal, and so are rows 17 and 18 (different vocabulary splits, then the same tile).
    Token 0's hidden state picks row 5's direction, so rows 5 and 900 share the maximum: the label 5 is the
    arg-max (the first index wins), the label 900 is not. Token 1 does the same for rows 17 and 18.
    """
    g = torch.Generator().manual_seed(12)
    d, v = 24, 1007
    weight = torch.randint(-1, 2, (v, d), generator=g).float()
    weight[900] = weight[5] = torch.tensor([1.0] * 12 + [0.0] * 12) * 2
    weight[18] = weight[17] = torch.tensor([0.0] * 12 + [1.0] * 12) * 2
    hidden = torch.zeros(6, d)
    hidden[[0, 2, 4], :12] = 1.0
    hidden[[1, 3, 5], 12:] = 1.0
    labels = torch.tensor([5, 17, 900, 18, 6, -100])
    return hidden.to(device), weight.to(device), labels.to(device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_is_top1_ties_go_to_the_first_index(backend, dtype, device):
    hidden, weight, labels = _exact_tie_inputs(device)
    out = fa.linear_logprobs(hidden.to(dtype), weight.to(dtype), labels, return_is_top1=True, backend=backend)
    # labels 5 and 17 are the first of two equal maxima; 900 and 18 tie with an earlier index; 6 is not a max
    assert out.is_top1.tolist() == [True, True, False, False, False, False]
    logits = hidden @ weight.T
    assert (logits.argmax(-1)[:4] == torch.tensor([5, 17, 5, 17], device=device)).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_hand_derived(backend, device):
    # logits [1, 0, 0] (h = [1, 0], W rows e0, e1, 0): mean 1/3; p = [e, 1, 1] / (e + 2), so
    # log sum p^2 = log(e^2 + 2) - 2 log(e + 2); label 0 is the arg-max, label 1 is not
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]], device=device)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], device=device)
    out = fa.linear_logprobs(hidden, weight, torch.tensor([0, 1, 2], device=device), return_mean_logits=True,
                             return_is_top1=True, return_log_sum_sq_probs=True, backend=backend)
    e = math.e
    expect = math.log(e * e + 2) - 2 * math.log(e + 2)
    torch.testing.assert_close(out.mean_logits, torch.tensor([1 / 3, 1 / 3, 0.0], device=device))
    torch.testing.assert_close(out.log_sum_sq_probs, torch.tensor([expect, expect, -math.log(3)], device=device))
    # token 2: all logits 0, a three-way tie won by index 0, so label 2 is not the top-1
    assert out.is_top1.tolist() == [True, False, False]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_all_ignored_and_all_negative_logits(backend, device):
    hidden, weight, _, labels = make_inputs((23,), 16, 333, torch.float32, device, seed=14, ignore_frac=0.0)
    bias = torch.full((333,), -200.0, device=device)
    kw = dict(bias=bias, return_mean_logits=True, return_is_top1=True, return_log_sum_sq_probs=True)
    out = fa.linear_logprobs(hidden, weight, labels, backend=backend, **kw)
    truth = linear_stats_naive(hidden.double(), weight.double(), labels, bias=bias.double())
    torch.testing.assert_close(out.mean_logits.double(), truth["mean_logits"], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), truth["log_sum_sq_probs"], rtol=1e-5, atol=1e-4)
    assert (out.is_top1 == truth["is_top1"]).all()
    out = fa.linear_logprobs(hidden, weight, torch.full_like(labels, -100), backend=backend, **kw)
    assert (out.mean_logits == 0).all() and (out.log_sum_sq_probs == 0).all() and not out.is_top1.any()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stats_are_not_differentiable_and_leave_gradients_alone(backend, device):
    hidden, weight, _, labels = make_inputs((19,), 24, 300, torch.float32, device, seed=15)
    g = torch.randn(19, device=device)
    grads = []
    for with_stats in (False, True):
        h = hidden.clone().requires_grad_()
        out = fa.linear_logprobs(h, weight, labels, return_mean_logits=with_stats, return_is_top1=with_stats,
                                 return_log_sum_sq_probs=with_stats, backend=backend)
        if with_stats:
            assert not any(t.requires_grad for t in (out.mean_logits, out.is_top1, out.log_sum_sq_probs))
        else:
            assert out.mean_logits is None and out.is_top1 is None and out.log_sum_sq_probs is None
        (out.logprobs * g).sum().backward()
        grads.append(h.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------ errors

def _valid(device="cpu"):
    return make_inputs((5,), 8, 17, torch.float32, device, seed=1, bias=True)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(weight=a["weight"][:, :7]), ValueError, "weight"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight dtype"),
        (lambda a: a.update(labels=a["labels"][:4]), ValueError, "labels"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, "labels"),
        (lambda a: a.update(hidden=a["hidden"].long()), TypeError, "hidden"),
        (lambda a: a.update(bias=a["bias"][:3]), ValueError, "bias"),
        (lambda a: a.update(bias=a["bias"].half()), TypeError, "bias"),
        (lambda a: a["labels"].__setitem__(0, 17), ValueError, r"labels must lie in \[0, 17\)"),
        (lambda a: a["labels"].__setitem__(1, -5), ValueError, "labels"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=-1.0), ValueError, "temperature"),
        (lambda a: a.update(softcap=0.0), ValueError, "softcap"),
        (lambda a: a.update(logit_scale=float("nan")), ValueError, "logit_scale"),
        (lambda a: a.update(logit_scale="2"), TypeError, "logit_scale"),
        (lambda a: a.update(backend="cudnn"), ValueError, "backend"),
        (lambda a: a.update(weight=a["weight"].to("meta")), ValueError, "device"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, match):
    hidden, weight, bias, labels = _valid()
    args = dict(hidden=hidden, weight=weight, bias=bias, labels=labels)
    mutate(args)
    with pytest.raises(exc, match=match):
        fa.linear_logprobs(**args)


def _forbid_host_reads(monkeypatch):
    def sync(*args, **kwargs):
        raise AssertionError("a host sync on the checked path")

    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)


def test_label_checks_on_cuda_are_device_side_without_a_host_sync(monkeypatch):
    """On CUDA the label-range check is a device-side assert (torch._assert_async): no host sync, so no stall and
    CUDA-graph capture works. Simulated on CPU by taking the deferred path, where _assert_async fails at once."""
    from fastalign.ops import _checks
    from fastalign.ops.logprobs import validate_labels

    monkeypatch.setattr(_checks, "deferred_checks", lambda device: True)
    hidden, weight, bias, labels = _valid()
    with monkeypatch.context() as m:
        _forbid_host_reads(m)
        validate_labels(labels, weight.shape[0], -100, op="linear_logprobs")
    labels[2] = weight.shape[0]
    with pytest.raises(RuntimeError, match=r"linear_logprobs: labels must lie in \[0, 17\)"):
        fa.linear_logprobs(hidden, weight, labels)


def test_sync_checks_env_makes_cuda_checks_eager_except_under_graph_capture(monkeypatch):
    from fastalign.ops import _checks

    cuda = torch.device("cuda", 0)
    assert _checks.deferred_checks(cuda) and not _checks.deferred_checks(torch.device("cpu"))
    monkeypatch.setenv(_checks.SYNC_CHECKS_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert not _checks.deferred_checks(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _checks.deferred_checks(cuda)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fastalign import _backend

    monkeypatch.setattr(_backend, "interpreting", lambda: False)
    hidden, weight, bias, labels = _valid()
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fa.linear_logprobs(hidden, weight, labels, backend="triton")


def test_unknown_backward_mode_is_a_clear_error(monkeypatch, device):
    hidden, weight, bias, labels = _valid(device)
    monkeypatch.setenv("FASTALIGN_LOGPROBS_BWD", "magic")
    out = fa.linear_logprobs(hidden.requires_grad_(), weight, labels, backend="triton")
    with pytest.raises(ValueError, match="FASTALIGN_LOGPROBS_BWD"):
        out.logprobs.sum().backward()


def test_env_override_and_fp64_on_triton(monkeypatch, device):
    hidden, weight, bias, labels = _valid(device)
    monkeypatch.setenv("FASTALIGN_BACKEND", "nope")
    with pytest.raises(ValueError, match="FASTALIGN_BACKEND"):
        fa.linear_logprobs(hidden, weight, labels)
    monkeypatch.setenv("FASTALIGN_BACKEND", "triton")
    with pytest.raises(TypeError, match="hidden"):
        fa.linear_logprobs(hidden.double(), weight.double(), labels)


# ------------------------------------------------------------------------------------------ sm_90a compile check
# Each case runs a launcher at the target shape (N=32768, D=3584, V=151936) on meta tensors, records its launches and
# compiles them through Triton's binder as a real launch specializes them (fastalign.kernels.compiled).
# Register bounds, a thread, per kernel (the numbers behind them: kernels/logprobs_notes.md): 8-warp tiles at
# <= 128 run two CTAs an SM; the others are one CTA of two warpgroups with headroom below 255, or, where stated
# 255, the hardware limit with no spill.
_FWD, _TARGET, _BWD = "_linear_logprobs_fwd_kernel", "_target_logit_kernel", "_linear_logprobs_bwd_kernel"
REGISTER_BOUNDS = {
    "logprobs_fwd/bf16": {_FWD: 192, _TARGET: 128},
    "logprobs_fwd/bf16-score": {_FWD: 128, _TARGET: 128},
    "logprobs_fwd/bf16-all": {_FWD: 232, _TARGET: 128},
    "logprobs_fwd/bf16-stats": {_FWD: 248, _TARGET: 128},  # + logit scale and TRL's statistics (237 measured)
    "logprobs_fwd/fp16": {_FWD: 192, _TARGET: 128},
    "logprobs_fwd/fp32-ieee": {_FWD: 168, _TARGET: 144},
    "logprobs_fwd/fp32-tf32": {_FWD: 192, _TARGET: 144},
    "logprobs_bwd/bf16": {_BWD: 184},
    "logprobs_bwd/bf16-all": {_BWD: 255},
    "logprobs_bwd/bf16-scale": {_BWD: 248},  # softcap and logit scale (232 measured)
    "logprobs_bwd/bf16-atomic": {_BWD: 255},
    "logprobs_bwd/fp32-ieee": {_BWD: 128},
    "logprobs_bwd/fp32-tf32": {_BWD: 232},
    "logprobs_bwd/fp32-ieee-atomic": {_BWD: 128},
}
# the MMA instruction each case's tile loop must lower to: tensor cores (wgmma) for half precision and tf32;
# FFMA for IEEE fp32 (what torch's "highest" precision asks for)
MMA_KIND = {case: "fma" if "ieee" in case else "wgmma" for case in REGISTER_BOUNDS}
SMEM_LIMIT = 227 * 1024  # one H100 / H200 CTA


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    from helpers.compile import compile_cases

    return compile_cases(list(REGISTER_BOUNDS))


@pytest.mark.compile
@pytest.mark.parametrize("case", list(REGISTER_BOUNDS))
def test_kernel_compiles_for_sm90a_as_launched(compiled, case):
    """The interpreter runs none of what decides speed: compile what each launcher launches and hold it to
    zero spills, shared memory that fits, the stated registers, wgmma, and fence-free relaxed atomics."""
    reports = compiled[case]
    assert {r["kernel"] for r in reports} == set(REGISTER_BOUNDS[case]), reports
    for r in reports:
        where = f"{case}/{r['kernel']} {r['config']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == r["local"] == 0, f"{where} spills: {r}"
        assert r["smem"] <= SMEM_LIMIT, f"{where}: {r['smem']} bytes of shared memory"
        assert r["regs"] <= REGISTER_BOUNDS[case][r["kernel"]], f"{where}: {r['regs']} registers"
        assert r["ctas_per_sm"] >= 1
        # no GPU-scope fence anywhere; every atomic a relaxed reduction (REDG), never a returning ATOMG
        assert r["membar_gpu"] == 0 and r["atomg"] == 0, f"{where}: {r['membar_gpu']} fences, {r['atomg']} ATOMG"
        if r["kernel"] in (_FWD, _BWD):
            assert r["mma"] == MMA_KIND[case], f"{where}: {r['mma']}"
            assert r["cp_async"] > 0, f"{where}: loads are not asynchronous copies"
    main = next(r for r in reports if r["kernel"] in (_FWD, _BWD))
    if main["kernel"] == _FWD:
        # one flattened (vocab tile, D step) loop: the pipeline does not drain between vocabulary tiles
        assert main["loops"] == 1, main
    if main["kernel"] == _BWD and ("atomic" in case or "all" in case):  # dh / dW / db accumulate atomically
        assert main["redg"] > 0, main
    if case.endswith("score"):
        assert main["ctas_per_sm"] >= 2, main  # scoring (no entropy) runs two CTAs an SM


@pytest.mark.compile
def test_compile_check_specializes_like_a_real_launch(compiled):
    """Divisible-by-16 ints and aligned pointers are typed as a launch types them, unit strides are constants:
    the kernel compiled here is the kernel that runs (typing every int as plain i32 compiles another one)."""
    sig = next(r for r in compiled["logprobs_fwd/bf16"] if r["kernel"] == _FWD)["signature"]
    assert sig["h_ptr"] == sig["w_ptr"] == "*bf16:16"
    assert sig["D"] == sig["V"] == sig["stride_h_n"] == sig["stride_w_v"] == "i32:16"
    assert sig["stride_h_d"] == sig["stride_w_d"] == "=1"


# -------------------------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("mode", ["gemm", "atomic"])
def test_gpu_realistic_shape(dtype, mode, monkeypatch):
    monkeypatch.setenv("FASTALIGN_LOGPROBS_BWD", mode)
    # odd N, a real hidden size, a vocabulary that is no multiple of any block
    hidden, weight, b, labels = make_inputs((1937,), 1024, 50257, dtype, "cuda", seed=21)
    gen = torch.Generator().manual_seed(22)
    grads = (torch.randn(1937, generator=gen).cuda(), torch.randn(1937, generator=gen).cuda())
    truth = run(lambda h, w, lab, **k: fa.linear_logprobs(h, w, lab, backend="torch", **k),
                hidden.double(), weight.double(), None, labels, grads, return_entropy=True)
    same = run(plain_torch, hidden, weight, None, labels, grads, return_entropy=True)
    mine = run(fast("triton"), hidden, weight, None, labels, grads, return_entropy=True)
    for key in ("logp", "entropy", "dh", "dw"):
        assert_close_3way(mine[key], same[key], truth[key], dtype, name=f"gpu/{dtype}/{key}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_stats_and_logit_scale_realistic_shape(dtype):
    hidden, weight, b, labels = make_inputs((1937,), 1024, 50257, dtype, "cuda", seed=23)
    kw = dict(softcap=30.0, logit_scale=0.8, temperature=0.9)
    up = lambda t: t.double()  # noqa: E731
    truth = linear_stats_naive(up(hidden), up(weight), labels, **kw)
    same, _ = _plain_stats(hidden, weight, labels, bias=None, **kw)
    out = fa.linear_logprobs(hidden, weight, labels, return_mean_logits=True, return_is_top1=True,
                             return_log_sum_sq_probs=True, backend="triton", **kw)
    for key in ("mean_logits", "log_sum_sq_probs"):
        assert_close_3way(getattr(out, key), same[key], truth[key], dtype, name=f"gpu/{dtype}/{key}")
    agree = (out.is_top1 == truth["is_top1"]).float().mean().item()
    assert agree > 0.999  # flips only at near-ties
