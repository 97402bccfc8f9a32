"""The memory-budgeted LM head: keep / mixed / recompute plans of ``linear_logprobs`` and the fused losses, each
against a float64 truth under the three-way rule; budget boundaries, frozen and trainable weights, ignored tokens,
temperature, softcap, bias, logit scale, entropy; the budget's sources (argument, FASTALIGN_HEAD_BUDGET, default)
and their errors; the plan's record and log line.

Shapes are small and not round; a small chunk size (monkeypatched) makes every case span several chunks, so a
kept / recomputed boundary and DPO pairs split across chunks are exercised. Outputs are poisoned where allocated
(tests/conftest.py sets FASTALIGN_POISON=1), and every output is checked finite.
"""
import json
import logging
import math

import pytest
import torch

import fastalign as fa
from fastalign.kernels import _common
from fastalign.ops import logprobs as ops_lp
from fastalign.reference import linear_losses as ref_ll
from fastalign.reference.logprobs import linear_logprobs_naive
from helpers.accuracy import assert_close_3way
from helpers.heads import plain_torch

IGNORE = -100


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 5..8 rows: several per case, so kept and recomputed rows meet inside a call."""
    monkeypatch.setattr(ops_lp, "MIN_CHUNK_ROWS", 5)
    monkeypatch.setattr(ops_lp, "CHUNK_BYTES", 1)
    monkeypatch.delenv(_common.HEAD_BUDGET_ENV, raising=False)


def make_inputs(n, d, v, dtype, *, seed, bias=False, ignore_frac=0.2, logit_std=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * logit_std / math.sqrt(d)
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = IGNORE
    up = torch.randn(n, generator=g)
    ue = torch.randn(n, generator=g)
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels, up, ue


def per_row_bytes(v, softcap=None, entropy=False):
    """fp32 numbers a kept token holds: V, twice that with a softcap and an entropy gradient (L and c')."""
    return v * 4 * (2 if softcap is not None and entropy else 1)


def budget_for(path, tokens, v, softcap=None, entropy=False):
    """A budget that makes ``path`` happen for ``tokens`` scored tokens."""
    row = per_row_bytes(v, softcap, entropy)
    return {"keep": tokens * row, "mixed": (tokens // 2) * row + row // 2, "recompute": row - 1}[path]


def run(fn, hidden, weight, bias, labels, up, ue, *, frozen=False, **kw):
    """Forward + backward of sum(logp * up) + sum(entropy * ue) on private leaves; the weight frozen if asked."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(not frozen)
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    logp, ent = fn(h, w, labels, bias=b, **kw)
    loss = (logp.double() * up.double()).sum()
    if ent is not None:
        loss = loss + (ent.double() * ue.double()).sum()
    loss.backward()
    return dict(logp=logp, entropy=ent, dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)


def fastalign_fn(backend, budget):
    def fn(h, w, labels, **kw):
        out = fa.linear_logprobs(h, w, labels, backend=backend, memory_budget=budget, **kw)
        return out.logprobs, out.entropy

    return fn


CASES = [
    # n, d, v, bias, temperature, softcap, logit_scale, entropy
    (37, 40, 1007, False, 1.0, None, 1.0, False),
    (41, 24, 523, True, 0.7, None, 1.0, True),
    (29, 33, 389, True, 1.3, 5.0, 1.25, True),
]
MATRIX = [(path, dtype, frozen, case) for path in ("keep", "mixed", "recompute")
          for dtype in (torch.float32, torch.bfloat16) for frozen in (False, True) for case in range(len(CASES))
          if dtype == torch.float32 or case != 1]


@pytest.mark.parametrize("path,dtype,frozen,case", MATRIX,
                         ids=[f"{p}-{str(d)[6:]}-{'frozen' if f else 'trained'}-{c}" for p, d, f, c in MATRIX])
def test_torch_paths_match_float64_truth(path, dtype, frozen, case):
    n, d, v, bias, temperature, softcap, scale, entropy = CASES[case]
    hidden, weight, b, labels, up, ue = make_inputs(n, d, v, dtype, seed=300 + case, bias=bias)
    tokens = int((labels != IGNORE).sum())
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=scale, return_entropy=entropy)
    truth = run(linear_logprobs_naive, hidden.double(), weight.double(), b.double() if b is not None else None,
                labels, up, ue, frozen=frozen, **kw)
    same = run(plain_torch, hidden, weight, b, labels, up, ue, frozen=frozen, **kw)
    mine = run(fastalign_fn("torch", budget_for(path, tokens, v, softcap, entropy)), hidden, weight, b, labels, up, ue,
               frozen=frozen, **kw)
    plan = fa.last_head_plan()
    assert plan.path == path and plan.tokens == tokens and plan.backend == "torch", plan
    assert plan.chunk_rows < tokens  # several chunks
    if path == "mixed":
        assert 0 < plan.kept_rows < tokens
    bwd = 1 if frozen else 2
    assert plan.gemms == pytest.approx({"keep": 1 + bwd, "recompute": 2 + bwd}.get(path, plan.gemms))
    assert mine["logp"].dtype == torch.float32 and mine["dh"].dtype == dtype
    assert (mine["dw"] is None) == frozen
    for key in ("logp", "entropy", "dh", "dw", "db"):
        if truth[key] is None:
            assert mine[key] is None, key
            continue
        assert torch.isfinite(mine[key]).all(), key
        assert_close_3way(mine[key], same[key], truth[key], dtype, name=f"{path}/{key}")
    ignored = labels == IGNORE
    assert (mine["logp"][ignored] == 0).all() and (mine["dh"][ignored] == 0).all()


@pytest.mark.parametrize("frozen", [False, True])
def test_triton_backend_recomputes_and_matches_truth(frozen, device):
    n, d, v, bias, temperature, softcap, scale, entropy = CASES[2]
    hidden, weight, b, labels, up, ue = make_inputs(n, d, v, torch.float32, seed=41, bias=bias)
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=scale, return_entropy=entropy)
    move = lambda t: t.to(device) if t is not None else None  # noqa: E731
    hidden, weight, b, labels, up, ue = map(move, (hidden, weight, b, labels, up, ue))
    truth = run(linear_logprobs_naive, hidden.double(), weight.double(), b.double(), labels, up, ue, frozen=frozen,
                **kw)
    same = run(plain_torch, hidden, weight, b, labels, up, ue, frozen=frozen, **kw)
    mine = run(fastalign_fn("triton", 10**9), hidden, weight, b, labels, up, ue, frozen=frozen, **kw)
    plan = fa.last_head_plan()
    assert plan.backend == "triton" and plan.path == "recompute" and plan.kept_rows == 0
    assert plan.gemms == (3 if frozen else 4)
    for key in ("logp", "entropy", "dh", "dw", "db"):
        if truth[key] is None:
            assert mine[key] is None
            continue
        assert_close_3way(mine[key], same[key], truth[key], torch.float32, name=f"triton/{key}")


@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_budget_boundaries(softcap, entropy):
    """A budget that just holds every scored token keeps them all; one byte less does not; less than a row keeps
    none (the recompute path, not an error). All give the same values."""
    n, d, v = 43, 20, 311
    hidden, weight, _, labels, up, ue = make_inputs(n, d, v, torch.float64, seed=9)
    tokens = int((labels != IGNORE).sum())
    row = v * 8 * (2 if softcap is not None and entropy else 1)  # fp64 inputs keep fp64
    results = {}
    for budget, path in ((tokens * row, "keep"), (tokens * row - 1, "mixed"), (row - 1, "recompute"), (0, "recompute")):
        results[budget] = run(fastalign_fn("torch", budget), hidden, weight, None, labels, up, ue, softcap=softcap,
                              return_entropy=entropy)
        plan = fa.last_head_plan()
        assert plan.path == path, (budget, plan)
        assert plan.kept_bytes <= budget and plan.budget_bytes == budget and plan.budget_from == "argument"
        if path == "mixed":
            assert plan.kept_rows % plan.chunk_rows == 0 and plan.kept_rows >= plan.chunk_rows
    truth = run(linear_logprobs_naive, hidden, weight, None, labels, up, ue, softcap=softcap, return_entropy=entropy)
    for budget, got in results.items():
        for key in ("logp", "entropy", "dh", "dw") if entropy else ("logp", "dh", "dw"):
            torch.testing.assert_close(got[key].double(), truth[key], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"budget {budget} {key}: {m}")


def test_all_ignored_is_zero_on_every_path():
    hidden, weight, b, labels, up, ue = make_inputs(13, 16, 97, torch.float32, seed=3, bias=True)
    labels = torch.full_like(labels, IGNORE)
    for budget in (10**9, 0):
        got = run(fastalign_fn("torch", budget), hidden, weight, b, labels, up, ue, return_entropy=True)
        assert fa.last_head_plan().tokens == 0
        for key in ("logp", "entropy", "dh", "dw", "db"):
            assert torch.isfinite(got[key]).all() and (got[key] == 0).all(), (budget, key)


def test_forward_only_keeps_nothing_and_matches():
    hidden, weight, b, labels, *_ = make_inputs(31, 24, 211, torch.float32, seed=5, bias=True)
    with torch.no_grad():
        out = fa.linear_logprobs(hidden, weight, labels, bias=b, return_entropy=True, return_mean_logits=True,
                                 return_is_top1=True, return_log_sum_sq_probs=True, backend="torch")
    plan = fa.last_head_plan()
    assert plan.path == "forward" and plan.kept_rows == 0 and plan.gemms == 1
    truth, ent = linear_logprobs_naive(hidden.double(), weight.double(), labels, bias=b.double(), return_entropy=True)
    torch.testing.assert_close(out.logprobs.double(), truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ent, rtol=1e-5, atol=1e-5)
    from fastalign.reference.logprobs import linear_stats_naive

    stats = linear_stats_naive(hidden.double(), weight.double(), labels, bias=b.double())
    torch.testing.assert_close(out.mean_logits.double(), stats["mean_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_sum_sq_probs.double(), stats["log_sum_sq_probs"], rtol=1e-5, atol=1e-5)
    assert torch.equal(out.is_top1, stats["is_top1"])


def test_double_backward_of_a_kept_call():
    """The kept softmax is read, never overwritten: a retained graph gives the same gradients twice."""
    hidden, weight, _, labels, up, _ = make_inputs(23, 16, 157, torch.float64, seed=6)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp = fa.linear_logprobs(h, w, labels, backend="torch", memory_budget="1GiB").logprobs
    assert fa.last_head_plan().path == "keep"
    first = torch.autograd.grad((logp * up).sum(), (h, w), retain_graph=True)
    second = torch.autograd.grad((logp * up).sum(), (h, w))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ fused losses

def make_batch(rows, t, d, v, dtype, *, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 3 / math.sqrt(d)
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (rows, t), generator=g)
    for i in range(rows):
        start = int(torch.randint(1, max(2, t // 3), (1,), generator=g))
        stop = int(torch.randint(start + 2, t + 1, (1,), generator=g))
        labels[i, :start] = IGNORE
        labels[i, stop:] = IGNORE
    cast = lambda x: x.to(dtype) if x is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels


def loss_and_grads(fn, hidden, weight, bias, *, frozen=False, upstream=None):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_(not frozen)
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    out = fn(h, w, b)
    loss = out if upstream is None else (out.double() * upstream).sum()
    loss.backward()
    return dict(loss=out.detach(), dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)


def check_paths(make_fn, hidden, weight, b, labels, dtype, *, frozen, upstream=None, tokens=None, v=None, name=""):
    up = lambda x: x.double() if x is not None else None  # noqa: E731
    truth = loss_and_grads(make_fn(ref=True), up(hidden), up(weight), up(b), frozen=frozen, upstream=upstream)
    same = loss_and_grads(make_fn(ref=True), hidden, weight, b, frozen=frozen, upstream=upstream)
    tokens = int((labels != IGNORE).sum()) if tokens is None else tokens
    for path in ("keep", "mixed", "recompute"):
        mine = loss_and_grads(make_fn(budget=budget_for(path, tokens, weight.shape[0])), hidden, weight, b,
                              frozen=frozen, upstream=upstream)
        plan = fa.last_head_plan()
        assert plan.path == path, (name, plan)
        assert (mine["dw"] is None) == frozen
        for key in ("loss", "dh", "dw", "db"):
            if truth[key] is None:
                continue
            assert torch.isfinite(mine[key]).all(), (name, path, key)
            assert_close_3way(mine[key], same[key], truth[key], dtype, name=f"{name}/{path}/{key}")


DPO_TYPES = [("sigmoid", None), (["sigmoid", "aot", "sft"], [1.0, 0.5, 0.2])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("types", range(len(DPO_TYPES)))
def test_linear_dpo_loss_paths(dtype, frozen, types):
    """With 5-row chunks over 2 x 3 sequences of 11 tokens, pairs are split across chunks (chosen and rejected
    rows lie B sequences apart); the aot term sorts over the batch: the gradient is exact only with every pair's
    log-probs known first."""
    loss_type, weights = DPO_TYPES[types]
    hidden, weight, b, labels = make_batch(6, 11, 24, 331, dtype, seed=20 + types, bias=True)
    g = torch.Generator().manual_seed(7)
    rc, rr = -20 + torch.randn(3, generator=g), -21 + torch.randn(3, generator=g)
    temperature, softcap = 0.9, 6.0

    def make_fn(ref=False, budget=None):
        def fn(h, w, bb):
            kw = dict(bias=bb, beta=0.3, loss_type=loss_type, loss_weights=weights, temperature=temperature,
                      softcap=softcap)
            if ref:
                return ref_ll.linear_dpo_loss(h, w, labels, rc.to(h.dtype), rr.to(h.dtype), **kw)[0]
            return fa.linear_dpo_loss(h, w, labels, rc, rr, memory_budget=budget, backend="torch", **kw)[0]

        return fn

    # without an entropy a kept row costs V fp32 numbers, softcap or not (the probabilities times its derivative)
    check_paths(make_fn, hidden, weight, b, labels, dtype, frozen=frozen, name=f"dpo/{loss_type}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("frozen", [False, True])
def test_linear_policy_loss_paths(dtype, frozen):
    hidden, weight, b, labels = make_batch(5, 13, 20, 277, dtype, seed=31, bias=True)
    g = torch.Generator().manual_seed(8)
    valid = labels != IGNORE
    mask = valid & (torch.rand(labels.shape, generator=g) < 0.85)
    with torch.no_grad():
        cur, _ = linear_logprobs_naive(hidden.double(), weight.double(), labels, bias=b.double())
    old = (cur + 0.1 * torch.randn(labels.shape, generator=g, dtype=torch.float64)).float() * mask
    ref = (cur + 0.1 * torch.randn(labels.shape, generator=g, dtype=torch.float64)).float() * mask
    adv = torch.randn(5, generator=g)
    kw = dict(ref_logprobs=ref, kl_coef=0.05, entropy_coef=0.02, clip_low=0.2, clip_high=0.28, agg="token-mean",
              temperature=1.1)

    def make_fn(ref=False, budget=None):
        def fn(h, w, bb):
            if ref:
                args = {k: (x.to(h.dtype) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
                return ref_ll.linear_policy_loss(h, w, labels, old.to(h.dtype), adv.to(h.dtype), mask, bias=bb,
                                                 **args)[0]
            return fa.linear_policy_loss(h, w, labels, old, adv, mask, bias=bb, memory_budget=budget,
                                         backend="torch", **kw)[0]

        return fn

    check_paths(make_fn, hidden, weight, b, labels, dtype, frozen=frozen, tokens=int(mask.sum()), name="policy")


def test_linear_sequence_logprobs_paths():
    """A (B,) output: the upstream gradient is known only in backward, so the kept softmax waits for it."""
    hidden, weight, b, labels = make_batch(4, 9, 18, 251, torch.float32, seed=33, bias=True)
    upstream = torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    def make_fn(ref=False, budget=None):
        def fn(h, w, bb):
            if ref:
                return ref_ll.linear_sequence_logprobs(h, w, labels, bias=bb, average=True)
            return fa.linear_sequence_logprobs(h, w, labels, bias=bb, average=True, memory_budget=budget,
                                               backend="torch")

        return fn

    check_paths(make_fn, hidden, weight, b, labels, torch.float32, frozen=False, upstream=upstream, name="seq")


def test_fused_all_masked_batch_is_zero_on_every_path():
    hidden, weight, b, labels = make_batch(3, 7, 12, 101, torch.float32, seed=4, bias=True)
    mask = torch.zeros(labels.shape, dtype=torch.bool)
    old = torch.zeros(labels.shape)
    adv = torch.randn(3)
    for budget in (10**9, 0):
        got = loss_and_grads(lambda h, w, bb: fa.linear_policy_loss(h, w, labels, old, adv, mask, bias=bb,
                                                                    entropy_coef=0.1, memory_budget=budget,
                                                                    backend="torch")[0], hidden, weight, b)
        for key in ("loss", "dh", "dw", "db"):
            assert torch.isfinite(got[key]).all() and (got[key] == 0).all(), (budget, key)


def test_fused_keep_scales_by_grad_output_and_survives_a_retained_graph():
    hidden, weight, b, labels = make_batch(4, 8, 16, 127, torch.float64, seed=5)
    rc, rr = torch.full((2,), -15.0, dtype=torch.float64), torch.full((2,), -16.0, dtype=torch.float64)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fa.linear_dpo_loss(h, w, labels, rc, rr, memory_budget="1GiB", backend="torch")[0]
    assert fa.last_head_plan().path == "keep"
    g1 = torch.autograd.grad(loss * 2.5, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss * -0.5, (h, w))
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    truth = ref_ll.linear_dpo_loss(hr, wr, labels, rc, rr)[0]
    t = torch.autograd.grad(truth, (hr, wr))
    for a, b_, tt in zip(g1, g2, t):
        torch.testing.assert_close(a, 2.5 * tt, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(b_, -0.5 * tt, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------------------------------------ budget

@pytest.mark.parametrize("text,expected", [
    ("1073741824", 2**30), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30), ("2gib", 2 * 2**30), ("1.5GB", 1.5e9),
    ("64k", 64000), (" 3 KiB ", 3072), ("0", 0), ("7B", 7), ("1TiB", 2**40),
])
def test_parse_bytes(text, expected):
    assert _common.parse_bytes(text) == int(expected)


@pytest.mark.parametrize("text", ["lots", "-5", "12XB", "1e9", "GiB", "", "2 GiB extra", "nan"])
def test_bad_env_budget_names_the_variable(text, monkeypatch):
    monkeypatch.setenv(_common.HEAD_BUDGET_ENV, text)
    hidden, weight, _, labels, *_ = make_inputs(7, 8, 31, torch.float32, seed=1)
    if not text.strip():  # empty: unset, the default applies
        fa.linear_logprobs(hidden.requires_grad_(), weight, labels, backend="torch")
        assert fa.last_head_plan().budget_from == "default"
        return
    with pytest.raises(ValueError, match=_common.HEAD_BUDGET_ENV):
        fa.linear_logprobs(hidden.requires_grad_(), weight, labels, backend="torch")


@pytest.mark.parametrize("value", ["lots", -1, 2.5, True])
def test_bad_budget_argument_names_it(value):
    hidden, weight, _, labels, *_ = make_inputs(7, 8, 31, torch.float32, seed=1)
    with pytest.raises(ValueError, match="linear_logprobs: memory_budget"):
        fa.linear_logprobs(hidden, weight, labels, backend="torch", memory_budget=value)
    hidden3, weight3, _, labels3 = make_batch(2, 5, 8, 31, torch.float32, seed=1)
    with pytest.raises(ValueError, match="linear_sequence_logprobs: memory_budget"):
        fa.linear_sequence_logprobs(hidden3, weight3, labels3, backend="torch", memory_budget=value)


def test_budget_sources_and_precedence(monkeypatch):
    hidden, weight, _, labels, *_ = make_inputs(17, 8, 61, torch.float32, seed=2, ignore_frac=0.0)
    h = hidden.requires_grad_()
    monkeypatch.setattr(_common, "_available_ram", lambda: 3 * 2**30)  # what the OS reports changes by the call
    fa.linear_logprobs(h, weight, labels, backend="torch")
    plan = fa.last_head_plan()
    assert plan.budget_from == "default" and plan.budget_bytes == int(_common.CPU_BUDGET_FRACTION * 3 * 2**30)
    assert plan.path == "keep"
    monkeypatch.setenv(_common.HEAD_BUDGET_ENV, "100")  # less than a row of 61 fp32 logits
    fa.linear_logprobs(h, weight, labels, backend="torch")
    plan = fa.last_head_plan()
    assert (plan.budget_from, plan.budget_bytes, plan.path) == (_common.HEAD_BUDGET_ENV, 100, "recompute")
    fa.linear_logprobs(h, weight, labels, backend="torch", memory_budget="1MiB")  # the argument wins
    plan = fa.last_head_plan()
    assert (plan.budget_from, plan.budget_bytes, plan.path) == ("argument", 2**20, "keep")


def test_default_budget_is_the_documented_fraction(monkeypatch):
    monkeypatch.setattr(_common, "_available_ram", lambda: 8 * 2**30)
    assert _common.default_head_budget("cpu") == int(_common.CPU_BUDGET_FRACTION * 8 * 2**30)


def test_plan_is_logged_and_serialisable(caplog):
    hidden, weight, _, labels, *_ = make_inputs(19, 8, 53, torch.float32, seed=3)
    with caplog.at_level(logging.DEBUG, logger="fastalign"):
        fa.linear_logprobs(hidden.requires_grad_(), weight, labels, backend="torch", memory_budget=0)
    plan = fa.last_head_plan()
    assert isinstance(plan, fa.HeadPlan)
    assert json.loads(json.dumps(plan.as_dict()))["path"] == "recompute"
    assert any("linear_logprobs: recompute path" in r.getMessage() for r in caplog.records)


def test_triton_backward_chunks_follow_the_calls_budget(monkeypatch, device):
    """The Triton backend keeps nothing, but the call's budget sizes its backward's vocabulary chunks."""
    from fastalign.kernels import logprobs as lp_kernels

    seen = []
    real = lp_kernels._chunk_columns
    monkeypatch.setattr(lp_kernels, "_chunk_columns",
                        lambda *args: seen.append(args[-1]) or real(*args))
    hidden, weight, _, labels, up, _ = make_inputs(11, 16, 97, torch.float32, seed=12)
    h = hidden.to(device).requires_grad_()
    out = fa.linear_logprobs(h, weight.to(device), labels.to(device), backend="triton", memory_budget="3MiB")
    (out.logprobs * up.to(device)).sum().backward()
    assert seen == [3 * 2**20]
    assert fa.last_head_plan().budget_bytes == 3 * 2**20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_path_labels_of_vanishing_probability(dtype):
    """Kept tokens take log p_y from p itself; where p_y is below 1e-30 (or underflows to 0) their logits are
    rebuilt and scored exactly: -200-ish log-probs, finite, as the float64 truth."""
    hidden, weight, _, labels, up, _ = make_inputs(29, 16, 211, dtype, seed=13, logit_std=40.0, ignore_frac=0.0)
    with torch.no_grad():
        z = hidden.double() @ weight.double().T
    labels[::2] = z.argmin(-1)[::2]  # the least likely token: log p in the hundreds below 0
    truth = run(linear_logprobs_naive, hidden.double(), weight.double(), None, labels, up, up)
    same = run(plain_torch, hidden, weight, None, labels, up, up)
    mine = run(fastalign_fn("torch", "1GiB"), hidden, weight, None, labels, up, up)
    assert fa.last_head_plan().path == "keep"
    assert truth["logp"][::2].max() < -100
    for key in ("logp", "dh", "dw"):
        assert torch.isfinite(mine[key]).all(), key
        if dtype == torch.float64:
            torch.testing.assert_close(mine[key], truth[key], rtol=1e-9, atol=1e-9)
        else:
            assert_close_3way(mine[key], same[key], truth[key], dtype, name=key)
