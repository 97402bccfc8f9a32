"""RL ops on the torch and Triton backends (the Triton kernels run in the interpreter on CPU) against the float64
reference: the three-way accuracy rule, gradients against autograd of the reference, masking, errors."""
import pytest
import torch

import fastalign as fa
from fastalign.kernels import rl as kernels
from fastalign.reference import rl as ref
from helpers.accuracy import assert_close_3way
from helpers.inputs import policy_case, randn, random_mask, stable_seed
from helpers.rl import check_kl_loss, check_kl_loss_all_masked

BACKENDS = ["torch", "triton"]
# odd B and T, T = 1, and T above one interpreter tile (GAE tiles 64 steps, the losses 256)
SHAPES = [(3, 1), (5, 37), (4, 300)]


def _grad_of(fn, x, upstream):
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out[0] * upstream).backward()
    return out, x.grad


# ------------------------------------------------------------------------------------------------------------ GAE

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [True, False])
def test_gae_matches_reference(backend, shape, masked, device):
    seed = stable_seed(shape, masked)
    r, v = randn(*shape, seed=seed, device=device), randn(*shape, seed=seed + 1, device=device)
    mask = random_mask(*shape, seed=seed + 2, device=device) if masked else None
    adv, ret = fa.gae(r, v, mask, gamma=0.99, lam=0.95, backend=backend)
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.99, lam=0.95)
    same_adv, same_ret = ref.gae(r, v, mask, gamma=0.99, lam=0.95)
    assert adv.dtype == ret.dtype == torch.float32
    assert_close_3way(adv, same_adv, truth_adv, torch.float32, name="advantages")
    assert_close_3way(ret, same_ret, truth_ret, torch.float32, name="returns")


def test_gae_many_tiles_carry_state():
    # tiles of 16 steps: the state crosses 4 tile boundaries, masked positions included
    r, v = randn(3, 61, seed=40), randn(3, 61, seed=41)
    mask = random_mask(3, 61, seed=42)
    mask[0, 14:20] = False  # a masked run across a tile boundary
    adv, ret = kernels.gae(r, v, mask, gamma=0.9, lam=0.7, block_t=16)
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.9, lam=0.7)
    same_adv, same_ret = ref.gae(r, v, mask, gamma=0.9, lam=0.7)
    assert_close_3way(adv, same_adv, truth_adv, torch.float32, name="advantages")
    assert_close_3way(ret, same_ret, truth_ret, torch.float32, name="returns")


@pytest.mark.parametrize("length,block_t", [(16, 16), (17, 16), (47, 16), (64, 16), (33, 32), (5, 8)])
@pytest.mark.parametrize("masked", [True, False])
def test_gae_reversed_tiles_any_length(length, block_t, masked):
    """Tiles of reversed time: T a multiple of the tile, one more, ragged; masked runs at both ends and across a
    tile boundary (the carried state), a masked last step (nv past the end is 0)."""
    seed = stable_seed("reversed", length, block_t, masked)
    r, v = randn(4, length, seed=seed), randn(4, length, seed=seed + 1)
    mask = random_mask(4, length, seed=seed + 2) if masked else None
    if masked:
        mask[0, :3] = False
        mask[1, -3:] = False
        mask[3, max(0, length - block_t - 2):length - block_t + 2] = False
    adv, ret = kernels.gae(r, v, mask, gamma=0.97, lam=0.9, block_t=block_t, whiten=False)
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.97, lam=0.9)
    same_adv, same_ret = ref.gae(r, v, mask, gamma=0.97, lam=0.9)
    assert_close_3way(adv, same_adv, truth_adv, torch.float32, name="advantages")
    assert_close_3way(ret, same_ret, truth_ret, torch.float32, name="returns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_whiten_and_low_precision_inputs(backend):
    r = randn(5, 23, seed=43, dtype=torch.bfloat16)
    v = randn(5, 23, seed=44, dtype=torch.bfloat16)
    mask = random_mask(5, 23, seed=45).to(torch.float32)  # a 0/1 float mask
    adv, ret = fa.gae(r, v, mask, gamma=1.0, lam=0.9, whiten=True, backend=backend)
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=1.0, lam=0.9, whiten=True)
    torch.testing.assert_close(adv, truth_adv.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ret, truth_ret.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,block_t", [((37, 45), 16), ((3, 1), None), ((4, 70), None)])
def test_triton_gae_whiten_merges_program_moments(shape, block_t):
    # B = 37 runs 3 programs of 16 rows: the per-program (n, mean, M2) are merged in a second kernel
    r, v = randn(*shape, seed=47) + 3.0, randn(*shape, seed=48)  # a mean far from 0 tests the M2 merge
    mask = random_mask(*shape, seed=49)
    adv, ret = kernels.gae(r, v, mask, gamma=0.95, lam=0.9, block_t=block_t, whiten=True)
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.95, lam=0.9, whiten=True)
    same_adv, _ = ref.gae(r, v, mask, gamma=0.95, lam=0.9, whiten=True)
    assert_close_3way(adv, same_adv, truth_adv, torch.float32, name="whitened advantages")
    torch.testing.assert_close(ret, truth_ret.float(), rtol=1e-5, atol=1e-5)
    all_masked = kernels.gae(r, v, torch.zeros_like(mask), gamma=0.95, lam=0.9, whiten=True)[0]
    assert torch.equal(all_masked, torch.zeros_like(all_masked))


def test_gae_kernel_backend_refuses_to_drop_gradients():
    v = randn(2, 5, seed=46).requires_grad_()
    with pytest.raises(RuntimeError, match="does not propagate gradients"):
        fa.gae(torch.zeros(2, 5), v, None, backend="triton")
    with torch.no_grad():
        fa.gae(torch.zeros(2, 5), v, None, backend="triton")
    adv, _ = fa.gae(torch.zeros(2, 5), v, None)  # auto: the differentiable reference
    adv.sum().backward()
    torch.testing.assert_close(v.grad, torch.autograd.grad(ref.gae(torch.zeros(2, 5), v)[0].sum(), v)[0])


# --------------------------------------------------------------------------------------------------- policy loss

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("shape,per_sequence_adv,dual_clip", [
    ((5, 37), False, 3.0), ((3, 1), True, None), ((4, 300), True, 2.5),
])
def test_ppo_policy_loss_matches_reference(backend, agg, shape, per_sequence_adv, dual_clip, device):
    logp, old, adv, mask = policy_case(shape, stable_seed(agg, shape), per_sequence_adv, device=device)
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(7)).item()

    (loss, stats), grad = _grad_of(lambda x: fa.ppo_policy_loss(x, old, adv, mask, backend=backend, **kwargs),
                                   logp, upstream)
    (same, same_stats), same_grad = _grad_of(lambda x: ref.ppo_policy_loss(x, old, adv, mask, **kwargs), logp, upstream)
    (truth, truth_stats), truth_grad = _grad_of(
        lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), mask, **kwargs), logp.double(), upstream)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    assert set(stats) == set(ref.POLICY_STATS)
    for key in ref.POLICY_STATS:
        assert not stats[key].requires_grad
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_policy_loss_forward_only_and_strided_inputs(backend):
    logp, old, adv, mask = policy_case((6, 19), 50, False)
    # transposed storage: non-contiguous views of every input
    logp_t, old_t, adv_t = (x.t().contiguous().t() for x in (logp, old, adv))
    assert not logp_t.is_contiguous()
    with torch.no_grad():
        loss, stats = fa.ppo_policy_loss(logp_t, old_t, adv_t, mask, agg="seq-mean-token-mean", backend=backend)
    expected, expected_stats = ref.ppo_policy_loss(logp, old, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(loss, expected)
    for key in ref.POLICY_STATS:
        torch.testing.assert_close(stats[key], expected_stats[key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_policy_loss_per_sequence_advantages_as_column(backend):
    logp, old, adv, mask = policy_case((4, 13), 52, True)
    loss_col, _ = fa.ppo_policy_loss(logp, old, adv[:, None], mask, backend=backend)
    loss_vec, _ = fa.ppo_policy_loss(logp, old, adv, mask, backend=backend)
    torch.testing.assert_close(loss_col, loss_vec, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ppo_policy_loss_bf16_logprobs(backend):
    logp, old, adv, mask = policy_case((5, 29), 51, True, dtype=torch.bfloat16, adv_dtype=torch.float32)
    (loss, _), grad = _grad_of(lambda x: fa.ppo_policy_loss(x, old, adv, mask, backend=backend), logp, 1.0)
    (truth, _), truth_grad = _grad_of(lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), mask),
                                      logp.double(), 1.0)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-5)  # math in fp32 on bf16-exact inputs
    torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-2, atol=1e-4)  # rounded once to bf16


# ---------------------------------------------------------------------------------------------------- value loss

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("shape,clip", [((5, 37), 0.2), ((3, 1), None), ((4, 300), 0.5)])
def test_value_loss_matches_reference(backend, agg, shape, clip):
    seed = stable_seed(agg, shape)
    values, old, returns = (randn(*shape, seed=seed + i) for i in range(3))
    mask = random_mask(*shape, seed=seed + 3)
    upstream = 0.37
    (loss, stats), grad = _grad_of(
        lambda x: fa.value_loss(x, old, returns, mask, clip=clip, agg=agg, backend=backend), values, upstream)
    (same, same_stats), same_grad = _grad_of(
        lambda x: ref.value_loss(x, old, returns, mask, clip=clip, agg=agg), values, upstream)
    (truth, truth_stats), truth_grad = _grad_of(
        lambda x: ref.value_loss(x, old.double(), returns.double(), mask, clip=clip, agg=agg), values.double(),
        upstream)
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    for key in ref.VALUE_STATS:
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


# ------------------------------------------------------------------------------- the closed-form torch path

def _mask_as(mask, kind):
    return None if kind is None else {"bool": mask, "float": mask.float(), "int64": mask.long()}[kind]


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int64", None])
@pytest.mark.parametrize("per_sequence_adv,dual_clip", [(False, 3.0), (True, None)])
def test_torch_policy_loss_masks_garbage_strided(agg, mask_kind, per_sequence_adv, dual_clip):
    """The torch path (closed form, no autograd graph): NaN / inf under the mask, transposed storage, gradients."""
    shape = (7, 23)
    logp, old, adv, mask = policy_case(shape, stable_seed("torch", agg, mask_kind), per_sequence_adv)
    m = _mask_as(mask, mask_kind)
    old_bad = old.clone()
    if mask_kind is not None:
        old_bad[~mask] = float("nan")
    logp_t, old_t = (x.t().contiguous().t() for x in (logp, old_bad))
    kwargs = dict(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=agg)
    (loss, stats), grad = _grad_of(lambda x: fa.ppo_policy_loss(x, old_t, adv, m, backend="torch", **kwargs),
                                   logp_t, -1.3)
    (same, same_stats), same_grad = _grad_of(lambda x: ref.ppo_policy_loss(x, old, adv, m, **kwargs), logp, -1.3)
    (truth, truth_stats), truth_grad = _grad_of(
        lambda x: ref.ppo_policy_loss(x, old.double(), adv.double(), m, **kwargs), logp.double(), -1.3)
    assert loss.dtype == torch.float32 and not loss.isnan()
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    for key in ref.POLICY_STATS:
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", "int64", None])
@pytest.mark.parametrize("clip", [0.2, None])
def test_torch_value_loss_masks_garbage_strided(agg, mask_kind, clip):
    shape = (6, 29)
    seed = stable_seed("torch-value", agg, mask_kind, clip)
    values, old, returns = (randn(*shape, seed=seed + i) for i in range(3))
    old = values + 0.3 * (old - values)  # tokens inside and outside the clip range
    mask = random_mask(*shape, seed=seed + 3)
    m = _mask_as(mask, mask_kind)
    returns_bad = returns.clone()
    if mask_kind is not None:
        returns_bad[~mask] = float("inf")
    values_t, old_t = (x.t().contiguous().t() for x in (values, old))
    kwargs = dict(clip=clip, agg=agg)
    (loss, stats), grad = _grad_of(lambda x: fa.value_loss(x, old_t, returns_bad, m, backend="torch", **kwargs),
                                   values_t, 0.8)
    (same, same_stats), same_grad = _grad_of(lambda x: ref.value_loss(x, old, returns, m, **kwargs), values, 0.8)
    (truth, truth_stats), truth_grad = _grad_of(
        lambda x: ref.value_loss(x, old.double(), returns.double(), m, **kwargs), values.double(), 0.8)
    assert_close_3way(loss, same, truth, torch.float32, name="loss")
    assert_close_3way(grad, same_grad, truth_grad, torch.float32, name="grad")
    for key in ref.VALUE_STATS:
        assert_close_3way(stats[key], same_stats[key], truth_stats[key], torch.float32, name=key)


def test_torch_losses_fp64_equal_the_reference():
    logp, old, adv, mask = policy_case((5, 17), 61, True, dtype=torch.float64)
    kwargs = dict(dual_clip=2.0, agg="seq-mean-token-mean")
    (loss, stats), grad = _grad_of(lambda x: fa.ppo_policy_loss(x, old, adv, mask, backend="torch", **kwargs),
                                   logp, 1.0)
    (truth, truth_stats), truth_grad = _grad_of(lambda x: ref.ppo_policy_loss(x, old, adv, mask, **kwargs), logp, 1.0)
    assert loss.dtype == grad.dtype == torch.float64
    torch.testing.assert_close(loss, truth, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, truth_grad, rtol=1e-12, atol=1e-14)
    for key in ref.POLICY_STATS:
        torch.testing.assert_close(stats[key], truth_stats[key], rtol=1e-12, atol=1e-14)
    (vloss, _), vgrad = _grad_of(lambda x: fa.value_loss(x, old, adv[:, None].expand(5, 17), mask, clip=0.1,
                                                         backend="torch"), logp, 1.0)
    (vtruth, _), vtruth_grad = _grad_of(lambda x: ref.value_loss(x, old, adv[:, None].expand(5, 17), mask, clip=0.1),
                                        logp, 1.0)
    torch.testing.assert_close(vloss, vtruth, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vgrad, vtruth_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["torch"])
def test_in_place_backward_refuses_a_second_backward(backend):
    """The CPU paths scale the saved derivative in place into the gradient: a retained graph cannot be walked twice;
    a fresh forward can."""
    logp, old, adv, mask = policy_case((3, 11), 62, False)
    x = logp.clone().requires_grad_()
    loss, _ = fa.ppo_policy_loss(x, old, adv, mask, backend=backend)
    vloss, _ = fa.value_loss(x, old, adv, mask, clip=0.2, backend=backend)
    kl = fa.kl_penalty(x, old, kind="k3", backend=backend).sum()
    for out, op in ((loss, "ppo_policy_loss"), (vloss, "value_loss"), (kl, "kl_penalty")):
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match=f"{op}: a second backward through the same graph"):
            out.backward()
    x.grad = None
    fa.ppo_policy_loss(x, old, adv, mask, backend=backend)[0].backward()
    (_, _), truth = _grad_of(lambda y: ref.ppo_policy_loss(y, old, adv, mask), logp, 1.0)
    torch.testing.assert_close(x.grad, truth)


# ----------------------------------------------------------------------------------------------- all-masked input

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_all_masked_batch_gives_zero_loss_zero_grad_finite_stats(backend, agg):
    logp = randn(3, 7, seed=60).requires_grad_()
    values = randn(3, 7, seed=61).requires_grad_()
    garbage = torch.full((3, 7), float("nan"))  # masked positions may hold anything
    mask = torch.zeros(3, 7, dtype=torch.bool)
    loss, stats = fa.ppo_policy_loss(logp, garbage, garbage, mask, dual_clip=3.0, agg=agg, backend=backend)
    vloss, vstats = fa.value_loss(values, garbage, garbage, mask, clip=0.2, agg=agg, backend=backend)
    (loss + vloss).backward()
    assert loss.item() == 0 and vloss.item() == 0
    assert torch.equal(logp.grad, torch.zeros_like(logp)) and torch.equal(values.grad, torch.zeros_like(values))
    for value in (*stats.values(), *vstats.values()):
        assert torch.isfinite(value) and value.item() == 0
    adv, ret = fa.gae(garbage.nan_to_num(), values.detach(), mask, backend=backend)
    assert torch.equal(adv, torch.zeros_like(adv))


# ---------------------------------------------------------------------------------------------------- KL penalty

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kl_penalty_matches_reference(backend, kind, dtype):
    # includes |d| < 0.1, where exp(d) - 1 - d cancels in fp32 and the kernel switches to the series
    logp = randn(15, 41, seed=70, dtype=dtype, scale=0.5)
    ref_lp = (logp.double() + randn(15, 41, seed=71, scale=0.05, dtype=torch.float64)).to(dtype)
    upstream = randn(15, 41, seed=72)
    x1, y1 = logp.clone().requires_grad_(), ref_lp.clone().requires_grad_()
    out = fa.kl_penalty(x1, y1, kind=kind, backend=backend)
    (out * upstream).sum().backward()
    x2, y2 = logp.double().requires_grad_(), ref_lp.double().requires_grad_()
    truth = ref.kl_penalty(x2, y2, kind=kind)
    (truth * upstream.double()).sum().backward()
    x3, y3 = logp.clone().requires_grad_(), ref_lp.clone().requires_grad_()
    same = ref.kl_penalty(x3, y3, kind=kind)
    (same * upstream).sum().backward()
    assert out.dtype == torch.float32 and x1.grad.dtype == dtype
    assert_close_3way(out, same, truth, torch.float32, name="kl")
    assert_close_3way(x1.grad, x3.grad, x2.grad, dtype, name="grad logprobs")
    assert_close_3way(y1.grad, y3.grad, y2.grad, dtype, name="grad ref_logprobs")


def test_kl_penalty_any_shape_and_expanded_upstream():
    logp, ref_lp = randn(4, 6, seed=73).view(2, 2, 6), randn(4, 6, seed=74).view(2, 2, 6)
    x = logp.clone().requires_grad_()
    fa.kl_penalty(x, ref_lp, kind="k3", backend="triton").sum().backward()  # upstream: an expanded tensor of ones
    expected = -torch.expm1(ref_lp - logp)
    torch.testing.assert_close(x.grad, expected)


# -------------------------------------------------------------------------------------------------- group advantages

@pytest.mark.parametrize("scale", ref.GROUP_SCALES)
def test_group_advantages_public(scale):
    r = randn(15, 1, seed=80)[:, 0]
    torch.testing.assert_close(fa.group_advantages(r, 5, scale=scale), ref.group_advantages(r, 5, scale=scale))


# ---------------------------------------------------------------------------------------------------------- errors

def _errors():
    x = torch.zeros(2, 3)
    return [
        (lambda: fa.gae(x, torch.zeros(2, 4)), ValueError, "values must have shape"),
        (lambda: fa.gae(x, x, torch.ones(3, 2)), ValueError, "mask must have shape"),
        (lambda: fa.gae(x, x.long()), TypeError, "values must be fp16/bf16/fp32/fp64"),
        (lambda: fa.gae(x, x, gamma=1.5), ValueError, "gamma must lie in"),
        (lambda: fa.gae(x, x, lam=-0.1), ValueError, "lam must lie in"),
        (lambda: fa.gae(torch.zeros(3), torch.zeros(3)), ValueError, "rewards must have shape"),
        (lambda: fa.gae(x, x, backend="nope"), ValueError, "backend must be one of"),
        (lambda: fa.gae(x, x.to("meta")), ValueError, "values is on meta"),
        (lambda: fa.group_advantages(torch.zeros(7), 2), ValueError, "multiple of group_size"),
        (lambda: fa.group_advantages(torch.zeros(8), 0), ValueError, "group_size must be"),
        (lambda: fa.group_advantages(torch.zeros(8), 2, scale="std"), ValueError, "scale must be one of"),
        (lambda: fa.ppo_policy_loss(x, x, torch.zeros(3)), ValueError, "advantages must have shape"),
        (lambda: fa.ppo_policy_loss(x, torch.zeros(2, 2), x), ValueError, "old_logprobs must have shape"),
        (lambda: fa.ppo_policy_loss(x, x, x, clip_low=0.0), ValueError, "clip_low must be > 0"),
        (lambda: fa.ppo_policy_loss(x, x, x, clip_high=-0.2), ValueError, "clip_high must be > 0"),
        (lambda: fa.ppo_policy_loss(x, x, x, dual_clip=0.5), ValueError, "dual_clip must be > 1"),
        (lambda: fa.ppo_policy_loss(x, x, x, agg="mean"), ValueError, "agg must be one of"),
        (lambda: fa.ppo_policy_loss(x, x, x, norm_len=0), ValueError, "norm_len must be"),
        (lambda: fa.ppo_policy_loss(x, x, x, torch.ones(2, 3, dtype=torch.complex64)), TypeError, "mask must be"),
        (lambda: fa.value_loss(x, x, x, clip=0), ValueError, "clip must be > 0"),
        (lambda: fa.value_loss(x, x, torch.zeros(1, 3)), ValueError, "returns must have shape"),
        (lambda: fa.kl_penalty(x, torch.zeros(3, 2)), ValueError, "ref_logprobs must have shape"),
        (lambda: fa.kl_penalty(x, x, kind="k4"), ValueError, "kind must be one of"),
        (lambda: fa.value_loss(x, x, x, backend="cuda"), ValueError, "not implemented for this op"),
        (lambda: fa.kl_penalty(x, x, backend="cuda"), ValueError, "not implemented for this op"),
        (lambda: fa.ppo_policy_loss(x.double(), x, x, backend="triton"), TypeError, "fp64"),
        (lambda: fa.ppo_policy_loss(x, x, x.clone().requires_grad_()), ValueError, "advantages requires grad"),
        (lambda: fa.ppo_policy_loss(x, x.clone().requires_grad_(), x, backend="triton"), ValueError,
         "old_logprobs requires grad"),
        (lambda: fa.value_loss(x, x, x.clone().requires_grad_(), backend="triton"), ValueError,
         "returns requires grad"),
    ]


@pytest.mark.parametrize("case", range(len(_errors())))
def test_bad_inputs_raise_naming_the_argument(case):
    fn, exc, match = _errors()[case]
    with pytest.raises(exc, match=match):
        fn()


# ------------------------------------------------------------------------------------------ sm_90a compile check
# Every RL launcher at B=512, T=2048 on meta tensors, compiled as launched (fastalign.kernels.compiled); register
# bounds a thread per kernel.
RL_REGISTER_BOUNDS = {
    "gae": {"_gae_fwd_kernel": 224, "_whiten_combine_kernel": 64, "_whiten_apply_kernel": 64},
    "ppo_loss": {"_rl_loss_fwd_kernel": 128, "_rl_loss_finalize_kernel": 64, "_rl_loss_bwd_kernel": 32},
    "value_loss": {"_rl_loss_fwd_kernel": 96, "_rl_loss_finalize_kernel": 64, "_rl_loss_bwd_kernel": 32},
    "kl": {"_kl_fwd_kernel": 64, "_kl_bwd_kernel": 64},
}


@pytest.fixture(scope="module")
def compiled():
    pytest.importorskip("triton")
    from helpers.compile import compile_cases

    return compile_cases(list(RL_REGISTER_BOUNDS))


@pytest.mark.compile
@pytest.mark.parametrize("case", list(RL_REGISTER_BOUNDS))
def test_rl_kernels_compile_for_sm90a_as_launched(compiled, case):
    reports = compiled[case]
    assert {r["kernel"] for r in reports} == set(RL_REGISTER_BOUNDS[case]), reports
    for r in reports:
        where = f"{case}/{r['kernel']} {r['config']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == r["local"] == 0, f"{where} spills: {r}"
        assert r["smem"] <= 227 * 1024 and r["membar_gpu"] == 0, where
        assert r["regs"] <= RL_REGISTER_BOUNDS[case][r["kernel"]], f"{where}: {r['regs']} registers"


@pytest.mark.compile
def test_gae_compiles_without_a_reverse_scan(compiled):
    """triton-lang/triton#4362: non-commutative reverse scans can be wrong on the GPU; GAE's scans run forward
    on tiles loaded in reversed time order (checked in the TTIR: no ``tt.scan`` with ``reverse = true``)."""
    gae = next(r for r in compiled["gae"] if r["kernel"] == "_gae_fwd_kernel")
    assert gae["reverse_scan"] is False


# ------------------------------------------------------------------------------------------------------------ GPU

@pytest.mark.gpu
def test_gpu_reverse_scan_and_losses_at_scale(device):
    # Triton issue #4362 reports wrong GPU results for some non-commutative reverse scans: check the real thing
    shape = (64, 3001)
    r, v = randn(*shape, seed=90, device=device), randn(*shape, seed=91, device=device)
    mask = random_mask(*shape, seed=92, device=device)
    adv, ret = fa.gae(r, v, mask, gamma=0.999, lam=0.95, backend="triton")
    truth_adv, truth_ret = ref.gae(r.double(), v.double(), mask, gamma=0.999, lam=0.95)
    same_adv, same_ret = ref.gae(r, v, mask, gamma=0.999, lam=0.95)
    assert_close_3way(adv, same_adv, truth_adv, torch.float32, name="advantages", atol=1e-4)
    assert_close_3way(ret, same_ret, truth_ret, torch.float32, name="returns", atol=1e-4)
    logp, old, adv2, mask2 = policy_case((512, 2048), 93, False, device=device)
    for agg in ref.AGG_MODES:
        (loss, _), grad = _grad_of(lambda x: fa.ppo_policy_loss(x, old, adv2, mask2, dual_clip=3.0, agg=agg,
                                                                backend="triton"), logp, 1.0)
        (truth, _), truth_grad = _grad_of(lambda x: ref.ppo_policy_loss(x, old.double(), adv2.double(), mask2,
                                                                        dual_clip=3.0, agg=agg), logp.double(), 1.0)
        torch.testing.assert_close(loss.double(), truth, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad.double(), truth_grad, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------------------------------- aggregated KL penalty

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
@pytest.mark.parametrize("mask_kind", ["bool", "float", None])
def test_kl_penalty_aggregated_matches_reference(backend, kind, agg, mask_kind):
    check_kl_loss(backend, kind, agg, mask_kind)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ref.KL_KINDS)
def test_kl_penalty_aggregated_strided_bf16_long_rows(backend, kind):
    check_kl_loss(backend, kind, "seq-mean-token-mean", "bool", torch.bfloat16, shape=(4, 300), strided=True)
    check_kl_loss(backend, kind, "seq-mean-token-sum-norm", "float", shape=(3, 1), norm_len=7)


@pytest.mark.parametrize("kind", ref.KL_KINDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_torch_kl_penalty_aggregated_fp64(kind, agg):
    check_kl_loss("torch", kind, agg, "int64", torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_kl_penalty_aggregated_all_masked(backend, agg):
    check_kl_loss_all_masked(backend, agg)


def test_kl_penalty_aggregated_only_logprobs_grad_and_refused_second_backward():
    logp, ref_lp = randn(4, 9, seed=75), randn(4, 9, seed=76)
    x = logp.clone().requires_grad_()
    loss = fa.kl_penalty(x, ref_lp, kind="k3", agg="token-mean", backend="torch")
    loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, -torch.expm1(ref_lp - logp) / logp.numel())
    with pytest.raises(RuntimeError, match="second backward"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kl_penalty_aggregated_only_ref_logprobs_grad(backend):
    logp, ref_lp = randn(3, 10, seed=77), randn(3, 10, seed=78)
    mask = random_mask(3, 10, seed=79)
    y = ref_lp.clone().requires_grad_()
    fa.kl_penalty(logp, y, kind="k2", mask=mask, agg="seq-mean-token-sum", backend=backend).backward()
    torch.testing.assert_close(y.grad, (ref_lp - logp) * mask / 3)


def _kl_agg_errors():
    x = torch.zeros(2, 3)
    return [
        (lambda: fa.kl_penalty(x, x, agg="mean"), ValueError, "kl_penalty: agg must be one of"),
        (lambda: fa.kl_penalty(x, x, mask=torch.ones(3, 2), agg="token-mean"), ValueError,
         "kl_penalty: mask must have shape"),
        (lambda: fa.kl_penalty(x, x, mask=torch.ones(2, 3)), ValueError, "kl_penalty: mask is only used with agg"),
        (lambda: fa.kl_penalty(x, x, norm_len=4), ValueError, "kl_penalty: norm_len is only used with agg"),
        (lambda: fa.kl_penalty(x, x, agg="seq-mean-token-sum-norm", norm_len=0), ValueError, "norm_len must be"),
        (lambda: fa.kl_penalty(torch.zeros(6), torch.zeros(6), agg="token-mean"), ValueError,
         r"logprobs must have shape \(B, T\)"),
        (lambda: fa.kl_penalty(x, x, mask=torch.ones(2, 3, dtype=torch.complex64), agg="token-mean"), TypeError,
         "mask must be"),
        (lambda: fa.kl_penalty(x, x, kind="k4", agg="token-mean"), ValueError, "kind must be one of"),
        (lambda: fa.kl_penalty(x, x, agg="token-mean", backend="cuda"), ValueError, "not implemented for this op"),
        (lambda: fa.kl_penalty(x.double(), x, agg="token-mean", backend="triton"), TypeError, "fp64"),
    ]


@pytest.mark.parametrize("case", range(len(_kl_agg_errors())))
def test_kl_penalty_aggregated_bad_inputs_raise_naming_the_argument(case):
    fn, exc, match = _kl_agg_errors()[case]
    with pytest.raises(exc, match=match):
        fn()
