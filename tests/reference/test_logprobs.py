"""The torch reference of token log-probs against float64 ground truth, hand-derived cases and outside oracles."""
import math

import pytest
import torch

import fastalign as fa
from fastalign.reference import logprobs as ref


def _inputs(n=29, d=13, v=211, *, dtype=torch.float64, seed=0, logit_std=3.0, ignore_frac=0.2, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) * logit_std / math.sqrt(d)
    b = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < ignore_frac] = -100
    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(b), labels


def test_hand_derived_case():
    # h = [1, 0], W rows e0, e1, 0  ->  logits [1, 0, 0]; lse = log(e + 2)
    # logp(label 0) = 1 - log(e + 2); logp(label 2) = -log(e + 2)
    # p = [e, 1, 1] / (e + 2); entropy = lse - sum p z = log(e + 2) - e / (e + 2)
    hidden = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    out = fa.linear_logprobs(hidden, weight, labels, return_entropy=True)
    e = math.e
    torch.testing.assert_close(out.logprobs, torch.tensor([1 - math.log(e + 2), -math.log(e + 2)], dtype=torch.float64))
    torch.testing.assert_close(out.entropy, torch.full((2,), math.log(e + 2) - e / (e + 2), dtype=torch.float64))


def test_hand_derived_temperature_softcap():
    # one logit a = 2, the other 0; softcap c = 1 -> tanh(2), 0; temperature 0.5 -> 2 tanh(2), 0
    # logp(label 0) = 2 tanh 2 - log(exp(2 tanh 2) + 1)
    hidden = torch.tensor([[2.0]], dtype=torch.float64)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    out = fa.linear_logprobs(hidden, weight, torch.tensor([0]), softcap=1.0, temperature=0.5)
    z = 2 * math.tanh(2.0)
    assert out.logprobs.item() == pytest.approx(z - math.log(math.exp(z) + 1), rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("softcap,temperature,logit_scale", [(None, 1.0, 1.0), (4.0, 0.7, 1.0), (3.0, 1.2, 0.6)])
def test_chunked_forward_backward_matches_autograd_of_naive(chunk, softcap, temperature, logit_scale):
    hidden, weight, bias, labels = _inputs()
    kw = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale)
    logp, entropy, lse, mu, stats = ref.linear_logprobs_forward(
        hidden, weight, labels, bias, ignore_index=-100, need_entropy=True, stats=ref.STATS, chunk=chunk, **kw
    )
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    t_logp, t_ent = ref.linear_logprobs_naive(h, w, labels, bias=b, return_entropy=True, **kw)
    torch.testing.assert_close(logp, t_logp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, t_ent.detach(), rtol=1e-12, atol=1e-12)
    t_stats = ref.linear_stats_naive(hidden, weight, labels, bias=bias, **kw)
    for name in ref.STATS:
        torch.testing.assert_close(stats[name], t_stats[name], rtol=1e-12, atol=1e-12, msg=name)
    g = torch.randn_like(logp)
    e = torch.randn_like(logp)
    ((t_logp * g).sum() + (t_ent * e).sum()).backward()
    dh, dw, db = ref.linear_logprobs_backward(
        hidden, weight, labels, bias, lse, mu, g, e, ignore_index=-100, chunk=chunk, **kw
    )
    for name, mine, truth in (("dh", dh, h.grad), ("dW", dw, w.grad), ("db", db, b.grad)):
        torch.testing.assert_close(mine, truth, rtol=1e-10, atol=1e-12, msg=name)
    # ignored rows: zero log-prob, zero entropy, zero gradient
    ignored = labels == -100
    assert ignored.any()
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all() and (dh[ignored] == 0).all()


def test_gradcheck_float64():
    hidden, weight, bias, labels = _inputs(n=6, d=4, v=9, ignore_frac=0.3, seed=3)
    args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]

    def fn(h, w, b):
        out = fa.linear_logprobs(h, w, labels, bias=b, softcap=3.0, temperature=0.8, logit_scale=1.7,
                                 return_entropy=True, backend="torch")
        return out.logprobs, out.entropy

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)


def test_hand_derived_logit_scale():
    # raw logits [2, 0], logit_scale 0.5 -> [1, 0]; softcap 1 -> [tanh 1, 0]; logp(0) = tanh 1 - log(e^tanh 1 + 1)
    # d logp / d a_0 = k (1 - p_0) (1 - tanh^2 1), with k = 0.5 and p_0 = sigmoid(tanh 1)
    hidden = torch.tensor([[2.0]], dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
    out = fa.linear_logprobs(hidden, weight, torch.tensor([0]), softcap=1.0, logit_scale=0.5)
    t = math.tanh(1.0)
    assert out.logprobs.item() == pytest.approx(t - math.log(math.exp(t) + 1), rel=1e-12)
    out.logprobs.sum().backward()
    p0 = 1 / (1 + math.exp(-t))
    assert hidden.grad.item() == pytest.approx(0.5 * (1 - p0) * (1 - t * t), rel=1e-12)


def test_logprobs_from_logits_matches_trl_selective_log_softmax():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 17, 301, generator=g) * 3
    labels = torch.randint(0, 301, (3, 17), generator=g)
    ours = fa.logprobs_from_logits(logits, labels).logprobs
    theirs = trl_utils.selective_log_softmax(logits, labels)
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=1e-5)
    # and with temperature, as TRL's trainers apply it (logits / T before the log-softmax)
    ours_t = fa.logprobs_from_logits(logits, labels, temperature=0.6).logprobs
    torch.testing.assert_close(ours_t, trl_utils.selective_log_softmax(logits / 0.6, labels), rtol=1e-5, atol=1e-5)


def test_linear_logprobs_matches_trl_on_the_same_logits():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    hidden, weight, bias, labels = _inputs(ignore_frac=0.0, dtype=torch.float32, bias=False)
    ours = fa.linear_logprobs(hidden, weight, labels).logprobs
    theirs = trl_utils.selective_log_softmax(hidden @ weight.T, labels)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_logprobs_from_logits_entropy_and_ignore():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 7, 50, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (5, 7), generator=g)
    labels[0, :3] = -100
    out = fa.logprobs_from_logits(logits, labels, return_entropy=True)
    p = torch.softmax(logits, -1)
    truth_h = -(p * torch.log_softmax(logits, -1)).sum(-1)
    truth_h[0, :3] = 0
    torch.testing.assert_close(out.entropy, truth_h.float(), rtol=1e-5, atol=1e-6)
    assert (out.logprobs[0, :3] == 0).all()


def test_all_ignored_gives_zeros_and_zero_grads():
    hidden, weight, bias, labels = _inputs(dtype=torch.float32)
    labels[:] = -100
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    out = fa.linear_logprobs(h, w, labels, bias=b, return_entropy=True)
    (out.logprobs.sum() + out.entropy.sum()).backward()
    for t in (out.logprobs, out.entropy, h.grad, w.grad, b.grad):
        assert torch.isfinite(t).all() and (t == 0).all()
