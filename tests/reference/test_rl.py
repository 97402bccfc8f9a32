"""The RL references in float64: hand-derived cases, the upstream (verl / TRL) formulas, gradchecks, masking."""
import math

import pytest
import torch

from fastalign.reference import rl as ref

F64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64) * scale


def _rand_mask(batch, length, seed=0, p=0.3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) > p
    mask[batch // 2] = False  # one all-masked row
    return mask


def verl_gae_loop(rewards, values, mask, gamma, lam):
    """verl's compute_gae_advantage_return (verl/trainer/ppo/core_algos.py), written out from its documented
    recurrence with a float mask: nextvalues / lastgaelam blend with the mask at each step."""
    m = mask.to(rewards.dtype)
    nextvalues = torch.zeros_like(rewards[:, 0])
    lastgaelam = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * m[:, t] + (1 - m[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * m[:, t] + (1 - m[:, t]) * lastgaelam
        out.append(lastgaelam)
    adv = torch.stack(out[::-1], dim=1)
    return adv, adv + values


# ------------------------------------------------------------------------------------------------------------ GAE

def test_gae_hand_derived():
    # one row, T = 3, gamma = 0.5, lam = 0.5 (gamma * lam = 0.25), all valid:
    #   t=2: delta = r2 + 0.5 * 0 - V2 = 1 - 2 = -1;                          A2 = -1
    #   t=1: delta = r1 + 0.5 * V2 - V1 = 0 + 1 - 1 = 0;  A1 = 0 + 0.25 * -1 = -0.25
    #   t=0: delta = r0 + 0.5 * V1 - V0 = 2 + 0.5 - 1 = 1.5; A0 = 1.5 + 0.25 * -0.25 = 1.4375
    r = torch.tensor([[2.0, 0.0, 1.0]], dtype=F64)
    v = torch.tensor([[1.0, 1.0, 2.0]], dtype=F64)
    adv, ret = ref.gae(r, v, None, gamma=0.5, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.4375, -0.25, -1.0]], dtype=F64))
    torch.testing.assert_close(ret, adv + v)


def test_gae_masked_position_carries_advantage_and_next_value():
    # mask [1, 0, 1], gamma = 1, lam = 1:
    #   t=2 (valid): delta = r2 - V2 = 3 - 1 = 2, A2 = 2, nv = V2 = 1
    #   t=1 (masked): A1 = A2 = 2 carried; nv stays V2 = 1 (not V1 = 100)
    #   t=0 (valid): delta = r0 + nv - V0 = 0 + 1 - 0.5 = 0.5, A0 = 0.5 + A1 = 2.5
    # returns = A + V at every position, the masked one included (verl): [3, 102, 3]
    r = torch.tensor([[0.0, 7.0, 3.0]], dtype=F64)
    v = torch.tensor([[0.5, 100.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 0, 1]])
    adv, ret = ref.gae(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.5, 2.0, 2.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[3.0, 102.0, 3.0]], dtype=F64))


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (6, 33)])
def test_gae_matches_verl_loop(shape):
    r, v = _rand(*shape, seed=1), _rand(*shape, seed=2)
    mask = _rand_mask(*shape, seed=3)
    adv, ret = ref.gae(r, v, mask, gamma=0.97, lam=0.9)
    adv_verl, ret_verl = verl_gae_loop(r, v, mask, 0.97, 0.9)
    torch.testing.assert_close(adv, adv_verl)
    torch.testing.assert_close(ret, ret_verl)


def test_gae_whiten_is_verl_masked_whiten():
    r, v = _rand(4, 9, seed=4), _rand(4, 9, seed=5)
    mask = _rand_mask(4, 9, seed=6)
    adv, _ = ref.gae(r, v, mask, gamma=1.0, lam=0.95)
    white, _ = ref.gae(r, v, mask, gamma=1.0, lam=0.95, whiten=True)
    # verl masked_whiten: masked mean, masked variance with Bessel's correction, rsqrt(var + 1e-8)
    sel = adv[mask]
    expected = (adv - sel.mean()) * torch.rsqrt(sel.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(white, expected)
    assert abs(white[mask].mean().item()) < 1e-12


def test_gae_gradcheck():
    r = _rand(2, 5, seed=7).requires_grad_()
    v = _rand(2, 5, seed=8).requires_grad_()
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    assert torch.autograd.gradcheck(lambda a, b: ref.gae(a, b, mask, gamma=0.9, lam=0.8), (r, v))
    assert torch.autograd.gradcheck(lambda a, b: ref.gae(a, b, mask, gamma=0.9, lam=0.8, whiten=True)[0], (r, v))


# ------------------------------------------------------------------------------------------------ group advantages

def test_group_advantages_hand_derived():
    # one group of G = 3: r = [1, 2, 6], mean 3, unbiased std sqrt(((-2)^2 + (-1)^2 + 3^2) / 2) = sqrt(7)
    r = torch.tensor([1.0, 2.0, 6.0], dtype=F64)
    torch.testing.assert_close(ref.group_advantages(r, 3, scale="none"), torch.tensor([-2.0, -1.0, 3.0], dtype=F64))
    torch.testing.assert_close(ref.group_advantages(r, 3, scale="group", eps=0.0),
                               torch.tensor([-2.0, -1.0, 3.0], dtype=F64) / math.sqrt(7))
    # RLOO: r_i - mean of the others: 1 - 4, 2 - 3.5, 6 - 1.5
    torch.testing.assert_close(ref.group_advantages(r, 3, scale="rloo"), torch.tensor([-3.0, -1.5, 4.5], dtype=F64))


def nanstd(x, dim=None):
    """TRL 1.16 trl.trainer.utils.nanstd for NaN-free input: sqrt(mean((x - mean)^2) * n / (n - 1)). Importing TRL
    takes ~10 s here, so only test_group_advantages_std_is_trls does it, to check that the two agree."""
    mean = x.mean() if dim is None else x.mean(dim, keepdim=True)
    n = x.numel() if dim is None else x.shape[dim]
    var = ((x - mean) ** 2).mean() if dim is None else ((x - mean) ** 2).mean(dim)
    return (var * n / (n - 1)).sqrt()


@pytest.mark.slow
def test_group_advantages_std_is_trls():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    x = _rand(3, 5, seed=32)
    torch.testing.assert_close(trl_utils.nanstd(x, dim=1), nanstd(x, dim=1))
    torch.testing.assert_close(trl_utils.nanstd(x), nanstd(x))


def test_group_advantages_match_trl():
    G = 4
    r = _rand(12, seed=9)
    # TRL 1.16 GRPOTrainer._generate_and_score_completions, scale_rewards in {"group", "batch", "none"}:
    #   mean_grouped = nanmean(rewards.view(-1, G), 1).repeat_interleave(G); advantages = rewards - mean_grouped;
    #   "group": / (nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G) + 1e-4); "batch": / (nanstd(r) + 1e-4)
    mean = torch.nanmean(r.view(-1, G), dim=1).repeat_interleave(G)
    std_group = nanstd(r.view(-1, G), dim=1).repeat_interleave(G)
    torch.testing.assert_close(ref.group_advantages(r, G, scale="group", eps=1e-4), (r - mean) / (std_group + 1e-4))
    torch.testing.assert_close(ref.group_advantages(r, G, scale="batch", eps=1e-4), (r - mean) / (nanstd(r) + 1e-4))
    torch.testing.assert_close(ref.group_advantages(r, G, scale="none"), r - mean)
    # TRL 1.16 RLOOTrainer: baselines = (grouped_sum - grouped_rewards) / (G - 1); advantages = rewards - baselines
    grouped = r.view(-1, G)
    baselines = ((grouped.sum(1, keepdim=True) - grouped) / (G - 1)).view(-1)
    torch.testing.assert_close(ref.group_advantages(r, G, scale="rloo"), r - baselines)


def test_group_advantages_group_of_one_is_zero():
    r = _rand(5, seed=10)
    for scale in ref.GROUP_SCALES:
        assert torch.equal(ref.group_advantages(r, 1, scale=scale), torch.zeros_like(r))


def test_group_advantages_gradcheck():
    r = _rand(6, seed=11).requires_grad_()
    for scale in ref.GROUP_SCALES:
        assert torch.autograd.gradcheck(lambda x: ref.group_advantages(x, 3, scale=scale), (r,))


# ------------------------------------------------------------------------------------------------- policy loss

def test_ppo_policy_loss_hand_derived():
    # 1 x 4 tokens, clip_low = 0.2, clip_high = 0.3, dual_clip = 2:
    #   t0: A = +1, ratio e^0.5 = 1.6487 > 1.3: clipped branch -1.3 beats -1.6487     -> l = -1.3, high clip
    #   t1: A = -1, ratio e^-0.5 = 0.6065 < 0.8: -A * clip = 0.8 beats 0.6065          -> l = 0.8, low clip
    #   t2: A = -1, ratio e^1.0 = 2.7183: l = max(2.7183, 1.3) = 2.7183 > -A c = 2     -> l = 2 (dual clip)
    #   t3: A = +2, ratio 1: l = -2
    # token-mean: (-1.3 + 0.8 + 2 - 2) / 4 = -0.125
    logp = torch.tensor([[0.5, -0.5, 1.0, 0.0]], dtype=F64)
    old = torch.zeros_like(logp)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], dtype=F64)
    loss, stats = ref.ppo_policy_loss(logp, old, adv, None, clip_low=0.2, clip_high=0.3, dual_clip=2.0)
    assert loss.item() == pytest.approx(-0.125)
    assert stats["clip_frac_high"].item() == pytest.approx(0.25)
    assert stats["clip_frac_low"].item() == pytest.approx(0.25)
    assert stats["clip_frac"].item() == pytest.approx(0.5)
    assert stats["dual_clip_frac"].item() == pytest.approx(0.25)
    assert stats["approx_kl"].item() == pytest.approx(-(0.5 - 0.5 + 1.0 + 0.0) / 4)
    assert stats["ratio_max"].item() == pytest.approx(math.e)
    assert stats["ratio_min"].item() == pytest.approx(math.exp(-0.5))
    # gradient: only the unclipped t3 moves: d(-A ratio)/d logp = -2 * 1, / 4 tokens
    logp.requires_grad_()
    ref.ppo_policy_loss(logp, old, adv, None, clip_low=0.2, clip_high=0.3, dual_clip=2.0)[0].backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0, -0.5]], dtype=F64))


def test_aggregation_modes_hand_derived():
    # per-token losses l = [[1, 2, 3], [4, 5, 6]] with mask [[1, 1, 0], [1, 0, 0]]:
    #   token-mean: (1 + 2 + 4) / 3; seq-mean-token-sum: ((1 + 2) + 4) / 2;
    #   seq-mean-token-mean: ((1 + 2) / 2 + 4 / 1) / 2; seq-mean-token-sum-norm: (3 + 4) / (2 * 3), or / (2 * 10)
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]]) != 0
    assert ref.aggregate(loss, valid, "token-mean").item() == pytest.approx(7 / 3)
    assert ref.aggregate(loss, valid, "seq-mean-token-sum").item() == pytest.approx(3.5)
    assert ref.aggregate(loss, valid, "seq-mean-token-mean").item() == pytest.approx(2.75)
    assert ref.aggregate(loss, valid, "seq-mean-token-sum-norm").item() == pytest.approx(7 / 6)
    assert ref.aggregate(loss, valid, "seq-mean-token-sum-norm", norm_len=10).item() == pytest.approx(7 / 20)


def test_ppo_policy_loss_matches_trl_grpo_loss_types():
    # TRL 1.16 GRPOTrainer._compute_loss (token-level importance sampling, delta=None, beta=0):
    #   coef_1 = exp(logp - old); coef_2 = clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    #   per_token_loss = -min(coef_1 * A, coef_2 * A)
    #   "grpo": ((l * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean(); "bnpo": (l * mask).sum() / mask.sum().clamp(1)
    #   "dr_grpo": (l * mask).sum() / (B * max_completion_length)
    B, T = 4, 11
    logp, old = _rand(B, T, seed=12, scale=0.3), _rand(B, T, seed=13, scale=0.3)
    adv = _rand(B, seed=14)[:, None]
    mask = _rand_mask(B, T, seed=15).to(F64)
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    trl = {
        "seq-mean-token-mean": ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),
        "token-mean": (per_token * mask).sum() / mask.sum().clamp(min=1.0),
        "seq-mean-token-sum-norm": (per_token * mask).sum() / (B * T),
    }
    for agg, expected in trl.items():
        loss, _ = ref.ppo_policy_loss(logp, old, adv[:, 0], mask, clip_low=0.2, clip_high=0.28, agg=agg)
        torch.testing.assert_close(loss, expected)


def test_ppo_policy_loss_matches_verl_formula():
    # verl compute_policy_loss (vanilla): pg_losses = where(A < 0, min(max(l1, l2), -A * clip_ratio_c), max(l1, l2))
    # pg_clipfrac = masked_mean(l2 > l1); pg_clipfrac_lower = masked_mean((max(l1, l2) > -A c) * (A < 0)); ppo_kl =
    # masked_mean(old - logp)
    B, T = 3, 8
    logp, old, adv = _rand(B, T, seed=16, scale=0.5), _rand(B, T, seed=17, scale=0.5), _rand(B, T, seed=18)
    mask = _rand_mask(B, T, seed=19)
    ratio = torch.exp(logp - old)
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.25)
    clip1 = torch.maximum(l1, l2)
    l3 = -adv * 3.0
    pg = torch.where(adv < 0, torch.minimum(clip1, l3), clip1)
    loss, stats = ref.ppo_policy_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.25, dual_clip=3.0)
    torch.testing.assert_close(loss, pg[mask].mean())
    torch.testing.assert_close(stats["clip_frac"], (l2 > l1)[mask].to(F64).mean())
    torch.testing.assert_close(stats["dual_clip_frac"], ((clip1 > l3) & (adv < 0))[mask].to(F64).mean())
    torch.testing.assert_close(stats["approx_kl"], (old - logp)[mask].mean())


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_ppo_policy_loss_gradcheck(agg):
    logp = _rand(3, 5, seed=20, scale=0.4).requires_grad_()
    old, adv = _rand(3, 5, seed=21, scale=0.4), _rand(3, 5, seed=22)
    mask = _rand_mask(3, 5, seed=23)

    def fn(x):
        return ref.ppo_policy_loss(x, old, adv, mask, clip_low=0.2, clip_high=0.3, dual_clip=3.0, agg=agg)[0]

    assert torch.autograd.gradcheck(fn, (logp,))


@pytest.mark.parametrize("agg", ref.AGG_MODES)
def test_all_masked_batch_is_zero_and_finite(agg):
    logp = _rand(2, 4, seed=24).requires_grad_()
    values = _rand(2, 4, seed=25).requires_grad_()
    garbage = torch.full((2, 4), float("inf"), dtype=F64)  # masked positions may hold anything
    mask = torch.zeros(2, 4, dtype=torch.bool)
    loss, stats = ref.ppo_policy_loss(logp, garbage, garbage, mask, dual_clip=3.0, agg=agg)
    vloss, vstats = ref.value_loss(values, garbage, garbage, mask, clip=0.2, agg=agg)
    (loss + vloss).backward()
    assert loss.item() == 0 and vloss.item() == 0
    assert torch.equal(logp.grad, torch.zeros_like(logp)) and torch.equal(values.grad, torch.zeros_like(values))
    assert all(torch.isfinite(s) and s.item() == 0 for s in (*stats.values(), *vstats.values()))


# ---------------------------------------------------------------------------------------------------- value loss

def test_value_loss_hand_derived():
    # clip = 0.5; returns 0, old values 0:
    #   V = 1.0: clipped 0.5: errors 1 vs 0.25 -> max 1 (unclipped branch, gradient V - R = 1)
    #   V = 0.2: inside the clip range, both 0.04 -> 0.04
    #   V = -2 with R = -3, old = 0: clipped -0.5, errors 1 vs 6.25 -> 6.25 (clipped, gradient 0)
    # loss = 0.5 * (1 + 0.04 + 6.25) / 3
    v = torch.tensor([[1.0, 0.2, -2.0]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=F64)
    ret = torch.tensor([[0.0, 0.0, -3.0]], dtype=F64)
    loss, stats = ref.value_loss(v, old, ret, None, clip=0.5)
    assert loss.item() == pytest.approx(0.5 * 7.29 / 3)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[1.0, 0.2, 0.0]], dtype=F64) / 3)
    # no clip: TRL / verl 0.5 * masked_mean((V - R)^2)
    assert ref.value_loss(v, old, ret, None)[0].item() == pytest.approx(0.5 * (1 + 0.04 + 1) / 3)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_value_loss_gradcheck(agg):
    v = _rand(3, 6, seed=26).requires_grad_()
    old, ret = _rand(3, 6, seed=27), _rand(3, 6, seed=28)
    mask = _rand_mask(3, 6, seed=29)
    assert torch.autograd.gradcheck(lambda x: ref.value_loss(x, old, ret, mask, clip=0.3, agg=agg)[0], (v,))


# ---------------------------------------------------------------------------------------------------- KL penalty

def test_kl_penalty_hand_derived():
    # d = ref - logp = [0, 1, -1]: k1 = -d; k2 = d^2 / 2; k3 = e^d - d - 1 = [0, e - 2, 1/e]
    logp = torch.tensor([0.0, -1.0, 1.0], dtype=F64)
    ref_lp = torch.zeros(3, dtype=F64)
    torch.testing.assert_close(ref.kl_penalty(logp, ref_lp, kind="k1"), torch.tensor([0.0, -1.0, 1.0], dtype=F64))
    torch.testing.assert_close(ref.kl_penalty(logp, ref_lp, kind="k2"), torch.tensor([0.0, 0.5, 0.5], dtype=F64))
    torch.testing.assert_close(ref.kl_penalty(logp, ref_lp, kind="k3"),
                               torch.tensor([0.0, math.e - 2, math.exp(-1)], dtype=F64))


def test_kl_penalty_k3_matches_trl_and_gradcheck():
    logp, ref_lp = _rand(3, 7, seed=30, scale=0.5), _rand(3, 7, seed=31, scale=0.5)
    # TRL 1.16 GRPOTrainer: per_token_kl = exp(ref - logp) - (ref - logp) - 1
    trl = torch.exp(ref_lp - logp) - (ref_lp - logp) - 1
    torch.testing.assert_close(ref.kl_penalty(logp, ref_lp, kind="k3"), trl)
    assert (ref.kl_penalty(logp, ref_lp, kind="k3") >= 0).all()
    for kind in ref.KL_KINDS:
        assert torch.autograd.gradcheck(lambda a, b: ref.kl_penalty(a, b, kind=kind),
                                        (logp.clone().requires_grad_(), ref_lp.clone().requires_grad_()))
