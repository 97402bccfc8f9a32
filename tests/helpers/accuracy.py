"""The three-way accuracy rule (Cut Cross-Entropy, FlashAttention): a fast kernel must be at least about as close
to a float64 truth as plain PyTorch computing the same thing in the test dtype (docs/architecture.md, *Testing
rules*)."""
import torch

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
# One unit in the last place of the dtype, relative: a result *stored* in that dtype can be half an ulp off from
# storage alone, and a gradient whose dz is rounded to it (as every tensor-core path does) about one ulp more.
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float64: 2.0**-52}


def assert_close_3way(fast, same_dtype, truth, dtype, *, name="", factor=2.0, atol=None):
    """Element-wise |fast - truth| <= factor * |same_dtype - truth| + atol + ulp(dtype) * |truth|."""
    atol = ATOL[dtype] if atol is None else atol
    truth = truth.double()
    err_fast = (fast.double() - truth).abs()
    err_ref = (same_dtype.double() - truth).abs()
    bound = factor * err_ref + atol + ULP[dtype] * truth.abs()
    bad = err_fast > bound
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    assert not bad.any(), (
        f"{name}: {int(bad.sum())}/{bad.numel()} elements off; worst excess "
        f"{(err_fast - bound).max().item():.3e} (max err fast {err_fast.max().item():.3e}, "
        f"same-dtype torch {err_ref.max().item():.3e}, atol {atol})"
    )


def assert_close_3way_norm(fast, same_dtype, truth, dtype, *, name="", factor=2.0, atol=None):
    """The same rule over a whole tensor: ||fast - truth|| <= factor ||same_dtype - truth|| + (atol + ulp |truth|)
    in the 2-norm, the floor taken per element (sqrt(numel) atol).

    For quantities a whole network propagates (parameter gradients through the backbone, weights after some
    optimizer steps): each element's error is then a sum of many roundings, so either computation can be the luckier
    one at a single element, while an implementation bug shows in the norm."""
    atol = ATOL[dtype] if atol is None else atol
    truth = truth.double()
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast.double() - truth).norm().item()
    err_ref = (same_dtype.double() - truth).norm().item()
    floor = (atol + ULP[dtype] * truth.abs()).norm().item()
    assert err_fast <= factor * err_ref + floor, (
        f"{name}: error norm {err_fast:.3e} > {factor} x same-dtype torch {err_ref:.3e} + floor {floor:.3e}"
    )
