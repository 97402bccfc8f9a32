"""linear_logprobs: per-token log-probs from hidden states and the LM head, forward+backward and forward only.

Work per case (N tokens, D hidden, V vocab): forward+backward of ``sum(logp * g)`` with a random per-token ``g``
(never all ones), the same with a frozen weight (``fwd_bwd_frozen``: no dW, as under LoRA), or the forward alone
under ``torch.no_grad`` (reference / old-policy scoring). Inputs: hidden
~ N(0, 1), weight ~ N(0, (3/sqrt(D))^2) so logits have std ~3 (a realistic scale: a 1/sqrt(D) init gives a
near-uniform softmax that flatters gradient-skipping tricks), every label valid.

Implementations: fastalign (each backend), the naive PyTorch line, TRL's ``selective_log_softmax`` on logits and
its chunked log-prob-from-hidden path (``trl.kernels.ChunkedLogProbFunction``), Liger-Kernel's fused linear cross
entropy with ``reduction="none"``, Cut Cross-Entropy (default gradient filter, exact, and its torch.compile impl).
Floor: the cuBLAS GEMMs of the same shapes measured in the same run (1 for forward, 3 for forward+backward, 2 with
a frozen weight, i.e. the cost if [N, V] logits were free to keep). fastalign's rows carry the head's plan (keep /
recompute, chunk rows, budget, GEMM-equivalents: ``fastalign.last_head_plan()``) in their ``extra``.
"""
from __future__ import annotations

import torch

import fastalign as fa

from . import peers
from .runner import Case, Impl, Prepared
from .timing import measure_time

LOGIT_STD = 3.0
# forward + backward (trainable weight), forward + backward with a frozen weight (no dW: LoRA), forward only
MODES = ("fwd_bwd", "fwd_bwd_frozen", "fwd")
IGNORE = -100  # the labels' ignore_index: positions that are not scored (prompt tokens, padding)


def make_inputs(n: int, d: int, v: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> dict:
    # drawn on the device: a (151936, 3584) weight drawn on one CPU core takes seconds of the GPU lease
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, device=device).to(dtype)
    weight = torch.randn(v, d, generator=g, device=device).mul_(LOGIT_STD / d**0.5).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    grad = torch.randn(n, generator=g, device=device)
    return {"hidden": hidden, "weight": weight, "labels": labels, "grad": grad}


def truth_logprobs(hidden, weight, labels, grad=None, *, row_chunk: int = 2048) -> dict[str, torch.Tensor]:
    """fp64 (CPU) / fp32 (GPU, tf32 off) log-probs and, when ``grad`` is given, d(sum(logp * grad))/d(hidden, weight).

    Chunked over rows so it never holds more than one [row_chunk, V] block."""
    hp = torch.float64 if hidden.device.type == "cpu" else torch.float32
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h, w = hidden.to(hp), weight.to(hp)
        n = h.shape[0]
        logp = torch.empty(n, dtype=hp, device=h.device)
        dh = torch.empty_like(h) if grad is not None else None
        dw = torch.zeros_like(w) if grad is not None else None
        for s in range(0, n, row_chunk):
            z = h[s:s + row_chunk] @ w.T
            lse = torch.logsumexp(z, -1)
            y = labels[s:s + row_chunk]
            logp[s:s + row_chunk] = z.gather(-1, y[:, None])[:, 0] - lse
            if grad is not None:
                gr = grad[s:s + row_chunk].to(hp)
                dz = torch.exp(z - lse[:, None]).mul_(-gr[:, None])  # dz = g * (onehot - p)
                dz.scatter_add_(-1, y[:, None], gr[:, None])
                dh[s:s + row_chunk] = dz @ w
                dw.addmm_(dz.T, h[s:s + row_chunk])
                del dz
            del z
        out = {"logp": logp}
        if grad is not None:
            out.update(grad_hidden=dh, grad_weight=dw)
        return out
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# --------------------------------------------------------------------------------------------- implementations
# each `fn(hidden, weight, labels) -> logp (N,)`, autograd-aware

def _naive(h, w, y):
    return (h @ w.T).float().log_softmax(-1).gather(-1, y[:, None])[:, 0]


def head_plan_extra(step) -> dict:
    """Run ``step`` once and return what fastalign's head did in it (``fastalign.last_head_plan()``: keep / mixed /
    recompute, chunk rows, budget, GEMM-equivalents) for the benchmark JSON's ``extra``."""
    step()
    plan = fa.last_head_plan()
    return {"head_plan": plan.as_dict()} if plan is not None else {}


def _wrap(fn, with_grad: bool, *, frozen: bool = False, report_plan: bool = False):
    """Build Impl.prepare for a log-prob function: fresh leaves per implementation, same inputs. ``frozen``: the
    weight does not require grad (a LoRA-style frozen LM head). ``report_plan``: put fastalign's head plan into
    the row's extra (one warm-up call in prepare)."""

    def prepare(inputs: dict) -> Prepared:
        y, g = inputs["labels"], inputs["grad"]
        if with_grad:
            h = inputs["hidden"].detach().clone().requires_grad_()
            w = inputs["weight"].detach().clone().requires_grad_(not frozen)

            def step():
                logp = fn(h, w, y)
                (logp.float() * g).sum().backward()
                out = {"logp": logp.detach().float(), "grad_hidden": h.grad}
                if not frozen:
                    out["grad_weight"] = w.grad
                return out

            extra = head_plan_extra(step) if report_plan else {}
            h.grad = w.grad = None  # the plan's call leaves no gradients behind for the first timed call
            return Prepared(step, grad_to_none=[h, w], extra=extra)
        h, w = inputs["hidden"], inputs["weight"]

        def step():
            with torch.no_grad():
                return {"logp": fn(h, w, y).float()}

        return Prepared(step, extra=head_plan_extra(step) if report_plan else {})

    return prepare


def implementations(device: torch.device, with_grad: bool, *, compile_peers: bool, frozen: bool = False) -> list[Impl]:
    impls: list[Impl] = []
    wrap = lambda fn, wg, **kw: _wrap(fn, wg, frozen=frozen, **kw)  # noqa: E731
    for backend in peers.fastalign_backends(device.type, op_family="logprobs"):
        fn = (lambda b: (lambda h, w, y: fa.linear_logprobs(h, w, y, backend=b).logprobs))(backend)
        impls.append(Impl(peers.backend_label(backend, device.type), "fastalign", wrap(fn, with_grad,
                                                                                        report_plan=True)))
    impls.append(Impl("naive torch: (h@W.T).float().log_softmax", "naive", wrap(_naive, with_grad),
                      is_baseline=True))

    sls, why = peers.load("trl.selective_log_softmax")
    impls.append(Impl("TRL selective_log_softmax (logits in dtype)", "trl",
                      wrap(lambda h, w, y: sls(h @ w.T, y), with_grad) if sls else None, missing=why))

    chunked, why = peers.load("trl.chunked")
    if chunked:
        fn_cls, chunk = chunked
        trl_fn = (lambda h, w, y: fn_cls.apply(h, w, None, y, 1.0, chunk, None, 1.0, ())[0])
    impls.append(Impl("TRL chunked log-prob from hidden", "trl", wrap(trl_fn, with_grad) if chunked else None,
                      missing=why, note=f"ChunkedLogProbFunction, chunk {chunked[1]}" if chunked else ""))

    liger, why = peers.load("liger.flce")
    if liger and device.type != "cuda":
        liger, why = None, "Liger-Kernel's fused linear cross entropy needs CUDA (Triton kernels)"
    impls.append(Impl("Liger fused linear CE (reduction=none)", "liger",
                      wrap(lambda h, w, y: -liger(h, w, y, reduction="none"), with_grad) if liger else None,
                      missing=why))

    cce, why = peers.load("cce")
    cce_why = why or ("" if device.type == "cuda" else "CCE's Triton implementation needs CUDA")
    impls.append(Impl("CCE (default gradient filter)", "cce",
                      wrap(lambda h, w, y: -cce(h, w, y, reduction="none"), with_grad) if not cce_why else None,
                      missing=cce_why, note="approximate gradients by design"))
    impls.append(Impl("CCE exact (filter_eps=None)", "cce",
                      wrap(lambda h, w, y: -cce(h, w, y, reduction="none", filter_eps=None), with_grad)
                      if not cce_why else None, missing=cce_why))
    if compile_peers:
        impls.append(Impl("CCE torch_compile impl", "compile",
                          wrap(lambda h, w, y: -cce(h, w, y, reduction="none", impl="torch_compile"), with_grad)
                          if cce else None, missing=why))
    return impls


def gemm_floor(inputs: dict, with_grad: bool, timer: str, *, frozen: bool = False) -> dict:
    """Time of the cuBLAS/MKL GEMMs of this shape, measured now on this device: 1 (forward), 3 (logits, dh, dW)
    or, for a frozen weight, 2 (logits, dh)."""
    h, w = inputs["hidden"], inputs["weight"]
    dev = h.device
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=dev)
    if not with_grad:
        def one():
            torch.mm(h, w.T, out=logits)

        t = measure_time(one, dev, budget_s=1.0, timer=timer)
        return {"ms": t.min_ms, "median_ms": t.median_ms, "step": one,
                "what": f"1 GEMM (N x D) @ (D x V), fastest of {t.reps} calls in this run"}
    dz = torch.randn_like(logits)
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    if frozen:
        def two():
            torch.mm(h, w.T, out=logits)
            torch.mm(dz, w, out=dh)

        t = measure_time(two, dev, budget_s=1.0, timer=timer)
        return {"ms": t.min_ms, "median_ms": t.median_ms, "step": two,
                "what": f"2 GEMMs (logits, dh), fastest of {t.reps} calls in this run; the floor for a frozen "
                        "weight if logits were free to keep"}

    def three():
        torch.mm(h, w.T, out=logits)
        torch.mm(dz, w, out=dh)
        torch.mm(dz.T, h, out=dw)

    t = measure_time(three, dev, budget_s=1.0, timer=timer)
    return {"ms": t.min_ms, "median_ms": t.median_ms, "step": three,
            "what": f"3 GEMMs (logits, dh, dW), fastest of {t.reps} calls in this run; the floor if logits were "
                    "free to keep"}


def cases(specs: list[dict], device: torch.device, *, compile_peers: bool) -> list[Case]:
    out = []
    for spec in specs:
        n, d, v = spec["n"], spec["d"], spec["v"]
        dtype = spec["dtype"]
        for mode in spec.get("modes", MODES):
            with_grad = mode.startswith("fwd_bwd")
            frozen = mode == "fwd_bwd_frozen"
            out.append(Case(
                suite="ops", name=f"linear_logprobs.{mode}",
                params={"N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", ""),
                        **({"head": spec["head"]} if spec.get("head") else {}),
                        **({"sweep": spec["sweep"]} if spec.get("sweep") else {})},
                device=device, dtype=dtype, tokens=n,
                make_inputs=(lambda n=n, d=d, v=v, dt=dtype: make_inputs(n, d, v, dt, device)),
                truth=(lambda x, wg=with_grad: truth_logprobs(x["hidden"], x["weight"], x["labels"],
                                                              x["grad"] if wg else None)),
                impls=implementations(device, with_grad, compile_peers=compile_peers, frozen=frozen),
                floor=(lambda x, timer, wg=with_grad, fz=frozen: gemm_floor(x, wg, timer, frozen=fz)),
                check=spec.get("check", True), headline=spec.get("headline", True),
            ))
    return out
