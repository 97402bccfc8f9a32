"""linear_logprobs: per-token log-probs from hidden states and the LM head, forward+backward and forward only.

Work per case (N tokens, D hidden, V vocab): forward+backward of ``sum(logp * g)`` with a random per-token ``g``
(never all ones), or the forward alone under ``torch.no_grad`` (reference / old-policy scoring). Inputs: hidden
~ N(0, 1), weight ~ N(0, (3/sqrt(D))^2) so logits have std ~3 (a realistic scale: a 1/sqrt(D) init gives a
near-uniform softmax that flatters gradient-skipping tricks), every label valid.

Implementations: fastalign (each backend), the naive PyTorch line, TRL's ``selective_log_softmax`` on logits and
its chunked log-prob-from-hidden path (``trl.kernels.ChunkedLogProbFunction``), Liger-Kernel's fused linear cross
entropy with ``reduction="none"``, Cut Cross-Entropy (default gradient filter, exact, and its torch.compile impl).
Floor: the cuBLAS GEMMs of the same shapes measured in the same run (1 for forward, 3 for forward+backward, i.e.
the cost if [N, V] logits were free to keep).
"""
from __future__ import annotations

import torch

import fastalign as fa

from . import peers
from .runner import Case, Impl, Prepared
from .timing import measure_time

LOGIT_STD = 3.0
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


def _wrap(fn, with_grad: bool):
    """Build Impl.prepare for a log-prob function: fresh leaves per implementation, same inputs."""

    def prepare(inputs: dict) -> Prepared:
        y, g = inputs["labels"], inputs["grad"]
        if with_grad:
            h = inputs["hidden"].detach().clone().requires_grad_()
            w = inputs["weight"].detach().clone().requires_grad_()

            def step():
                logp = fn(h, w, y)
                (logp.float() * g).sum().backward()
                return {"logp": logp.detach().float(), "grad_hidden": h.grad, "grad_weight": w.grad}

            return Prepared(step, grad_to_none=[h, w])
        h, w = inputs["hidden"], inputs["weight"]

        def step():
            with torch.no_grad():
                return {"logp": fn(h, w, y).float()}

        return Prepared(step)

    return prepare


def implementations(device: torch.device, with_grad: bool, *, compile_peers: bool) -> list[Impl]:
    impls: list[Impl] = []
    for backend in peers.fastalign_backends(device.type, op_family="logprobs"):
        fn = (lambda b: (lambda h, w, y: fa.linear_logprobs(h, w, y, backend=b).logprobs))(backend)
        impls.append(Impl(peers.backend_label(backend, device.type), "fastalign", _wrap(fn, with_grad)))
    impls.append(Impl("naive torch: (h@W.T).float().log_softmax", "naive", _wrap(_naive, with_grad),
                      is_baseline=True))

    sls, why = peers.load("trl.selective_log_softmax")
    impls.append(Impl("TRL selective_log_softmax (logits in dtype)", "trl",
                      _wrap(lambda h, w, y: sls(h @ w.T, y), with_grad) if sls else None, missing=why))

    chunked, why = peers.load("trl.chunked")
    if chunked:
        fn_cls, chunk = chunked
        trl_fn = (lambda h, w, y: fn_cls.apply(h, w, None, y, 1.0, chunk, None, 1.0, ())[0])
    impls.append(Impl("TRL chunked log-prob from hidden", "trl", _wrap(trl_fn, with_grad) if chunked else None,
                      missing=why, note=f"ChunkedLogProbFunction, chunk {chunked[1]}" if chunked else ""))

    liger, why = peers.load("liger.flce")
    if liger and device.type != "cuda":
        liger, why = None, "Liger-Kernel's fused linear cross entropy needs CUDA (Triton kernels)"
    impls.append(Impl("Liger fused linear CE (reduction=none)", "liger",
                      _wrap(lambda h, w, y: -liger(h, w, y, reduction="none"), with_grad) if liger else None,
                      missing=why))

    cce, why = peers.load("cce")
    cce_why = why or ("" if device.type == "cuda" else "CCE's Triton implementation needs CUDA")
    impls.append(Impl("CCE (default gradient filter)", "cce",
                      _wrap(lambda h, w, y: -cce(h, w, y, reduction="none"), with_grad) if not cce_why else None,
                      missing=cce_why, note="approximate gradients by design"))
    impls.append(Impl("CCE exact (filter_eps=None)", "cce",
                      _wrap(lambda h, w, y: -cce(h, w, y, reduction="none", filter_eps=None), with_grad)
                      if not cce_why else None, missing=cce_why))
    if compile_peers:
        impls.append(Impl("CCE torch_compile impl", "compile",
                          _wrap(lambda h, w, y: -cce(h, w, y, reduction="none", impl="torch_compile"), with_grad)
                          if cce else None, missing=why))
    return impls


def gemm_floor(inputs: dict, with_grad: bool, timer: str) -> dict:
    """Time of the cuBLAS/MKL GEMMs of this shape, measured now on this device."""
    h, w = inputs["hidden"], inputs["weight"]
    dev = h.device
    logits = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=dev)
    if not with_grad:
        t = measure_time(lambda: torch.mm(h, w.T, out=logits), dev, budget_s=1.0, timer=timer)
        return {"ms": t.min_ms, "median_ms": t.median_ms,
                "what": f"1 GEMM (N x D) @ (D x V), fastest of {t.reps} calls in this run"}
    dz = torch.randn_like(logits)
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    def three():
        torch.mm(h, w.T, out=logits)
        torch.mm(dz, w, out=dh)
        torch.mm(dz.T, h, out=dw)

    t = measure_time(three, dev, budget_s=1.0, timer=timer)
    return {"ms": t.min_ms, "median_ms": t.median_ms,
            "what": f"3 GEMMs (logits, dh, dW), fastest of {t.reps} calls in this run; the floor if logits were "
                    "free to keep"}


def cases(specs: list[dict], device: torch.device, *, compile_peers: bool) -> list[Case]:
    out = []
    for spec in specs:
        n, d, v = spec["n"], spec["d"], spec["v"]
        dtype = spec["dtype"]
        for mode in spec.get("modes", ("fwd_bwd", "fwd")):
            with_grad = mode == "fwd_bwd"
            out.append(Case(
                suite="ops", name=f"linear_logprobs.{mode}",
                params={"N": n, "D": d, "V": v, "dtype": str(dtype).replace("torch.", ""),
                        **({"head": spec["head"]} if spec.get("head") else {}),
                        **({"sweep": spec["sweep"]} if spec.get("sweep") else {})},
                device=device, dtype=dtype, tokens=n,
                make_inputs=(lambda n=n, d=d, v=v, dt=dtype: make_inputs(n, d, v, dt, device)),
                truth=(lambda x, wg=with_grad: truth_logprobs(x["hidden"], x["weight"], x["labels"],
                                                              x["grad"] if wg else None)),
                impls=implementations(device, with_grad, compile_peers=compile_peers),
                floor=(lambda x, timer, wg=with_grad: gemm_floor(x, wg, timer)),
                check=spec.get("check", True), headline=spec.get("headline", True),
            ))
    return out
