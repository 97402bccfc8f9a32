"""Fused DPO and GRPO loss computations from hidden states (the part of a training step after the backbone).

DPO (P pairs x T tokens, first half of the batch chosen, the first quarter of each sequence a prompt with
ignored labels): the reference log-probs come from reference hidden states in a no-grad pass, then the policy
log-probs, per-sequence sums, the sigmoid DPO loss (beta 0.1) and its backward into hidden and weight. Every
implementation does the same work (Liger computes the reference pass itself from ``ref_input``).

GRPO (B sequences x T completion tokens, trailing padding masked): per-token log-probs, importance ratio
against old log-probs, clipped surrogate (eps 0.2 both sides), k3 KL to reference log-probs (beta 0.04), and a
token-mean over the batch (TRL's ``loss_type="bnpo"``, fastalign's ``agg="token-mean"``), with its backward.
Old and reference log-probs are the current ones plus small noise, so ratios sit near 1 and some are clipped.

fastalign's rows carry the head's plan of the step (keep / recompute, chunk rows, budget, GEMM-equivalents:
``fastalign.last_head_plan()``) in their ``extra``.

Truth: fastalign's reference losses (:func:`benchmarks.preference.dpo_truth_loss`,
:func:`benchmarks.rl.grpo_truth_loss`) on fp64 (CPU) / fp32 (GPU) log-probs, with autograd on the per-token
log-probs feeding :func:`benchmarks.logprobs.truth_logprobs` for the hidden/weight gradients. The plain PyTorch and
TRL rows end with TRL's own loss lines (:func:`benchmarks.preference.sigmoid_dpo_loss`,
:func:`benchmarks.rl.grpo_bnpo_loss`).
"""
from __future__ import annotations

import torch

import fastalign as fa

from . import peers
from .logprobs import IGNORE, LOGIT_STD, head_plan_extra, truth_logprobs
from .preference import DPO_BETA, dpo_truth_loss, sigmoid_dpo_loss
from .rl import CLIP, GRPO_BETA, grpo_bnpo_loss, grpo_truth_loss
from .runner import Case, Impl, Prepared
from .timing import measure_time


# -------------------------------------------------------------------------------------------------------- DPO

def dpo_inputs(pairs: int, t: int, d: int, v: int, dtype, device, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device (see logprobs.make_inputs)
    b = 2 * pairs
    hidden = torch.randn(b, t, d, generator=g, device=device)
    ref_hidden = hidden + 0.1 * torch.randn(b, t, d, generator=g, device=device)
    weight = torch.randn(v, d, generator=g, device=device).mul_(LOGIT_STD / d**0.5)
    labels = torch.randint(0, v, (b, t), generator=g, device=device)
    labels[:, : max(1, t // 4)] = IGNORE  # prompt tokens
    return {"hidden": hidden.to(dtype), "ref_hidden": ref_hidden.to(dtype), "weight": weight.to(dtype),
            "labels": labels}


def _truth_seq_grad(token_loss_fn, x: dict, hidden_key: str = "hidden") -> dict:
    """Truth for a loss of per-token log-probs: loss, and grads into hidden/weight through truth_logprobs."""
    labels = x["labels"]
    valid = labels != IGNORE
    safe = labels.clamp(min=0)
    d = x[hidden_key].shape[-1]
    flat = truth_logprobs(x[hidden_key].reshape(-1, d), x["weight"], safe.reshape(-1))["logp"]
    logp = (flat.view(labels.shape) * valid).detach().requires_grad_()
    loss = token_loss_fn(logp, valid)
    (g,) = torch.autograd.grad(loss, logp)
    grads = truth_logprobs(x[hidden_key].reshape(-1, d), x["weight"], safe.reshape(-1), (g * valid).reshape(-1))
    return {"loss": loss.detach().reshape(()), "grad_hidden": grads["grad_hidden"].view(x[hidden_key].shape),
            "grad_weight": grads["grad_weight"]}


def dpo_truth(x: dict) -> dict:
    labels = x["labels"]
    valid = labels != IGNORE
    d = x["hidden"].shape[-1]
    ref_tok = truth_logprobs(x["ref_hidden"].reshape(-1, d), x["weight"], labels.clamp(min=0).reshape(-1))["logp"]
    ref = (ref_tok.view(labels.shape) * valid).sum(-1)
    return _truth_seq_grad(lambda logp, m: dpo_truth_loss(logp.sum(-1), ref), x)


def _loss_step(x: dict, loss_fn, *, report_plan: bool = False):
    """Prepared step: fresh leaves, loss_fn(h, w) -> scalar loss; backward; outputs for the check.
    ``report_plan``: fastalign's head plan of the step into the row's extra (one warm-up call)."""
    h = x["hidden"].detach().clone().requires_grad_()
    w = x["weight"].detach().clone().requires_grad_()

    def step():
        loss = loss_fn(h, w)
        loss.backward()
        return {"loss": loss.detach().float().reshape(()), "grad_hidden": h.grad, "grad_weight": w.grad}

    extra = head_plan_extra(step) if report_plan else {}
    h.grad = w.grad = None  # the plan's call leaves no gradients behind for the first timed call
    return Prepared(step, grad_to_none=[h, w], extra=extra)


def _naive_token_logp(h, w, labels):
    valid = labels != IGNORE
    logits = (h @ w.T).float()
    return logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * valid


def _trl_token_logp(h, w, labels, outputs=()):
    """TRL's trainer path: ChunkedLogProbFunction over the valid positions only, scattered back (as
    trl.trainer.utils' fused LM-head forward does on CUDA)."""
    (fn_cls, chunk), _ = peers.load("trl.chunked")
    valid = labels != IGNORE
    out = fn_cls.apply(h[valid], w, None, labels[valid], 1.0, chunk, None, 1.0, outputs)
    return out[0].new_zeros(labels.shape).masked_scatter(valid, out[0])


def _sls_token_logp(sls, h, w, labels):
    """TRL's selective_log_softmax on full logits in the model dtype (its logits path)."""
    valid = labels != IGNORE
    return sls(h @ w.T, labels.clamp(min=0)) * valid


def dpo_impls(device) -> list[Impl]:
    impls = []
    def fa_ref(x):
        with torch.no_grad():
            return fa.linear_logprobs(x["ref_hidden"], x["weight"], x["labels"]).logprobs.sum(-1)

    def fused(x):
        rc, rr = fa_ref(x).chunk(2)
        return _loss_step(x, lambda h, w: fa.linear_dpo_loss(h, w, x["labels"], rc, rr, beta=DPO_BETA)[0],
                          report_plan=True)

    def unfused(x):
        rc, rr = fa_ref(x).chunk(2)

        def loss(h, w):
            pc, pr = fa.linear_logprobs(h, w, x["labels"]).logprobs.sum(-1).chunk(2)
            return fa.dpo_loss(pc, pr, rc, rr, beta=DPO_BETA)[0]

        return _loss_step(x, loss, report_plan=True)

    impls.append(Impl("fastalign linear_dpo_loss (fused)", "fastalign", fused))
    impls.append(Impl("fastalign linear_logprobs + dpo_loss", "fastalign", unfused))

    def naive(x):
        with torch.no_grad():
            ref = _naive_token_logp(x["ref_hidden"], x["weight"], x["labels"]).sum(-1)
        return _loss_step(x, lambda h, w: sigmoid_dpo_loss(_naive_token_logp(h, w, x["labels"]).sum(-1), ref))

    impls.append(Impl("naive torch: logits -> log_softmax -> DPO", "naive", naive, is_baseline=True))

    chunked, why = peers.load("trl.chunked")

    def trl(x):
        with torch.no_grad():
            ref = _trl_token_logp(x["ref_hidden"], x["weight"], x["labels"]).sum(-1)
        # DPOTrainer asks its fused head for these outputs (trl/trainer/dpo_trainer.py)
        outs = ("entropy", "mean_logits", "is_top1")
        return _loss_step(x, lambda h, w: sigmoid_dpo_loss(_trl_token_logp(h, w, x["labels"], outs).sum(-1), ref))

    impls.append(Impl("TRL DPOTrainer loss path (chunked head)", "trl", trl if chunked else None, missing=why,
                      note="ChunkedLogProbFunction as DPOTrainer calls it + its sigmoid loss"))
    sls, why_sls = peers.load("trl.selective_log_softmax")

    def trl_logits(x):
        with torch.no_grad():
            ref = _sls_token_logp(sls, x["ref_hidden"], x["weight"], x["labels"]).sum(-1)
        return _loss_step(x, lambda h, w: sigmoid_dpo_loss(_sls_token_logp(sls, h, w, x["labels"]).sum(-1), ref))

    impls.append(Impl("TRL selective_log_softmax on logits + DPO", "trl", trl_logits if sls else None,
                      missing=why_sls, note="the logits path of TRL's earlier DPOTrainer"))

    liger_cls, why = peers.load("liger.dpo")
    # Liger's chunked losses are plain torch (+ torch.compile by default): on CPU run them eagerly
    compiled = device.type == "cuda"

    def liger(x):
        loss_fn = liger_cls(beta=DPO_BETA, use_ref_model=True, loss_type="sigmoid", compiled=compiled)
        ref_w = x["weight"].detach()
        return _loss_step(x, lambda h, w: loss_fn(w, h, x["labels"], ref_input=x["ref_hidden"], ref_weight=ref_w)[0])

    impls.append(Impl("Liger LigerFusedLinearDPOLoss", "liger", liger if liger_cls else None, missing=why,
                      note="reference pass from ref_input inside the loss"
                      + ("" if compiled else "; compiled=False on CPU")))
    return impls


# ------------------------------------------------------------------------------------------------------- GRPO

def grpo_inputs(b: int, t: int, d: int, v: int, dtype, device, seed: int = 1) -> dict:
    gd = torch.Generator(device=device).manual_seed(seed)  # the big tensors are drawn on the device
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gd, device=device)
    weight = torch.randn(v, d, generator=gd, device=device).mul_(LOGIT_STD / d**0.5)
    labels = torch.randint(0, v, (b, t), generator=gd, device=device)
    lengths = torch.randint(max(1, t // 2), t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    rewards = torch.randn(b, generator=g)
    group = min(8, b)
    r = rewards.view(-1, group)
    adv = ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-4)).reshape(b)
    x = {"hidden": hidden.to(dtype), "weight": weight.to(dtype), "labels": labels, "mask": mask.to(device),
         "advantages": adv.to(device)}
    cur = truth_logprobs(x["hidden"].reshape(-1, d), x["weight"], x["labels"].reshape(-1))["logp"]
    cur = cur.view(b, t).float().cpu()
    x["old_logprobs"] = ((cur + 0.05 * torch.randn(b, t, generator=g)) * mask).to(device)
    x["ref_logprobs"] = ((cur + 0.05 * torch.randn(b, t, generator=g)) * mask).to(device)
    return x


def grpo_truth(x: dict) -> dict:
    hp = torch.float64 if x["hidden"].device.type == "cpu" else torch.float32
    m = x["mask"].to(hp)
    return _truth_seq_grad(
        lambda logp, valid: grpo_truth_loss(logp, x["old_logprobs"].to(hp), x["ref_logprobs"].to(hp),
                                            x["advantages"].to(hp), m), x)


def grpo_impls(device) -> list[Impl]:
    impls = []

    def adv_bt(x):
        return x["advantages"][:, None].expand_as(x["mask"]).contiguous()

    def fused(x):
        a = adv_bt(x)
        return _loss_step(x, lambda h, w: fa.linear_policy_loss(
            h, w, x["labels"], x["old_logprobs"], a, x["mask"], ref_logprobs=x["ref_logprobs"], kl_coef=GRPO_BETA,
            kl_kind="k3", clip_low=CLIP, clip_high=CLIP, agg="token-mean")[0], report_plan=True)

    def unfused(x):
        a = adv_bt(x)
        m = x["mask"]

        def loss(h, w):
            logp = fa.linear_logprobs(h, w, x["labels"]).logprobs
            pg = fa.ppo_policy_loss(logp, x["old_logprobs"], a, m, clip_low=CLIP, clip_high=CLIP,
                                    agg="token-mean")[0]
            kl = fa.kl_penalty(logp, x["ref_logprobs"], kind="k3")
            return pg + GRPO_BETA * (kl * m).sum() / m.sum().clamp(min=1.0)

        return _loss_step(x, loss, report_plan=True)

    impls.append(Impl("fastalign linear_policy_loss (fused)", "fastalign", fused))
    impls.append(Impl("fastalign linear_logprobs + ppo_policy_loss + kl_penalty", "fastalign", unfused))

    def naive(x):
        labels = x["labels"]
        return _loss_step(x, lambda h, w: grpo_bnpo_loss(
            (h @ w.T).float().log_softmax(-1).gather(-1, labels[..., None])[..., 0],
            x["old_logprobs"], x["ref_logprobs"], x["advantages"], x["mask"]))

    impls.append(Impl("naive torch: logits -> log_softmax -> GRPO", "naive", naive, is_baseline=True))

    chunked, why = peers.load("trl.chunked")

    def trl(x):
        labels = x["labels"].masked_fill(x["mask"] == 0, IGNORE)
        # GRPOTrainer asks its fused head for log-probs and entropy (trl/trainer/grpo_trainer.py)
        return _loss_step(x, lambda h, w: grpo_bnpo_loss(
            _trl_token_logp(h, w, labels, ("entropy",)), x["old_logprobs"], x["ref_logprobs"], x["advantages"],
            x["mask"]))

    impls.append(Impl("TRL GRPOTrainer loss path (chunked head)", "trl", trl if chunked else None, missing=why,
                      note="ChunkedLogProbFunction as GRPOTrainer calls it + its bnpo loss"))
    sls, why_sls = peers.load("trl.selective_log_softmax")

    def trl_logits(x):
        return _loss_step(x, lambda h, w: grpo_bnpo_loss(
            _sls_token_logp(sls, h, w, x["labels"]), x["old_logprobs"], x["ref_logprobs"], x["advantages"],
            x["mask"]))

    impls.append(Impl("TRL selective_log_softmax on logits + GRPO", "trl", trl_logits if sls else None,
                      missing=why_sls, note="the logits path of TRL's earlier GRPOTrainer"))

    liger_cls, why = peers.load("liger.grpo")
    compiled = device.type == "cuda"

    def liger(x):
        loss_fn = liger_cls(beta=GRPO_BETA, loss_type="bnpo", epsilon_low=CLIP, epsilon_high=CLIP,
                            use_ref_model=True, compiled=compiled)
        return _loss_step(x, lambda h, w: loss_fn(
            h, w, x["labels"], x["mask"], x["advantages"], ref_per_token_logps=x["ref_logprobs"],
            old_per_token_logps=x["old_logprobs"])[0])

    impls.append(Impl("Liger LigerFusedLinearGRPOLoss (bnpo)", "liger", liger if liger_cls else None, missing=why,
                      note="" if compiled else "compiled=False on CPU"))
    return impls


def gemm_floor(x: dict, valid: torch.Tensor, timer: str, *, with_ref: bool) -> dict:
    """The GEMMs any exact implementation must run over the scored tokens, measured now: the policy's logits,
    dh and dW (3), plus the reference pass's logits for DPO (1)."""
    h = x["hidden"][valid]  # (tokens scored, D)
    w = x["weight"]
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    dz = torch.randn_like(logits)
    dh, dw = torch.empty_like(h), torch.empty_like(w)

    def run():
        if with_ref:
            torch.mm(h, w.T, out=logits)
        torch.mm(h, w.T, out=logits)
        torch.mm(dz, w, out=dh)
        torch.mm(dz.T, h, out=dw)

    t = measure_time(run, h.device, budget_s=1.0, timer=timer)
    n = 4 if with_ref else 3
    what = " (reference logits + policy logits, dh, dW)" if with_ref else " (logits, dh, dW)"
    return {"ms": t.min_ms, "median_ms": t.median_ms, "step": run,
            "what": f"{n} GEMMs over the {h.shape[0]} scored tokens{what}, fastest of {t.reps} calls in this run"}


def cases(dpo_specs: list[dict], grpo_specs: list[dict], device) -> list[Case]:
    out = []
    for s in dpo_specs:
        p, t, d, v, dt = s["pairs"], s["t"], s["d"], s["v"], s["dtype"]
        out.append(Case(
            suite="ops", name="dpo_loss.fused_from_hidden",
            params={"pairs": p, "T": t, "D": d, "V": v, "dtype": str(dt).replace("torch.", ""),
                    **({"head": s["head"]} if s.get("head") else {})},
            device=device, dtype=dt, tokens=2 * p * t,
            make_inputs=lambda p=p, t=t, d=d, v=v, dt=dt: dpo_inputs(p, t, d, v, dt, device),
            truth=dpo_truth, impls=dpo_impls(device), check=s.get("check", True),
            floor=lambda x, timer: gemm_floor(x, x["labels"] != IGNORE, timer, with_ref=True),
            notes=["reference pass (no grad) + policy forward/backward + sigmoid DPO, beta 0.1"]))
    for s in grpo_specs:
        b, t, d, v, dt = s["b"], s["t"], s["d"], s["v"], s["dtype"]
        out.append(Case(
            suite="ops", name="grpo_loss.fused_from_hidden",
            params={"B": b, "T": t, "D": d, "V": v, "dtype": str(dt).replace("torch.", ""),
                    **({"head": s["head"]} if s.get("head") else {})},
            device=device, dtype=dt, tokens=b * t,
            make_inputs=lambda b=b, t=t, d=d, v=v, dt=dt: grpo_inputs(b, t, d, v, dt, device),
            truth=grpo_truth, impls=grpo_impls(device), check=s.get("check", True),
            floor=lambda x, timer: gemm_floor(x, x["mask"] != 0, timer, with_ref=False),
            notes=["clipped surrogate eps 0.2 + k3 KL beta 0.04, token-mean (TRL bnpo)"]))
    return out
