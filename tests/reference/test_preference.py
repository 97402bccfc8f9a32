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


@pytest.mark.parametrize("loss_type", ref.LOSS_TYPES)
@pytest.mark.parametrize("normalise", [False, True])
def test_dpo_gradcheck(loss_type, normalise):
    (pi_c, pi_r, ref_c, ref_r), lengths = _random_pairs(seed=ref.LOSS_TYPES.index(loss_type))
    eps = {"sigmoid": 0.1, "robust": 0.2, "simpo": 0.05}.get(loss_type, 0.0)
    kw = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps, gamma=0.5 if loss_type == "simpo" else 0.0)
    if normalise:
        kw.update(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    refs = (None, None) if loss_type == "simpo" else (ref_c, ref_r)

    def f(chosen, rejected, *reference):
        return ref.dpo_loss(chosen, rejected, *(reference or (None, None)), **kw)[0]

    inputs = [t.clone().requires_grad_() for t in (pi_c, pi_r, *(r for r in refs if r is not None))]
    assert torch.autograd.gradcheck(f, inputs)


def test_reward_and_sequence_gradcheck():
    g = torch.Generator().manual_seed(3)
    c, r, m = (torch.randn(9, generator=g, **F64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda c, r, m: ref.reward_loss(c, r, margin=m, center_rewards_coef=0.1)[0],
                                    (c, r, m))
    logp = torch.randn(4, 11, generator=g, **F64, requires_grad=True)
    mask = torch.rand(4, 11, generator=g) < 0.7
    for average in (False, True):
        assert torch.autograd.gradcheck(lambda x: ref.sequence_logprobs(x, mask, average=average), (logp,))
