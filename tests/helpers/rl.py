"""The aggregated KL penalty (``kl_penalty(..., mask=, agg=)``) against the float64 reference, shared by the
torch / Triton tests (tests/ops/test_rl.py) and the C++ ones (tests/ops/test_rl_ext.py)."""
import torch

import fastalign as fa
from fastalign.reference import rl as ref
from helpers.accuracy import assert_close_3way
from helpers.inputs import randn, random_mask, stable_seed


def mask_as(mask, kind):
    return None if kind is None else {"bool": mask, "float": mask.float(), "int64": mask.long()}[kind]


def check_kl_loss(backend, kind, agg, mask_kind, dtype=torch.float32, shape=(5, 37), *, strided=False,
                  norm_len=None):
    """Loss and both gradients of the aggregated KL on ``backend`` against the fp64 reference (three-way rule);
    masked positions hold NaN; ``strided``: inputs in transposed storage."""
    seed = stable_seed(backend, kind, agg, mask_kind, str(dtype), shape, strided)
    logp = randn(*shape, seed=seed, dtype=dtype, scale=0.5)
    # |d| below and above 1 (the fp32 k3 series / direct switch)
    ref_lp = (logp.double() + randn(*shape, seed=seed + 1, scale=0.8, dtype=torch.float64)).to(dtype)
    valid = random_mask(*shape, seed=seed + 2)
    mask = mask_as(valid, mask_kind)
    if mask is not None:  # garbage under the mask must not reach the loss or the gradients
        logp, ref_lp = logp.masked_fill(~valid, float("nan")), ref_lp.masked_fill(~valid, float("inf"))
    if strided:
        logp, ref_lp = logp.t().contiguous().t(), ref_lp.t().contiguous().t()
        assert not logp.is_contiguous()
    upstream = 1.7
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    def run(fn, cast):
        x, y = cast(logp).detach().requires_grad_(), cast(ref_lp).detach().requires_grad_()
        loss = fn(x, y)
        (loss * upstream).backward()
        return loss.detach(), x.grad, y.grad

    out = run(lambda x, y: fa.kl_penalty(x, y, kind=kind, mask=mask, agg=agg, norm_len=norm_len, backend=backend),
              lambda t: t)
    truth = run(lambda x, y: ref.kl_penalty(x, y, kind=kind, mask=mask, agg=agg, norm_len=norm_len),
                lambda t: t.double())
    same = run(lambda x, y: ref.kl_penalty(x, y, kind=kind, mask=mask, agg=agg, norm_len=norm_len), lambda t: t)
    assert out[0].shape == () and out[0].dtype == acc
    assert out[1].dtype == out[2].dtype == dtype
    assert_close_3way(out[0], same[0], truth[0], acc, name="loss")
    for i, name in ((1, "grad logprobs"), (2, "grad ref_logprobs")):
        if mask is not None:
            assert torch.equal(out[i][~valid], torch.zeros_like(out[i][~valid])), f"{name}: nonzero where masked"
        assert_close_3way(out[i].nan_to_num(), same[i].nan_to_num(), truth[i].nan_to_num(), dtype, name=name)
    with torch.no_grad():  # the forward-only path: the same loss
        again = fa.kl_penalty(logp, ref_lp, kind=kind, mask=mask, agg=agg, norm_len=norm_len, backend=backend)
    torch.testing.assert_close(again, out[0], rtol=0, atol=0)


def check_kl_loss_all_masked(backend, agg):
    logp = randn(3, 7, seed=62).requires_grad_()
    garbage = torch.full((3, 7), float("nan"), requires_grad=True)
    for kind in ref.KL_KINDS:
        logp.grad = garbage.grad = None
        loss = fa.kl_penalty(logp, garbage, kind=kind, mask=torch.zeros(3, 7, dtype=torch.bool), agg=agg,
                             backend=backend)
        loss.backward()
        assert loss.item() == 0, kind
        assert torch.equal(logp.grad, torch.zeros_like(logp)), kind
        assert torch.equal(garbage.grad, torch.zeros_like(logp)), kind
