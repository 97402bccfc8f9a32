"""fastalign.integrations.trl: the replacement of TRL 1.16's fused head against TRL's own head and a float64 truth
(the three-way rule, TRL's head being the same-dtype computation), TRL's patched model forward with ignored tokens,
autocast, the switch, and the refusal of a TRL it was not written for."""
import math

import pytest
import torch

import fastalign as fa
from fastalign.reference.logprobs import linear_logits_naive, linear_logprobs_naive, linear_stats_naive
from helpers.accuracy import ATOL, assert_close_3way, assert_close_3way_norm

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")
from trl.kernels import chunked_logprob  # noqa: E402

from fastalign.integrations.trl import TRLFusedHead  # noqa: E402

TRL_HEAD = chunked_logprob.ChunkedLogProbFunction
ALL = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
NAMES = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # the order of the outputs

CASES = [
    # n, d, v, bias, temperature, softcap, logit_scale
    (37, 40, 1007, False, 1.0, None, 1.0),
    (53, 48, 523, True, 0.7, 5.0, 0.45),
    (29, 33, 389, True, 1.3, 30.0, 2.5),
]


def _inputs(case, *, seed):
    n, d, v, bias, temperature, softcap, scale = CASES[case]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 3.0 / math.sqrt(d)  # logits of std 3: a peaked softmax
    b = torch.randn(v, generator=g) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    z = linear_logits_naive(hidden.double(), weight.double(), b.double() if bias else None, temperature, softcap,
                            scale)
    predicted = torch.rand(n, generator=g) < 0.35  # a trained model's label is often its arg-max
    targets = torch.where(predicted, z.argmax(-1), targets)
    grads = (torch.randn(n, generator=g), torch.randn(n, generator=g))
    return hidden, weight, b, targets, (temperature, softcap, scale), grads


def _run(fn, hidden, weight, bias, targets, params, grads, outputs=ALL):
    """fn.apply as TRL calls it, then backward of sum(logp g) + sum(entropy e), on private leaf copies."""
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_() if bias is not None else None
    temperature, softcap, scale = params
    out = fn.apply(h, w, b, targets, temperature, 4096, softcap, scale, outputs)
    loss = (out[0] * grads[0]).sum() + (out[1] * grads[1]).sum()
    loss.backward()
    return dict(zip(NAMES, out), dh=h.grad, dw=w.grad, db=b.grad if b is not None else None)


def _truth(hidden, weight, bias, targets, params, grads):
    temperature, softcap, scale = params
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    b = bias.double().requires_grad_() if bias is not None else None
    kw = dict(bias=b, temperature=temperature, softcap=softcap, logit_scale=scale)
    logp, entropy = linear_logprobs_naive(h, w, targets, return_entropy=True, **kw)
    ((logp * grads[0].double()).sum() + (entropy * grads[1].double()).sum()).backward()
    stats = linear_stats_naive(h.detach(), w.detach(), targets, **{**kw, "bias": b.detach() if b is not None else None})
    z = linear_logits_naive(h.detach(), w.detach(), b.detach() if b is not None else None, temperature, softcap, scale)
    return dict(log_probs=logp.detach(), entropy=entropy.detach(), dh=h.grad, dw=w.grad,
                db=b.grad if b is not None else None, z=z, **stats)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_trl_head_and_float64_truth(backend, case, trl_restored):
    trl_restored.enable(backend=backend)
    hidden, weight, bias, targets, params, grads = _inputs(case, seed=40 + case)
    truth = _truth(hidden, weight, bias, targets, params, grads)
    theirs = _run(TRL_HEAD, hidden, weight, bias, targets, params, grads)
    mine = _run(TRLFusedHead, hidden, weight, bias, targets, params, grads)
    for key in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "dh", "dw", "db"):
        if truth[key] is None:
            assert mine[key] is None
            continue
        assert mine[key].dtype == theirs[key].dtype == torch.float32, key
        assert_close_3way(mine[key], theirs[key], truth[key], torch.float32, name=f"{backend}/{key}")
    # differentiable exactly where TRL's outputs are: log-probs and entropy, not the metrics
    for key in NAMES:
        assert mine[key].requires_grad == theirs[key].requires_grad, key
    assert mine["is_top1"].dtype == torch.bool
    # the arg-max may flip between any two fp32 computations only where two logits are closer than fp32 noise
    z = truth["z"]
    z_label = z.gather(-1, targets[:, None])[:, 0]
    best_other = z.scatter(-1, targets[:, None], float("-inf")).amax(-1)
    decided = (z_label - best_other).abs() > 1e-4 * z.abs().amax(-1) + ATOL[torch.float32]
    assert truth["is_top1"].any() and not truth["is_top1"].all()
    assert (mine["is_top1"][decided] == truth["is_top1"][decided]).all()
    assert (mine["is_top1"][decided] == theirs["is_top1"][decided]).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ties_and_outputs_not_asked_for_match_trl(backend, trl_restored):
    # small integers: every logit is exact, so ties are real. Rows 3 and 700 of W are equal (and the largest for
    # tokens 0-1), so are rows 40 and 41 (for tokens 2-3): the first of each pair is the arg-max, as in TRL
    trl_restored.enable(backend=backend)
    g = torch.Generator().manual_seed(2)
    weight = torch.randint(-1, 2, (1007, 16), generator=g).float()
    weight[700] = weight[3] = torch.tensor([2.0] * 8 + [0.0] * 8)
    weight[41] = weight[40] = torch.tensor([0.0] * 8 + [2.0] * 8)
    hidden = torch.zeros(5, 16)
    hidden[:2, :8] = 1.0
    hidden[2:4, 8:] = 1.0
    targets = torch.tensor([3, 700, 40, 41, 9])
    for outputs in (("is_top1",), ("log_probs", "mean_logits"), ()):
        mine = TRLFusedHead.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, outputs)
        theirs = TRL_HEAD.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, outputs)
        for name, a, b in zip(NAMES, mine, theirs):
            assert (a is None) == (b is None), (outputs, name)
    mine = TRLFusedHead.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ("is_top1",))[4]
    theirs = TRL_HEAD.apply(hidden, weight, None, targets, 1.0, 4096, None, 1.0, ("is_top1",))[4]
    assert mine.tolist() == theirs.tolist() == [True, False, True, False, False]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_runs_the_head_in_the_autocast_dtype(backend, trl_restored):
    trl_restored.enable(backend=backend)
    hidden, weight, bias, targets, params, grads = _inputs(1, seed=7)
    temperature, softcap, scale = params
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp, entropy, *_ = TRLFusedHead.apply(h, w, None, targets, temperature, 4096, softcap, scale, ALL)
    ((logp * grads[0]).sum() + (entropy * grads[1]).sum()).backward()
    assert logp.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.float32
    # the same numbers as fastalign's head on the inputs cast to bf16 by hand, gradients cast back
    h16 = hidden.bfloat16().requires_grad_()
    w16 = weight.bfloat16().requires_grad_()
    out = fa.linear_logprobs(h16, w16, targets, temperature=temperature, softcap=softcap, logit_scale=scale,
                             return_entropy=True, backend=backend)
    ((out.logprobs * grads[0]).sum() + (out.entropy * grads[1]).sum()).backward()
    torch.testing.assert_close(logp, out.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(h.grad, h16.grad.float(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, w16.grad.float(), rtol=0, atol=0)
    # and, like TRL's under the same autocast, about as close to the fp32 truth as TRL's bf16 computation
    truth = _truth(hidden, weight, None, targets, params, grads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        theirs = _run(TRL_HEAD, hidden, weight, None, targets, params, grads)
    assert_close_3way(logp.detach(), theirs["log_probs"], truth["log_probs"], torch.bfloat16, name="logp")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trl_patched_model_forward_with_ignored_tokens(backend, tiny_dir, trl_restored):
    """TRL's own add_fused_lm_head forward (backbone, shift, -100 masking, temperature) on the tiny model: the
    fields it returns with fastalign's head against the same forward in float64."""
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(5)
    ids = torch.randint(7, 380, (3, 23), generator=g)
    ids[2, 8:] = 77  # a repeated token: the tied head predicts it, so some labels are the arg-max
    labels = ids.clone()
    labels[:, :6] = -100  # prompts
    labels[1, 17:] = -100  # padding
    outs = {}
    for name, dtype, on in (("truth", torch.float64, False), ("trl", torch.float32, False),
                            ("mine", torch.float32, True)):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
        trl_utils.add_fused_lm_head(model, temperature=0.8, outputs=ALL)
        if on:
            trl_restored.enable(backend=backend)
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        trl_restored.disable()
        (out.log_probs.sum() + 0.1 * out.entropy.sum()).backward()
        outs[name] = dict(out.items(), grad=model.lm_head.weight.grad)
    truth, theirs, mine = outs["truth"], outs["trl"], outs["mine"]
    ignored = ~truth["label_mask"]
    assert ignored.any() and (mine["label_mask"] == truth["label_mask"]).all()
    for key in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "loss"):
        assert_close_3way(mine[key], theirs[key], truth[key], torch.float32, name=key)
        if key != "loss":
            assert (mine[key][ignored] == 0).all(), key
    # the tied head's gradient also flows back through the backbone into the embedding rows
    assert_close_3way_norm(mine["grad"], theirs["grad"], truth["grad"], torch.float32, name="grad")
    assert not mine["is_top1"][ignored].any()
    assert (mine["is_top1"] == truth["is_top1"]).all()  # no near-ties at this logit scale
    assert truth["is_top1"].any()


# ------------------------------------------------------------------------------------------------ the switch

def test_enable_disable_and_enabled_swap_every_site(trl_restored):
    import trl.kernels

    sites = [(trl_utils, "_ChunkedLogProbFunction"), (trl.kernels, "ChunkedLogProbFunction"),
             (chunked_logprob, "ChunkedLogProbFunction")]
    assert not trl_restored.is_enabled()
    trl_restored.enable()
    assert trl_restored.is_enabled() and all(getattr(m, a) is TRLFusedHead for m, a in sites)
    trl_restored.enable(backend="torch")  # idempotent: the original is still what disable() restores
    trl_restored.disable()
    assert not trl_restored.is_enabled() and all(getattr(m, a) is TRL_HEAD for m, a in sites)
    with trl_restored.enabled(backend="torch"):
        assert trl_utils._ChunkedLogProbFunction is TRLFusedHead
        with trl_restored.enabled():
            assert trl_utils._ChunkedLogProbFunction is TRLFusedHead
        assert trl_restored.is_enabled()  # the inner block leaves the outer one's state
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD
    trl_restored.disable()  # a no-op when not enabled
    assert trl_utils._ChunkedLogProbFunction is TRL_HEAD


def test_bad_arguments_are_clear_errors(trl_restored):
    with pytest.raises(ValueError, match="backend"):
        trl_restored.enable(backend="cudnn")
    assert not trl_restored.is_enabled()
    hidden, weight, bias, targets, params, _ = _inputs(0, seed=1)
    with pytest.raises(ValueError, match="outputs"):
        TRLFusedHead.apply(hidden, weight, bias, targets, 1.0, 4096, None, 1.0, ("log_probs", "kl"))
    with pytest.raises(ValueError, match="softcap"):
        TRLFusedHead.apply(hidden, weight, bias, targets, 1.0, 4096, -1.0, 1.0, ("log_probs",))


class _NewHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature):  # a different API
        return hidden


def _other_add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
    return some_other_function(model)  # noqa: F821 - never called: only its names are inspected


@pytest.mark.parametrize("what,target,attribute,value,expected", [
    ("version", trl, "__version__", "1.17.0", r"found TRL 1\.17\.0 with version 1\.17\.0"),
    ("version", trl, "__version__", "0.29.1", r"found TRL 0\.29\.1"),
    ("signature", trl_utils, "_ChunkedLogProbFunction", _NewHead,
     r"_ChunkedLogProbFunction = forward\(ctx, hidden, weight, targets, temperature\)"),
    ("signature", trl_utils, "_ChunkedLogProbFunction", None, r"_ChunkedLogProbFunction = missing"),
    ("outputs", chunked_logprob, "OPTIONAL_OUTPUTS", ("entropy", "top_k"), r"OPTIONAL_OUTPUTS = \('entropy', 'top_k'\)"),
    ("seam", trl_utils, "add_fused_lm_head", _other_add_fused_lm_head, "add_fused_lm_head does not call"),
])
def test_refuses_a_trl_it_was_not_written_for(what, target, attribute, value, expected, monkeypatch, trl_restored):
    monkeypatch.setattr(target, attribute, value)
    before = trl_utils._ChunkedLogProbFunction
    with pytest.raises(RuntimeError, match=expected) as err:
        trl_restored.enable()
    # the message names what it was written for, too
    assert "written for TRL 1.16" in str(err.value) and "forward(ctx, hidden, weight, bias, targets" in str(err.value)
    assert trl_utils._ChunkedLogProbFunction is before and not trl_restored.is_enabled()
    with pytest.raises(RuntimeError, match=expected):
        with trl_restored.enabled():
            pass


@pytest.mark.gpu
def test_gpu_matches_trl_triton_head_under_bf16_autocast(trl_restored):
    """On a GPU TRL's head runs its Triton fold on compacted rows; fastalign's runs its kernels (Qwen2.5-0.5B's
    head, bf16 autocast over fp32 weights, as a bf16=True TRL run has it)."""
    g = torch.Generator().manual_seed(9)
    n, d, v = 1937, 896, 151936
    hidden = torch.randn(n, d, generator=g).cuda()
    weight = (torch.randn(v, d, generator=g) * 3 / math.sqrt(d)).cuda()
    targets = torch.randint(0, v, (n,), generator=g).cuda()
    grads = (torch.randn(n, generator=g).cuda(), torch.randn(n, generator=g).cuda())
    params = (1.0, None, 1.0)
    trl_restored.enable()
    truth = _truth(hidden, weight, None, targets, params, grads)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        theirs = _run(TRL_HEAD, hidden, weight, None, targets, params, grads)
        mine = _run(TRLFusedHead, hidden, weight, None, targets, params, grads)
    for key in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        assert_close_3way(mine[key], theirs[key], truth[key], torch.bfloat16, name=key)
    for key in ("dh", "dw"):
        assert_close_3way_norm(mine[key], theirs[key], truth[key], torch.bfloat16, name=key)
