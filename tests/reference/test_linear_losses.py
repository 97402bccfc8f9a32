"""The torch spec of the fused losses (fastalign.reference.linear_losses) in float64: hand-derived token-level cases
and the TRL formulas written out from logits."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastalign.reference import linear_losses as ref

F64 = dict(dtype=torch.float64)
IGNORE = -100


def _head(rows=4, t=7, d=6, v=29, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, t, d, generator=g, **F64)
    weight = torch.randn(v, d, generator=g, **F64) * 3 / math.sqrt(d)
    labels = torch.randint(0, v, (rows, t), generator=g)
    labels[:, :2] = IGNORE  # a prompt
    labels[1, -2:] = IGNORE  # right padding
    return hidden, weight, labels


def _token_logprobs(hidden, weight, labels):
    """log_softmax(h W^T) at the labels, 0 where ignored; and the entropies."""
    logp_all = torch.log_softmax(hidden @ weight.T, -1)
    logp = logp_all.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(labels != IGNORE, logp, 0.0), entropy


def test_dpo_from_logprobs_hand_derived():
    # one pair; chosen tokens -1, -2 (sum -3), rejected token -4 (sum -4); references -3.5 and -3.5
    # sigmoid: u = beta ((-3 + 3.5) - (-4 + 3.5)) = 0.5 * 1 = 0.5 -> -log sig(0.5) = log(1 + e^-0.5)
    # ipo (length-normalised by default): d = (0.5 / 2) - (-0.5 / 1) = 0.75 -> (0.75 - 1 / (2 * 0.5))^2 = 0.0625
    logp = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]], **F64)
    valid = torch.tensor([[True, True], [True, False]])
    refs = torch.tensor([-3.5], **F64), torch.tensor([-3.5], **F64)
    loss, stats = ref.dpo_loss_from_logprobs(logp, valid, *refs, beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)), abs=1e-14)
    assert stats["logps/chosen"].item() == -3.0 and stats["logps/rejected"].item() == -4.0
    loss, _ = ref.dpo_loss_from_logprobs(logp, valid, *refs, beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0625, abs=1e-14)


def test_linear_dpo_loss_is_dpo_of_sequence_sums():
    hidden, weight, labels = _head()
    refs = torch.tensor([-20.0, -18.0], **F64), torch.tensor([-19.0, -22.0], **F64)
    logp, _ = _token_logprobs(hidden, weight, labels)
    seq = logp.sum(-1)
    u = 0.3 * ((seq[:2] - refs[0]) - (seq[2:] - refs[1]))
    loss, _ = ref.linear_dpo_loss(hidden, weight, labels, *refs, beta=0.3)
    torch.testing.assert_close(loss, -F.logsigmoid(u).mean(), rtol=1e-12, atol=1e-14)
    avg = ref.linear_sequence_logprobs(hidden, weight, labels, average=True)
    torch.testing.assert_close(avg, seq / (labels != IGNORE).sum(-1), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_linear_policy_loss_matches_grpo_formula_written_out(agg):
    # TRL GRPOTrainer's loss (grpo = seq-mean-token-mean, bnpo = token-mean), written out:
    # per_token = -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta * k3 - entropy_coef * H
    hidden, weight, labels = _head(seed=1)
    logp, entropy = _token_logprobs(hidden, weight, labels)
    g = torch.Generator().manual_seed(2)
    old = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, **F64)
    ref_lp = logp.detach() + 0.3 * torch.randn(logp.shape, generator=g, **F64)
    adv = torch.randn(4, generator=g, **F64)
    m = (labels != IGNORE).double()
    r = torch.exp(logp - old)
    per_token = -torch.min(r * adv[:, None], torch.clamp(r, 0.8, 1.2) * adv[:, None])
    per_token = per_token + 0.04 * (torch.exp(ref_lp - logp) - (ref_lp - logp) - 1) - 0.01 * entropy
    want = (per_token * m).sum() / m.sum() if agg == "token-mean" else ((per_token * m).sum(-1) / m.sum(-1)).mean()
    loss, stats = ref.linear_policy_loss(hidden, weight, labels, old, adv, ref_logprobs=ref_lp, kl_coef=0.04,
                                         entropy_coef=0.01, agg=agg)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats["entropy"], (entropy * m).sum() / m.sum())
    assert {"pg_loss", "kl", "clip_frac"} <= set(stats)
