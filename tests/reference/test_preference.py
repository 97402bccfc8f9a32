"""The torch reference of the preference losses: hand-derived float64 cases, gradcheck, edge cases."""
import math

import pytest
import torch

from fastalign.reference import preference as ref

F64 = dict(dtype=torch.float64)


def _pair(chosen_ratio, rejected_ratio):
    """Policy and reference log-probs with the given log-ratios pi - ref (arbitrary reference values)."""
    ref_c = torch.tensor([-7.0], **F64)
    ref_r = torch.tensor([-5.0], **F64)
    return ref_c + chosen_ratio, ref_r + rejected_ratio, ref_c, ref_r


# log-ratios +1 (chosen) and -1 (rejected), beta = 0.5  ->  d = 2, u = 1; a := -log sig(1) = log(1 + e^-1)
A = math.log1p(math.exp(-1.0))


@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        ("sigmoid", {}, A),
        # cDPO: 0.9 a + 0.1 (-log sig(-1)) = 0.9 a + 0.1 (a + 1) = a + 0.1   (log(1 + e) = 1 + log(1 + e^-1))
        ("sigmoid", {"label_smoothing": 0.1}, A + 0.1),
        # rDPO: (0.9 a - 0.1 (a + 1)) / 0.8 = (0.8 a - 0.1) / 0.8 = a - 0.125
        ("robust", {"label_smoothing": 0.1}, A - 0.125),
        ("robust", {}, A),
        ("hinge", {}, 0.0),  # relu(1 - 1)
        # IPO: (d - 1 / (2 beta))^2 = (2 - 1)^2
        ("ipo", {}, 1.0),
    ],
)
def test_dpo_hand_derived(loss_type, kwargs, expected):
    pi_c, pi_r, ref_c, ref_r = _pair(1.0, -1.0)
    loss, stats = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.5, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    # rewards beta (pi - ref): 0.5 and -0.5; margin 1; the pair is ranked right
    assert stats["rewards/chosen"].item() == pytest.approx(0.5)
    assert stats["rewards/rejected"].item() == pytest.approx(-0.5)
    assert stats["rewards/margins"].item() == pytest.approx(1.0)
    assert stats["rewards/accuracies"].item() == 1.0
    assert stats["logps/chosen"].item() == pytest.approx(-6.0)
    assert stats["logps/rejected"].item() == pytest.approx(-6.0)


# the same pair (log-ratios +1 / -1, beta 0.5: beta r_c = 0.5, beta r_r = -0.5, u = 1) for the other types;
# b := -log sig(0.5) = log(1 + e^-0.5), and -log sig(-0.5) = 0.5 + b; sig(x) = 1 / (1 + e^-x)
B_ = math.log1p(math.exp(-0.5))
SIG1, SIGH = 1 / (1 + math.exp(-1.0)), 1 / (1 + math.exp(-0.5))


@pytest.mark.parametrize(
    "loss_type,kwargs,expected",
    [
        # EXO: sig(1) (log sig(1) - log 0.9) + sig(-1) (log sig(-1) - log 0.1), log sig(1) = -a, log sig(-1) = -a - 1
        ("exo_pair", {"label_smoothing": 0.1},
         SIG1 * (-A - math.log(0.9)) + (1 - SIG1) * (-A - 1 - math.log(0.1))),
        # NCA: -log sig(0.5) - 0.5 log sig(-0.5) - 0.5 log sig(0.5) = b + 0.5 (0.5 + b) + 0.5 b = 2 b + 0.25
        ("nca_pair", {}, 2 * B_ + 0.25),
        # BCO: -log sig(0.5) - log sig(-(-0.5)) = 2 b
        ("bco_pair", {}, 2 * B_),
        # SPPO hard: (1 - 1 / (2 * 0.5))^2 + (-1 + 1)^2 = 0
        ("sppo_hard", {}, 0.0),
        # APO-zero: 1 - sig(0.5) + sig(-0.5) = 2 (1 - sig(0.5));  APO-down: sig(0.5) + 1 - sig(1)
        ("apo_zero", {}, 2 * (1 - SIGH)),
        ("apo_down", {}, SIGH + 1 - SIG1),
        # DiscoPOP with tau 1: m = sig(1); (1 - m) a + m e^-1
        ("discopop", {"discopop_tau": 1.0}, (1 - SIG1) * A + SIG1 * math.exp(-1.0)),
        # AOT on one pair: sorting one value changes nothing -> sigmoid (cDPO with eps: a + 0.1, as above)
        ("aot", {"label_smoothing": 0.1}, A + 0.1),
        ("aot_unpaired", {}, A),
    ],
)
def test_more_dpo_types_hand_derived(loss_type, kwargs, expected):
    loss, stats = ref.dpo_loss(*_pair(1.0, -1.0), beta=0.5, loss_type=loss_type, **kwargs)
    assert loss.item() == pytest.approx(expected, abs=1e-14)
    assert stats["rewards/margins"].item() == pytest.approx(1.0) and stats["rewards/accuracies"].item() == 1.0


def test_sigmoid_norm_and_sft_hand_derived():
    # lengths 2 and 4: r_c = 1/2, r_r = -1/4, d = 3/4, u = 0.5 * 3/4 = 3/8 -> -log sig(3/8)
    lengths = dict(chosen_lengths=torch.tensor([2]), rejected_lengths=torch.tensor([4]))
    loss, _ = ref.dpo_loss(*_pair(1.0, -1.0), beta=0.5, loss_type="sigmoid_norm", **lengths)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3 / 8)), abs=1e-14)
    # sft: chosen sums -6 and -3 over 2 and 4 tokens -> 9 / 6 = 1.5 per token, whatever the reference
    chosen, rejected = torch.tensor([-6.0, -3.0], **F64), torch.tensor([-1.0, -1.0], **F64)
    zeros = torch.zeros(2, **F64)
    loss, _ = ref.dpo_loss(chosen, rejected, zeros, zeros, loss_type="sft", chosen_lengths=torch.tensor([2, 4]),
                           rejected_lengths=torch.tensor([1, 1]))
    assert loss.item() == pytest.approx(1.5, abs=1e-14)


def test_aot_sorts_the_batch():
    # policy margins pi_c - pi_r = [3, -1], reference margins [0, 2]: sorted [-1, 3] - [0, 2] = [-1, 1], beta 1
    # -> mean(-log sig(-1), -log sig(1)) = ((1 + a) + a) / 2; paired (unsorted) it would be [3, -3]
    pi_c, pi_r = torch.tensor([3.0, 0.0], **F64), torch.tensor([0.0, 1.0], **F64)
    ref_c, ref_r = torch.tensor([0.0, 2.0], **F64), torch.tensor([0.0, 0.0], **F64)
    loss, _ = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=1.0, loss_type="aot")
    assert loss.item() == pytest.approx((1 + 2 * A) / 2, abs=1e-14)
    # aot_unpaired sorts the log-ratios: r_c = [3, -2], r_r = [0, 1] -> [-2, 3] - [0, 1] = [-2, 2]
    loss, _ = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=1.0, loss_type="aot_unpaired")
    assert loss.item() == pytest.approx((math.log1p(math.exp(2.0)) + math.log1p(math.exp(-2.0))) / 2, abs=1e-14)


def test_weighted_combination_is_the_weighted_sum():
    (pi_c, pi_r, ref_c, ref_r), lengths = _random_pairs(b=11, seed=7)
    lens = dict(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    types, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [0.8, 0.2, 1.0, 0.05]
    loss, stats = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, loss_type=types, loss_weights=weights, **lens)
    want = 0.0
    for t, w in zip(types, weights):
        # each type as alone: ipo and sft with the lengths (TRL's rule), sigmoid and bco_pair on sums
        part, _ = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, loss_type=t, **(lens if t in ("sft", "ipo") else {}))
        assert stats[f"loss/{t}"].item() == pytest.approx(part.item(), rel=1e-14)
        want += w * part.item()
    assert loss.item() == pytest.approx(want, rel=1e-14)


def test_accuracy_tie_rule():
    # the policy equals the reference up to fp32 rounding: margins of a few ulps of the sums are ties, not wins
    g = torch.Generator().manual_seed(0)
    ref_c, ref_r = (torch.randn(64, generator=g) * 5 - 40 for _ in range(2))
    ulp = torch.finfo(torch.float32).eps
    pi_c = ref_c * (1 + 3 * ulp * torch.randn(64, generator=g))
    pi_r = ref_r * (1 + 3 * ulp * torch.randn(64, generator=g))
    assert bool((pi_c - ref_c - (pi_r - ref_r) > 0).any())  # TRL's strict `>` would count some of these
    _, stats = ref.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta=0.1)
    assert stats["rewards/accuracies"].item() == 0.0
    # the rule: won iff margin > TIE_ULPS * eps * beta * (|pi_c| + |pi_r| + |ref_c| + |ref_r|)
    one = torch.tensor([1.0])
    mag = 0.1 * 160.0
    tol = ref.TIE_ULPS * ulp * mag
    assert ref.reward_accuracy(one * tol, one * 0, one * mag).item() == 0.0
    assert ref.reward_accuracy(one * tol * 1.01, one * 0, one * mag).item() == 1.0
    # a genuine small preference (a margin of 1e-3 nats) is a win
    _, stats = ref.dpo_loss(ref_c + 1e-2, ref_r, ref_c, ref_r, beta=0.1)
    assert stats["rewards/accuracies"].item() == 1.0


def test_hinge_active_branch():
    # beta 0.25: u = 0.25 * 2 = 0.5 -> relu(1 - 0.5) = 0.5
    loss, _ = ref.dpo_loss(*_pair(1.0, -1.0), beta=0.25, loss_type="hinge")
    assert loss.item() == pytest.approx(0.5, abs=1e-14)


def test_ipo_length_normalised():
    # lengths 2 and 4: s_c = 1/2, s_r = -1/4, d = 3/4; beta 0.5 -> (3/4 - 1)^2 = 1/16 (TRL's normalised IPO)
    loss, stats = ref.dpo_loss(
        *_pair(1.0, -1.0), beta=0.5, loss_type="ipo", chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([4]),
    )
    assert loss.item() == pytest.approx(1 / 16, abs=1e-14)
    assert stats["rewards/margins"].item() == pytest.approx(1.0)  # rewards stay sequence-level, as TRL logs them


def test_simpo_hand_derived():
    # pi_c = -4 over 4 tokens (mean -1), pi_r = -9 over 3 tokens (mean -3); beta 2, gamma 1
    # u' = 2 (-1 - (-3)) - 1 = 3 -> -log sig(3) = log(1 + e^-3); rewards beta * mean logp = -2, -6
    loss, stats = ref.dpo_loss(
        torch.tensor([-4.0], **F64), torch.tensor([-9.0], **F64), None, None, beta=2.0, loss_type="simpo",
        gamma=1.0, chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([3]),
    )
    assert loss.item() == pytest.approx(math.log1p(math.exp(-3.0)), abs=1e-14)
    assert stats["rewards/chosen"].item() == pytest.approx(-2.0)
    assert stats["rewards/rejected"].item() == pytest.approx(-6.0)


def test_accuracy_counts_ties_as_wrong():
    # TRL: (chosen_rewards > rejected_rewards); a tie is not a win
    pi = torch.tensor([-1.0, -2.0, -3.0], **F64)
    ref_c = torch.zeros(3, **F64)
    _, stats = ref.dpo_loss(pi, torch.tensor([-2.0, -2.0, -1.0], **F64), ref_c, ref_c.clone())
    assert stats["rewards/accuracies"].item() == pytest.approx(1 / 3)


def test_empty_batch_is_zero_not_nan():
    e = torch.zeros(0, **F64, requires_grad=True)
    loss, stats = ref.dpo_loss(e, e, e.detach(), e.detach())
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    loss.backward()
    assert e.grad.shape == (0,)


def test_reward_loss_hand_derived():
    # chosen 2, rejected 1, margin 1 -> -log sig(0) = log 2; centring 0.01 * (2 + 1)^2 = 0.09
    c, r = torch.tensor([2.0], **F64), torch.tensor([1.0], **F64)
    loss, stats = ref.reward_loss(c, r, margin=1.0)
    assert loss.item() == pytest.approx(math.log(2.0), abs=1e-14)
    assert stats["accuracy"].item() == 1.0 and stats["margin"].item() == 1.0
    loss_c, _ = ref.reward_loss(c, r, margin=1.0, center_rewards_coef=0.01)
    assert loss_c.item() == pytest.approx(math.log(2.0) + 0.09, abs=1e-14)


def test_sequence_logprobs_hand_derived_and_nan_padding():
    # row 0: -1 - 2 = -3 over 2 tokens (mean -1.5), NaN padding dropped; row 1: -3 over 1 token; row 2: nothing -> 0
    logp = torch.tensor([[-1.0, -2.0, float("nan")], [-3.0, float("-inf"), 5.0], [1.0, 2.0, 3.0]], **F64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    torch.testing.assert_close(ref.sequence_logprobs(logp, mask), torch.tensor([-3.0, -3.0, 0.0], **F64))
    torch.testing.assert_close(ref.sequence_logprobs(logp, mask.bool(), average=True),
                               torch.tensor([-1.5, -3.0, 0.0], **F64))
    x = logp.clone().requires_grad_()
    ref.sequence_logprobs(x, mask, average=True).sum().backward()
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, torch.tensor([[0.5, 0.5, 0], [1, 0, 0], [0, 0, 0]], **F64))


def _random_pairs(b=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, generator=g, **F64) * 3 - 20 for _ in range(4)], torch.randint(1, 30, (2, b), generator=g)


GRADCHECK_EPS = {"sigmoid": 0.1, "sigmoid_norm": 0.05, "robust": 0.2, "exo_pair": 0.01, "aot": 0.1,
                 "aot_unpaired": 0.05, "simpo": 0.05}


@pytest.mark.parametrize("loss_type", ref.LOSS_TYPES)
@pytest.mark.parametrize("normalise", [False, True])
def test_dpo_gradcheck(loss_type, normalise):
    (pi_c, pi_r, ref_c, ref_r), lengths = _random_pairs(seed=ref.LOSS_TYPES.index(loss_type))
    eps = GRADCHECK_EPS.get(loss_type, 0.0)
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, gamma=0.5 if loss_type == "simpo" else 0.0,
              discopop_tau=0.2)
    if normalise or loss_type in ("sft", "sigmoid_norm"):
        kw.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1], length_normalize=True if normalise else None)
    refs = (None, None) if loss_type in ref.REFERENCE_FREE else (ref_c, ref_r)

    def f(chosen, rejected, *reference):
        return ref.dpo_loss(chosen, rejected, *(reference or (None, None)), **kw)[0]

    inputs = [t.clone().requires_grad_() for t in (pi_c, pi_r, *(r for r in refs if r is not None))]
    assert torch.autograd.gradcheck(f, inputs)


def test_combination_gradcheck():
    (pi_c, pi_r, ref_c, ref_r), lengths = _random_pairs(b=9, seed=41)
    kw = dict(beta=0.2, loss_type=["ipo", "aot", "sft", "discopop"], loss_weights=[0.3, 1.7, -0.4, 1.0],
              label_smoothing=0.1, chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    inputs = [t.clone().requires_grad_() for t in (pi_c, pi_r, ref_c, ref_r)]
    assert torch.autograd.gradcheck(lambda *x: ref.dpo_loss(*x, **kw)[0], inputs)


def test_reward_and_sequence_gradcheck():
    g = torch.Generator().manual_seed(3)
    c, r, m = (torch.randn(9, generator=g, **F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda c, r, m: ref.reward_loss(c, r, margin=m, center_rewards_coef=0.1)[0],
                                    (c, r, m))
    logp = torch.randn(4, 11, generator=g, **F64, requires_grad=True)
    mask = torch.rand(4, 11, generator=g) < 0.7
    for average in (False, True):
        assert torch.autograd.gradcheck(lambda x: ref.sequence_logprobs(x, mask, average=average), (logp,))
