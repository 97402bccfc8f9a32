"""The optional extension fastalign._C (C++ on CPU; CUDA on a GPU) against the float64 reference, its guards, the
clean fallback when it is missing, and a compile check of the CUDA sources where nvcc exists.

Outputs the C++ kernels allocate are NaN-filled first under FASTALIGN_POISON=1 (tests/conftest.py sets it), so an
element a kernel forgets to write fails the comparisons below.

The session fixture builds the extension once into the regular cache (``$FASTALIGN_EXT_DIR`` or
``~/.cache/fastalign/ext``; 40-90 s on a fresh machine, nothing when a build of the same sources is cached).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastalign as fa
from fastalign import _backend, _ext
from fastalign.ops import rl as ops
from fastalign.reference import rl as ref
from helpers.accuracy import assert_close_3way
from helpers.inputs import policy_case, randn, random_mask, stable_seed
from helpers.rl import check_kl_loss, check_kl_loss_all_masked


def _toolchain() -> str | None:
    """Why the extension cannot be built here, or None."""
    from torch.utils.cpp_extension import is_ninja_available

    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler"
    if not is_ninja_available():
        return "ninja is not installed"
    return None


def _load_or_skip(*, build: bool):
    if _ext.status()[0]:
        return _ext.load()
    if not build:
        pytest.skip("fastalign._C is not built here: run `python -m fastalign.ext build` first (benchmarks/gpu_check.sh "
                    "has a stage for it) or set FASTALIGN_BUILD_EXT=1")
    why = _toolchain()
    if why is not None:
        pytest.skip(f"cannot build fastalign._C: {why}")
    return _ext.load(build=True)


@pytest.fixture(scope="session")
def ext():
    # CPU CI builds the C++ extension here; on a CUDA machine the build also compiles the CUDA kernels (about a
    # minute), which belongs to the GPU script's own build stage, not to the tests' time budget
    return _load_or_skip(build=not torch.cuda.is_available())


# B = 17: two interleaved blocks of 8 rows and a remainder row; T = 1; T above a CUDA tile (256)
SHAPES = [(1, 1), (3, 1), (9, 37), (17, 300)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("masked", [True, False])
def test_cpp_gae_matches_reference(ext, shape, dtype, masked):
    seed = stable_seed(shape, str(dtype), masked)
    r, v = randn(*shape, seed=seed, dtype=dtype), randn(*shape, seed=seed + 1, dtype=dtype)
    mask = random_mask(*shape, seed + 2) if masked else None
    adv, ret = fa.gae(r, v, mask, gamma=0.99, lam=0.95, backend="cpp")
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    same_adv, same_ret = ref.gae(r, v, mask, gamma=0.99, lam=0.95)
    assert adv.dtype == same_adv.dtype  # fp32, fp64 for fp64 inputs
    acc_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_3way(adv, same_adv, truth_adv, acc_dtype, name="advantages")
    assert_close_3way(ret, same_ret, truth_ret, acc_dtype, name="returns")


def test_cpp_gae_whiten_and_float_mask(ext):
    r, v = randn(6, 40, seed=1), randn(6, 40, seed=2)
    mask = random_mask(6, 40, 3).to(torch.float32)
    adv, ret = fa.gae(r, v, mask, gamma=1.0, lam=0.9, whiten=True, backend="cpp")
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=1.0, lam=0.9, whiten=True)
    torch.testing.assert_close(adv, truth_adv.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, truth_ret.float(), rtol=1e-5, atol=1e-5)


def _loss_and_grad(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    loss, stats = fn(x)
    (loss * upstream).backward()
    return loss, stats, x.grad


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("shape,per_sequence_adv,dual_clip", [
    ((9, 37), False, 3.0), ((3, 1), True, None), ((17, 300), True, 2.0),
])
def test_cpp_ppo_policy_loss_matches_reference(ext, agg, shape, per_sequence_adv, dual_clip):
    logp, old, adv, mask = policy_case(shape, stable_seed(agg, shape), per_sequence_adv)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
    upstream = -1.7
    loss, stats, grad = _loss_and_grad(
        lambda x: fa.ppo_policy_loss(x, old, adv, mask, backend="cpp", **kwargs), logp, upstream)
    same, same_stats, same_grad = _loss_and_grad(
        lambda x: ref.ppo_policy_loss(x, old, adv, mask, **kwargs), logp, upstream)
    truth, truth_stats, truth_grad = _loss_and_grad(
        lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), mask, **kwargs), logp.double(), upstream)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    for key in ref.POLICY_STATS:
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpp_ppo_policy_loss_other_dtypes(ext, dtype):
    logp, old, adv, mask = policy_case((7, 45), 11, False, dtype=dtype)
    loss, stats, grad = _loss_and_grad(
        lambda x: fa.ppo_policy_loss(x, old, adv, mask, dual_clip=3.0, agg="seq-mean-token-mean", backend="cpp"),
        logp, 1.0)
    truth, _, truth_grad = _loss_and_grad(
        lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), mask, dual_clip=3.0,
                                      agg="seq-mean-token-mean"), logp.double(), 1.0)
    assert grad.dtype == dtype
    if dtype == torch.float64:
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, truth, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, truth_grad, rtol=1e-12, atol=1e-14)
    else:  # fp32 math on bf16-exact inputs, the gradient rounded once to bf16
        torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-2, atol=1e-5)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_cpp_all_masked_is_zero_and_finite(ext, agg):
    logp = randn(4, 9, seed=12).requires_grad_()
    garbage = torch.full((4, 9), float("nan"))
    mask = torch.zeros(4, 9, dtype=torch.bool)
    loss, stats = fa.ppo_policy_loss(logp, garbage, garbage, mask, dual_clip=3.0, agg=agg, backend="cpp")
    loss.backward()
    assert loss.item() == 0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(torch.isfinite(s) and s.item() == 0 for s in stats.values())
    adv, _ = fa.gae(torch.zeros(4, 9), garbage.nan_to_num(), mask, backend="cpp")
    assert torch.equal(adv, torch.zeros_like(adv))


def _mask_as(mask, kind):
    """The same validity as bool / fp32 / int64 / uint8 (converted by the op) / None (all valid)."""
    if kind is None:
        return None
    return {"bool": mask, "float": mask.float(), "int64": mask.long(), "uint8": mask.to(torch.uint8)}[kind]


# T = 37: four 8-token vector steps and a ragged end of 5; T = 1; T = 300 (several flushes of the row partials)
@pytest.mark.parametrize("shape", [(9, 37), (3, 1), (17, 300)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int64", "uint8", None])
@pytest.mark.parametrize("per_sequence_adv,dual_clip", [(False, None), (True, 2.0)])
def test_cpp_ppo_policy_loss_mask_kinds_and_ragged_rows(ext, shape, mask_kind, per_sequence_adv, dual_clip):
    logp, old, adv, mask = policy_case(shape, stable_seed("kinds", shape, mask_kind), per_sequence_adv)
    m = _mask_as(mask, mask_kind)
    for agg in ("token-mean", "seq-mean-token-mean"):
        kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
        loss, stats, grad = _loss_and_grad(
            lambda x: fa.ppo_policy_loss(x, old, adv, m, backend="cpp", **kwargs), logp, 0.9)
        same, same_stats, same_grad = _loss_and_grad(
            lambda x: ref.ppo_policy_loss(x, old, adv, m, **kwargs), logp, 0.9)
        truth, truth_stats, truth_grad = _loss_and_grad(
            lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), m, **kwargs), logp.double(), 0.9)
        assert_close_3way(loss, same, truth, torch.float32, name=f"loss {agg}")
        assert_close_3way(grad, same_grad, truth_grad, torch.float32, name=f"grad {agg}")
        for key in ref.POLICY_STATS:
            assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


def test_cpp_ppo_policy_loss_garbage_under_the_mask_and_strided_inputs(ext):
    logp, old, adv, mask = policy_case((6, 41), 31, False)
    old_bad, adv_bad = old.clone(), adv.clone()
    old_bad[~mask] = float("nan")
    adv_bad[~mask] = float("inf")
    logp_t, old_t, adv_t = (x.t().contiguous().t() for x in (logp, old_bad, adv_bad))  # non-contiguous views
    assert not logp_t.is_contiguous()
    x = logp_t.detach().clone().requires_grad_()
    loss, stats = fa.ppo_policy_loss(x, old_t, adv_t, mask.float(), dual_clip=3.0, backend="cpp")
    loss.backward()
    y = logp.detach().clone().double().requires_grad_()
    truth, truth_stats = ref.ppo_policy_loss(y, old.double(), adv.double(), mask, dual_clip=3.0)
    truth.backward()
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-5, atol=1e-8)
    assert torch.equal(x.grad[~mask], torch.zeros_like(x.grad[~mask]))
    for key in ref.POLICY_STATS:
        torch.testing.assert_close(stats[key].double(), truth_stats[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("shape,clip", [((9, 37), 0.2), ((3, 1), None), ((17, 300), 0.5)])
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int64", None])
def test_cpp_value_loss_matches_reference(ext, agg, shape, clip, mask_kind):
    seed = stable_seed("value", agg, shape)
    values, old, returns = (randn(*shape, seed=seed + i) for i in range(3))
    old = values + 0.3 * (old - values)  # a share of the tokens inside the clip range, a share outside
    m = _mask_as(random_mask(*shape, seed=seed + 3), mask_kind)
    kwargs = dict(clip=clip, agg=agg)
    loss, stats, grad = _loss_and_grad(lambda x: fa.value_loss(x, old, returns, m, backend="cpp", **kwargs),
                                       values, -0.6)
    same, same_stats, same_grad = _loss_and_grad(lambda x: ref.value_loss(x, old, returns, m, **kwargs),
                                                 values, -0.6)
    truth, truth_stats, truth_grad = _loss_and_grad(
        lambda x: ref.value_loss(x, old.double(), returns.double(), m, **kwargs), values.double(), -0.6)
    assert loss.dtype == torch.float32 and loss.shape == () and grad.dtype == torch.float32
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    for key in ref.VALUE_STATS:
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cpp_value_loss_other_dtypes_and_forward_only(ext, dtype):
    values, old, returns = (randn(7, 45, seed=40 + i, dtype=dtype) for i in range(3))
    mask = random_mask(7, 45, seed=43)
    loss, stats, grad = _loss_and_grad(
        lambda x: fa.value_loss(x, old, returns, mask, clip=0.3, agg="seq-mean-token-mean", backend="cpp"),
        values, 1.0)
    truth, _, truth_grad = _loss_and_grad(
        lambda x: ref.value_loss(x, old.double(), returns.double(), mask, clip=0.3, agg="seq-mean-token-mean"),
        values.double(), 1.0)
    assert grad.dtype == dtype
    if dtype == torch.float64:
        assert loss.dtype == torch.float64
        torch.testing.assert_close(loss, truth, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, truth_grad, rtol=1e-12, atol=1e-14)
    else:
        torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-2, atol=1e-5)
    with torch.no_grad():
        loss_nograd, _ = fa.value_loss(values, old, returns, mask, clip=0.3, agg="seq-mean-token-mean",
                                       backend="cpp")
    torch.testing.assert_close(loss_nograd, loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_kl_penalty_matches_reference(ext, kind, dtype):
    # |d| below and above 1 (the k3 series / direct switch), an odd element count, a 3-d shape
    logp = randn(3, 5, 41, seed=90, dtype=dtype, scale=0.5)
    ref_lp = (logp.double() + randn(3, 5, 41, seed=91, scale=0.8, dtype=torch.float64)).to(dtype)
    upstream = randn(3, 5, 41, seed=92, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    x1, y1 = logp.clone().requires_grad_(), ref_lp.clone().requires_grad_()
    out = fa.kl_penalty(x1, y1, kind=kind, backend="cpp")
    (out * upstream).sum().backward()
    x2, y2 = logp.double().clone().requires_grad_(), ref_lp.double().clone().requires_grad_()
    truth = ref.kl_penalty(x2, y2, kind=kind)
    (truth * upstream.double()).sum().backward()
    x3, y3 = logp.clone().requires_grad_(), ref_lp.clone().requires_grad_()
    same = ref.kl_penalty(x3, y3, kind=kind)
    (same * upstream).sum().backward()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and x1.grad.dtype == y1.grad.dtype == dtype
    assert_close_3way(out, same, truth, acc, name="kl")
    assert_close_3way(x1.grad, x3.grad, x2.grad, dtype, name="grad logprobs")
    assert_close_3way(y1.grad, y3.grad, y2.grad, dtype, name="grad ref_logprobs")


def test_cpp_kl_penalty_strided_inputs_one_grad_and_expanded_upstream(ext):
    logp, ref_lp = randn(6, 9, seed=93), randn(6, 9, seed=94)
    logp_t = logp.t().contiguous().t()
    x = logp_t.clone().requires_grad_()  # only logprobs requires grad
    fa.kl_penalty(x, ref_lp, kind="k3", backend="cpp").sum().backward()  # upstream: an expanded tensor of ones
    torch.testing.assert_close(x.grad, -torch.expm1(ref_lp - logp))
    with torch.no_grad():
        out = fa.kl_penalty(logp_t, ref_lp, kind="k2", backend="cpp")
    torch.testing.assert_close(out, 0.5 * (ref_lp - logp) ** 2)
    assert fa.kl_penalty(torch.zeros(0, 3), torch.zeros(0, 3), backend="cpp").shape == (0, 3)


@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int64", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_cpp_kl_penalty_aggregated_matches_reference(ext, kind, agg, mask_kind, dtype):
    # T = 37 ends on a ragged block (16-token lanes); T = 300 flushes the lanes mid-row
    check_kl_loss("cpp", kind, agg, mask_kind, dtype)


@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (17, 300), (3, 2100)])
def test_cpp_kl_penalty_aggregated_strided_and_long_rows(ext, kind, shape):
    check_kl_loss("cpp", kind, "seq-mean-token-mean", "float", shape=shape, strided=shape[1] > 1)
    check_kl_loss("cpp", kind, "seq-mean-token-sum-norm", "bool", shape=shape, norm_len=5)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_cpp_kl_penalty_aggregated_all_masked(ext, agg):
    check_kl_loss_all_masked("cpp", agg)


def test_cpp_kl_penalty_aggregated_only_ref_logprobs_grad(ext):
    logp, ref_lp = randn(3, 10, seed=97), randn(3, 10, seed=98)
    mask = random_mask(3, 10, seed=99)
    y = ref_lp.clone().requires_grad_()
    fa.kl_penalty(logp, y, kind="k2", mask=mask, agg="seq-mean-token-sum", backend="cpp").backward()
    torch.testing.assert_close(y.grad, (ref_lp - logp) * mask / 3)


def test_cpp_kl_penalty_aggregated_auto_uses_cpp_and_refuses_a_second_backward(ext, monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    logp, ref_lp = randn(4, 9, seed=95), randn(4, 9, seed=96)
    x = logp.clone().requires_grad_()
    loss = fa.kl_penalty(x, ref_lp, kind="k2", agg="token-mean")
    torch.testing.assert_close(loss, fa.kl_penalty(logp, ref_lp, kind="k2", agg="token-mean", backend="cpp"),
                               rtol=0, atol=0)
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, (logp - ref_lp) / logp.numel())
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_cpp_value_loss_all_masked_is_zero_and_finite(ext, agg):
    values = randn(4, 9, seed=95).requires_grad_()
    garbage = torch.full((4, 9), float("nan"))
    for mask in (torch.zeros(4, 9, dtype=torch.bool), torch.zeros(4, 9), torch.zeros(4, 9, dtype=torch.long)):
        values.grad = None
        loss, stats = fa.value_loss(values, garbage, garbage, mask, clip=0.2, agg=agg, backend="cpp")
        loss.backward()
        assert loss.item() == 0 and torch.equal(values.grad, torch.zeros_like(values))
        assert all(torch.isfinite(s) and s.item() == 0 for s in stats.values())


def test_cpp_in_place_backward_refuses_a_second_backward(ext):
    logp, old, adv, mask = policy_case((3, 11), 63, True)
    x = logp.clone().requires_grad_()
    for op, out in (("ppo_policy_loss", fa.ppo_policy_loss(x, old, adv, mask, backend="cpp")[0]),
                    ("value_loss", fa.value_loss(x, old, old, mask, clip=0.2, backend="cpp")[0]),
                    ("kl_penalty", fa.kl_penalty(x, old, backend="cpp").sum())):
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=f"{op}: a second backward through the same graph"):
            out.backward()


def test_auto_uses_the_extension_for_every_cpu_rl_loss(ext, monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    for op, supports in (("value_loss", ops._CPU_EXT_OPS), ("kl_penalty", ops._CPU_EXT_OPS),
                         ("ppo_policy_loss", ops._EXT_OPS)):
        assert ops._resolve(op, "auto", (x,), supports=supports, dtype=torch.float32) == "cpp"
    values, old, returns = (randn(5, 12, seed=96 + i) for i in range(3))
    mask = random_mask(5, 12, seed=99)
    auto = fa.value_loss(values, old, returns, mask, clip=0.2)
    cpp = fa.value_loss(values, old, returns, mask, clip=0.2, backend="cpp")
    torch.testing.assert_close(auto, cpp, rtol=0, atol=0)
    torch.testing.assert_close(fa.kl_penalty(values, old), fa.kl_penalty(values, old, backend="cpp"), rtol=0,
                               atol=0)


def test_auto_uses_the_extension_on_cpu_when_built(ext, monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    x = torch.zeros(2, 3)
    assert _backend.resolve("auto", (x,), op="gae", supports=ops._EXT_OPS, prefer_extension=True) == "cpp"
    ok, why = _ext.status()
    assert ok and "loaded from" in why
    assert sys.modules["fastalign._C"] is ext
    r, v = randn(5, 12, seed=13), randn(5, 12, seed=14)
    torch.testing.assert_close(fa.gae(r, v), fa.gae(r, v, backend="cpp"), rtol=0, atol=0)


def test_extension_guards_name_the_argument(ext):
    x = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    cases = [
        (lambda: ext.gae(x, torch.zeros(2, 4), None, 1.0, 0.9), "values must have shape"),
        (lambda: ext.gae(x, x.double(), None, 1.0, 0.9), "values dtype"),
        (lambda: ext.gae(x, x, mask.float(), 1.0, 0.9), "mask must be a bool tensor"),
        (lambda: ext.gae(x, torch.zeros(3, 2).t(), None, 1.0, 0.9), "values must be contiguous"),
        (lambda: ext.gae(x, x, None, 2.0, 0.9), "gamma must lie in"),
        (lambda: ext.ppo_policy_loss_fwd(x, x, torch.zeros(3), mask, 0.2, 0.2, 0.0, 0, 3.0, True),
         "advantages must have shape"),
        (lambda: ext.ppo_policy_loss_fwd(x, x, x, mask, 0.0, 0.2, 0.0, 0, 3.0, True), "clip_low must be > 0"),
        (lambda: ext.ppo_policy_loss_fwd(x, x, x, mask, 0.2, 0.2, 0.5, 0, 3.0, True), "dual_clip must be > 1"),
        (lambda: ext.ppo_policy_loss_fwd(x, x, x, mask, 0.2, 0.2, 0.0, 7, 3.0, True), "agg must be"),
        (lambda: ext.ppo_policy_loss_bwd(x, torch.zeros(3), torch.ones(1)), "row_scale must have shape"),
        (lambda: ext.ppo_policy_loss_fwd(x, x, x, mask.double(), 0.2, 0.2, 0.0, 0, 3.0, True),
         "mask must be a bool, fp32 or int64"),
        (lambda: ext.value_loss_fwd(x, torch.zeros(3, 2).t(), x, mask, 0.2, 0, 3.0, True),
         "old_values must be contiguous"),
        (lambda: ext.value_loss_fwd(x, x, torch.zeros(2, 4), mask, 0.2, 0, 3.0, True), "returns must have shape"),
        (lambda: ext.value_loss_fwd(x, x, x, mask.to(torch.int32), 0.2, 0, 3.0, True),
         "mask must be a bool, fp32 or int64"),
        (lambda: ext.value_loss_fwd(x, x, x, mask, 0.2, 4, 3.0, True), "agg must be"),
        (lambda: ext.value_loss_fwd(x, x, x, None, float("nan"), 0, 3.0, True), "clip must be finite"),
        (lambda: ext.kl_penalty_fwd(x, x.double(), 2, True), "ref_logprobs dtype"),
        (lambda: ext.kl_penalty_fwd(x, torch.zeros(3, 2), 2, True), "ref_logprobs must have shape"),
        (lambda: ext.kl_penalty_fwd(x, x, 3, True), "kind must be 0, 1 or 2"),
        (lambda: ext.kl_loss_fwd(x, x.double(), None, 2, 0, 3.0, True), "ref_logprobs dtype"),
        (lambda: ext.kl_loss_fwd(x, torch.zeros(3, 2).t(), None, 2, 0, 3.0, True), "ref_logprobs must be contiguous"),
        (lambda: ext.kl_loss_fwd(torch.zeros(6), torch.zeros(6), None, 2, 0, 3.0, True), "logprobs must have shape"),
        (lambda: ext.kl_loss_fwd(x, x, mask.double(), 2, 0, 3.0, True), "mask must be a bool, fp32 or int64"),
        (lambda: ext.kl_loss_fwd(x, x, torch.ones(3, 2, dtype=torch.bool), 2, 0, 3.0, True), "mask must have shape"),
        (lambda: ext.kl_loss_fwd(x, x, mask, 3, 0, 3.0, True), "kind must be 0, 1 or 2"),
        (lambda: ext.kl_loss_fwd(x, x, mask, 2, 4, 3.0, True), "agg must be"),
        (lambda: ext.kl_loss_fwd(x, x, mask, 2, 3, 0.0, True), "norm_len must be > 0"),
    ]
    for fn, match in cases:
        with pytest.raises(RuntimeError, match=match):
            fn()


# ------------------------------------------------------------------------------------------------- fallback paths

def test_missing_extension_falls_back_with_one_warning(monkeypatch):
    monkeypatch.delenv("FASTALIGN_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "extension_status", lambda: (False, "fastalign._C is unavailable: test"))
    monkeypatch.setattr(ops, "_warned_fallback", False)
    r, v = randn(3, 8, seed=15), randn(3, 8, seed=16)
    logp, old, adv, mask = policy_case((3, 8), 17, True)
    with pytest.warns(RuntimeWarning, match="python -m fastalign.ext build") as record:
        adv_out, _ = fa.gae(r, v)
        loss, _ = fa.ppo_policy_loss(logp, old, adv, mask)
        fa.gae(r, v)
    assert len([w for w in record if "fastalign._C" in str(w.message)]) == 1
    torch.testing.assert_close(adv_out, ref.gae(r, v)[0])
    torch.testing.assert_close(loss, ref.ppo_policy_loss(logp, old, adv, mask)[0])
    with pytest.raises(RuntimeError, match="python -m fastalign.ext build"):
        fa.gae(r, v, backend="cpp")
    with pytest.raises(RuntimeError, match="python -m fastalign.ext build"):
        fa.ppo_policy_loss(logp, old, adv, mask, backend="cpp")
    # the value loss and the KL run the closed-form torch path
    vloss, _ = fa.value_loss(r, v, logp, mask, clip=0.2)
    torch.testing.assert_close(vloss, ref.value_loss(r, v, logp, mask, clip=0.2)[0])
    torch.testing.assert_close(fa.kl_penalty(logp, old), ref.kl_penalty(logp, old))
    with pytest.raises(RuntimeError, match="python -m fastalign.ext build"):
        fa.value_loss(r, v, logp, mask, backend="cpp")
    with pytest.raises(RuntimeError, match="python -m fastalign.ext build"):
        fa.kl_penalty(logp, old, backend="cpp")


def test_load_without_a_build_raises_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_unavailable", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setenv("FASTALIGN_EXT_DIR", str(tmp_path))
    monkeypatch.delenv("FASTALIGN_BUILD_EXT", raising=False)
    with pytest.raises(RuntimeError, match=r"not built .*python -m fastalign\.ext build"):
        _ext.load()
    ok, why = _ext.status()
    assert not ok and "not built" in why and str(tmp_path) in why
    assert _ext.build_dir().parent == tmp_path
    with pytest.raises(RuntimeError, match=r"python -m fastalign\.ext build"):
        fa.ppo_policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), backend="cpp")


def test_build_flag_builds_on_first_use(ext, monkeypatch, tmp_path):
    calls = []

    def fake_build(**kwargs):
        calls.append(kwargs)
        _ext._register(ext)
        return ext

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_unavailable", None)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "build", fake_build)
    monkeypatch.setenv("FASTALIGN_EXT_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("FASTALIGN_BUILD_EXT", "1")
    assert _ext.status()[0] and len(calls) == 1
    assert _ext.load() is ext and len(calls) == 1


def test_cli_status(ext, capsys):
    from fastalign.ext import main

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "fastalign._C: available" in out and "cache:" in out


# ------------------------------------------------------------------------------------------------------- CUDA

def _nvcc_include_stub(tmp_path: Path) -> list[str]:
    """CPU-only torch wheels ship the c10/cuda headers without the generated cuda_cmake_macros.h."""
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()]
    if not any(Path(p, "c10/cuda/impl/cuda_cmake_macros.h").is_file() for p in include_paths()):
        stub = tmp_path / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
        flags.append(f"-I{tmp_path}")
    return flags


@pytest.mark.slow  # 10-30 s of nvcc; the GPU script, which builds the real thing, deselects slow tests
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_sources_compile_for_sm90(tmp_path):
    """The CUDA kernels cannot run without a GPU; at least nvcc must accept them (sm_90a, like the GPU image).
    ``-cubin`` compiles the device code to SASS and runs the full C++ front end over the host code (an unknown
    member in a launcher fails it) while skipping the host compiler: a third of the time of ``-c``."""
    import sysconfig

    src = _ext.csrc_dir()
    cmd = ["nvcc", "-cubin", str(src / "rl" / "rl_cuda.cu"), "-o", str(tmp_path / "rl_cuda.cubin"), "-std=c++20",
           "-O3", "-DFASTALIGN_WITH_CUDA", f"-I{src}", f"-I{sysconfig.get_paths()['include']}", "-arch=sm_90a",
           *_nvcc_include_stub(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert proc.returncode == 0, "\n".join(errors[:20]) or proc.stderr[-3000:]
    assert (tmp_path / "rl_cuda.cubin").stat().st_size > 0


@pytest.mark.gpu
def test_cuda_extension_matches_reference():
    if not _ext.cuda_buildable()[0]:
        pytest.skip(f"CUDA extension not buildable: {_ext.cuda_buildable()[1]}")
    module = _load_or_skip(build=False)
    assert module.with_cuda()
    for shape in [(1, 1), (5, 255), (7, 257), (513, 2048), (33, 5000)]:
        r, v = randn(*shape, seed=20, device="cuda"), randn(*shape, seed=21, device="cuda")
        mask = random_mask(*shape, 22, device="cuda")
        for m in (mask, None):
            adv, ret = fa.gae(r, v, m, gamma=0.999, lam=0.95, backend="cuda")
            truth_adv, truth_ret = ref.gae(r.double(), v.double(), m, gamma=0.999, lam=0.95)
            same_adv, same_ret = ref.gae(r, v, m, gamma=0.999, lam=0.95)
            assert_close_3way(adv, same_adv, truth_adv, torch.float32, name=f"advantages {shape}", atol=1e-4)
            assert_close_3way(ret, same_ret, truth_ret, torch.float32, name=f"returns {shape}", atol=1e-4)
        for agg in ref.AGG_MODES:
            logp, old, adv2, mask2 = policy_case(shape, 23, shape[1] % 2 == 1, device="cuda")
            kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=3.0, agg=agg)
            loss, stats, grad = _loss_and_grad(
                lambda x: fa.ppo_policy_loss(x, old, adv2, mask2, backend="cuda", **kwargs), logp, 0.5)
            truth, truth_stats, truth_grad = _loss_and_grad(
                lambda x: ref.ppo_policy_loss(x, old.double(), adv2.double(), mask2, **kwargs), logp.double(), 0.5)
            torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-5, atol=1e-9)
            for key in ref.POLICY_STATS:
                torch.testing.assert_close(stats[key].double(), truth_stats[key], rtol=1e-5, atol=1e-6)
