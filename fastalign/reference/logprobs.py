"""Pure-PyTorch token log-probs: the spec every kernel is tested against, and the CPU path (docs/architecture.md,
*The math*).

Notation (per flattened token n, vocabulary entry j):
    a_nj = k * (h_n . W_j + b_j)                raw logit, times the model's logit scale k (Cohere, Granite)
    s_nj = c * tanh(a_nj / c)  (softcap c, if set; else s = a)
    z_nj = s_nj / temperature
    lse_n = log sum_j exp z_nj;  logp_n = z_{n, y_n} - lse_n;  p_nj = exp(z_nj - lse_n)
    mu_n = sum_j p_nj z_nj;      H_n = lse_n - mu_n               (entropy)
Per-token statistics TRL's trainers log (``STATS``), from the same logits, never differentiated:
    mean_logits_n = (1 / V) sum_j z_nj
    is_top1_n = (argmax_j z_nj == y_n), the first index winning ties (torch.argmax, TRL)
    log_sum_sq_probs_n = log sum_j p_nj^2 = logsumexp_j(2 z_nj) - 2 lse_n      (WPO's weights)
Backward, with upstream g_n (for logp) and e_n (for entropy):
    dz_nj = g_n (1[j = y_n] - p_nj) - e_n p_nj (z_nj - mu_n)
    da_nj = k * dz_nj / temperature * (1 - tanh^2(a_nj / c))      (the tanh factor only with softcap)
    dh_n = sum_j da_nj W_j;  dW_j = sum_n da_nj h_n;  db_j = sum_n da_nj

The logit scale multiplies the raw logits, softcap follows and temperature comes last, as TRL's fused head, the
models' own forwards and the samplers apply them.
The chunked functions hold one ``[chunk, V]`` fp32 block at a time, so memory is O(N + chunk * V).
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

from fastalign.reference._common import compute_dtype

DEFAULT_CHUNK = 1024
# the optional per-token statistics, by the names TRL's fused head gives them
STATS = ("mean_logits", "is_top1", "log_sum_sq_probs")


def _transform(raw: torch.Tensor, temperature: float, softcap: float | None, logit_scale: float = 1.0) -> torch.Tensor:
    if logit_scale != 1.0:
        raw = raw * logit_scale
    if softcap is not None:
        raw = softcap * torch.tanh(raw / softcap)
    return raw / temperature if temperature != 1.0 else raw


def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (and entropy) of ``labels`` under ``logits``, in fp32, with autograd.

    Equal to ``torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[..., None])[..., 0]``
    with ignored positions set to 0.

    Args:
        logits: (..., V) any float dtype.
        labels: (...) int; ``ignore_index`` marks positions to skip.
    Returns:
        logprobs: (...) fp32, 0 at ignored positions; entropy: (...) fp32 or None (0 at ignored positions).
    """
    z = logits.float() / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp_all = torch.log_softmax(z, dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    entropy = None
    if return_entropy:
        p = logp_all.exp()
        entropy = torch.logsumexp(z, -1) - (p * z).sum(-1)
        entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_logprobs_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    logit_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The textbook version: materializes every logit in the inputs' dtype promoted to fp32. Tests only."""
    z = linear_logits_naive(hidden, weight, bias, temperature, softcap, logit_scale)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, -1)
    logp = torch.where(valid, z.gather(-1, safe.unsqueeze(-1)).squeeze(-1) - lse, torch.zeros_like(lse))
    entropy = None
    if return_entropy:
        p = torch.softmax(z, -1)
        entropy = torch.where(valid, lse - (p * z).sum(-1), torch.zeros_like(lse))
    return logp, entropy


def linear_logits_naive(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0) -> torch.Tensor:
    """The transformed logits z (..., V) in fp32 (fp64 for fp64 inputs), materialized. Tests only."""
    raw = hidden.to(torch.promote_types(hidden.dtype, torch.float32)) @ weight.to(
        torch.promote_types(weight.dtype, torch.float32)
    ).T
    if bias is not None:
        raw = raw + bias.to(raw.dtype)
    return _transform(raw, temperature, softcap, logit_scale)


def linear_stats_naive(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    stats: tuple[str, ...] = STATS,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
) -> dict[str, torch.Tensor]:
    """The ``stats`` (names from ``STATS``) from materialized logits, as :func:`linear_logprobs_naive`. Tests only."""
    with torch.no_grad():
        z = linear_logits_naive(hidden, weight, bias, temperature, softcap, logit_scale)
        valid = labels != ignore_index
        return _stats(z, torch.logsumexp(z, -1), torch.where(valid, labels, 0).long(), valid, stats)


def _stats(z: torch.Tensor, lse: torch.Tensor, safe: torch.Tensor, valid: torch.Tensor, stats) -> dict:
    """The ``stats`` of a block of transformed logits z (rows, V); 0 (False) at ignored rows."""
    out = {}
    if "mean_logits" in stats:
        out["mean_logits"] = torch.where(valid, z.mean(-1), 0.0)
    if "is_top1" in stats:
        out["is_top1"] = (z.argmax(-1) == safe) & valid  # argmax returns the first maximum: ties go to it
    if "log_sum_sq_probs" in stats:
        out["log_sum_sq_probs"] = torch.where(valid, torch.logsumexp(2 * z, -1) - 2 * lse, 0.0)
    return out


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_entropy: bool,
    logit_scale: float = 1.0,
    stats: tuple[str, ...] = (),
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, dict]:
    """Chunked forward over token rows.

    Args:
        hidden: (N, D); weight: (V, D); labels: (N,) int; bias: (V,) or None.
        stats: names from ``STATS`` to compute in the same pass.
    Returns:
        logp (N,), entropy (N,) or None, lse (N,), mu (N,) or None — fp32 (fp64 for fp64 inputs) — and a dict of
        the ``stats`` asked for: mean_logits, log_sum_sq_probs (N,) fp32 (fp64), is_top1 (N,) bool.
        Ignored rows hold 0 (False) in every output.
    """
    n = hidden.shape[0]
    acc = compute_dtype(hidden)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    valid = labels != ignore_index
    logp = torch.zeros(n, dtype=acc, device=hidden.device)
    lse = torch.zeros_like(logp)
    mu = torch.zeros_like(logp) if need_entropy else None
    extras = {name: torch.zeros(n, dtype=torch.bool if name == "is_top1" else acc, device=hidden.device)
              for name in stats}
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        # the logits as the keep path and the backward form them (the same roundings: lse matches their z)
        z = _scaled_logits(torch.empty((rows.stop - rows.start, w.shape[0]), dtype=acc, device=hidden.device),
                           hidden[rows].to(acc), w, b, temperature, softcap, logit_scale)
        lse_c = torch.logsumexp(z, -1)
        safe = torch.where(valid[rows], labels[rows], 0).long()
        v = valid[rows]
        logp[rows] = torch.where(v, z.gather(-1, safe[:, None])[:, 0] - lse_c, 0.0)
        lse[rows] = torch.where(v, lse_c, 0.0)
        if need_entropy:
            mu_c = (torch.softmax(z, -1) * z).sum(-1)
            mu[rows] = torch.where(v, mu_c, 0.0)
        for name, value in _stats(z, lse_c, safe, v, stats).items():
            extras[name][rows] = value
    entropy = (lse - mu) if need_entropy else None
    return logp, entropy, lse, mu, extras


def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    lse: torch.Tensor,
    mu: torch.Tensor | None,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    needs: tuple[bool, bool, bool] = (True, True, True),
    logit_scale: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    into: tuple | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked backward that recomputes each ``[chunk, V]`` block of logits.

    ``into``: (dh, dW, db) accumulators in the compute dtype (None where not wanted) that the gradients are added
    to instead of being returned (then the result is ``into`` itself, not rounded).

    Args:
        lse, mu: (N,) saved by :func:`linear_logprobs_forward` (``mu`` needed when ``grad_entropy`` is given).
        grad_logp, grad_entropy: (N,) upstream gradients or None.
        needs: which of (d hidden, d weight, d bias) to compute.
    Returns:
        (dh (N, D), dW (V, D), db (V,)) in the inputs' dtypes, accumulated in fp32; None where not needed.
    """
    n = hidden.shape[0]
    acc = compute_dtype(hidden)
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    valid = labels != ignore_index
    need_dh, need_dw, need_db = needs
    if into is not None:
        dh, dw, db = into
    else:
        dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_db and bias is not None) else None
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        v = valid[rows]
        h = hidden[rows].to(acc)
        dcap = torch.empty((h.shape[0], w.shape[0]), dtype=acc, device=h.device) if softcap is not None else None
        z = _scaled_logits(torch.empty((h.shape[0], w.shape[0]), dtype=acc, device=h.device), h, w, b, temperature,
                           softcap, logit_scale, dcap)
        # ignored rows have lse = 0, where exp(z) may overflow: zero them before any product
        p = torch.exp(z - lse[rows, None]).masked_fill_(~v[:, None], 0.0)
        da = None
        if grad_entropy is not None:
            e = torch.where(v, grad_entropy[rows].to(acc), 0.0)
            # -e p (z - mu), not -e p (log p + H): the latter is 0 * -inf where p underflows
            da = (mu[rows, None] - z).mul_(p).mul_(e[:, None])
        if grad_logp is not None:
            g = torch.where(v, grad_logp[rows].to(acc), 0.0)
            dz_logp = p.mul_(-g[:, None])  # p is not needed after this: reuse its memory
            da = dz_logp if da is None else da.add_(dz_logp)
            safe = torch.where(v, labels[rows], 0).long()
            da.scatter_add_(1, safe[:, None], g[:, None])
        if da is None:
            da = torch.zeros_like(z)
        if temperature != 1.0:
            da /= temperature
        if softcap is not None:
            da *= dcap  # 1 - tanh^2(a / c)
        if logit_scale != 1.0:
            da *= logit_scale
        if dh is not None:
            dh[rows] += da @ w
        if dw is not None:
            dw.addmm_(da.T, h)
        if db is not None:
            db += da.sum(0)
    if into is not None:
        return into
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )


# ------------------------------------------------------------------------------- the keep path (logits kept)
# The torch backend's fast path (docs/architecture.md, *The math*, *Cost*): the valid rows are gathered, each
# chunk's logits come from one GEMM written into a buffer (torch.mm / addmm with out=), and the log-softmax is
# taken in place in that buffer (one fused pass), L = z - lse. Of the rows the budget keeps (rows [0, kept) of the
# valid rows), the buffer is then turned in place into what the backward reads:
# - without an entropy gradient, P~ = c' (p - 1[j = y]) (c' = 1 - tanh^2 the softcap's derivative, 1 without a
#   softcap), so that dz = -s g P~ with s = logit_scale / temperature is never formed: dh = -s g (P~ W),
#   dW = P~^T (-s g h), db = P~^T (-s g): one GEMM each over all kept rows, no pass over [kept, V] in the backward;
# - with an entropy gradient, L itself (and c'): p = exp(L), and the entropy's dz term is written with
#   (L + H) = (z - mu), finite where p underflows; dz is formed chunk by chunk in a [chunk, V] buffer.
# The other rows are scored in a reused [chunk, V] buffer.


class Kept(NamedTuple):
    """What the keep path holds of the valid rows' softmax for the backward.

    rows: (R,) int64 indices (into the N flattened tokens) of the valid tokens, in order; the first ``logsm.shape[0]``
    of them are kept. logsm: (K, V), P~ = c' (p - 1[j = y]) when ``probs``, else the log-softmax L. dcap: (K, V) the
    softcap's derivative c' = 1 - tanh^2 (L form with a softcap only) or None; entropy: (K,) or None (L form)."""

    rows: torch.Tensor
    logsm: torch.Tensor
    dcap: torch.Tensor | None
    entropy: torch.Tensor | None
    probs: bool = False


def _buffer(shape, dtype, device) -> torch.Tensor:
    """An uninitialised buffer every element of which is written: all NaN under ``FASTALIGN_POISON=1`` (the tests'
    setting), so a value left unwritten shows."""
    shape = (shape,) if isinstance(shape, int) else shape
    if dtype.is_floating_point and os.environ.get("FASTALIGN_POISON", "0") not in ("", "0"):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _scaled_logits(out, h, w, b, temperature, softcap, logit_scale, dcap=None):
    """z of a chunk written into ``out`` (rows, V): one GEMM (bias, logit scale and temperature folded into it
    without a softcap), in place after it. ``dcap`` (rows, V) receives 1 - tanh^2 when a softcap is set."""
    scale = logit_scale if softcap is not None else logit_scale / temperature
    if b is not None:
        torch.addmm(b, h, w.T, beta=scale, alpha=scale, out=out)
    else:
        torch.mm(h, w.T, out=out)
        if scale != 1.0:
            out.mul_(scale)
    if softcap is not None:
        t = out.div_(softcap).tanh_()
        if dcap is not None:
            torch.mul(t, t, out=dcap).neg_().add_(1.0)
        out.mul_(softcap / temperature)
    return out


_LOG_TINY = -69.0  # log p below this (p < 1e-30): rescored from the logits, not taken from p


def keep_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    ignore_index: int,
    need_entropy: bool,
    logit_scale: float = 1.0,
    stats: tuple[str, ...] = (),
    chunk: int = DEFAULT_CHUNK,
    keep_rows: int = 0,
    compact: bool = True,
    need_lse: bool = True,
):
    """The forward of :func:`linear_logprobs_forward` (same arguments and first five results), computed over the
    valid rows only, ``chunk`` rows at a time, keeping the log-softmax of the first ``keep_rows`` valid rows.
    ``compact=False`` walks every row instead (ignored ones give zeros): no host sync to count the valid rows, as
    CUDA graph capture needs. ``need_lse=False``: the lse of rows not kept is only needed within an ulp or two
    (no recompute follows), so it is taken from the label's entry, without a max pass.

    Returns:
        logp, entropy, lse, mu, extras as :func:`linear_logprobs_forward`, and a :class:`Kept` (its ``logsm``
        holds min(keep_rows, valid rows) rows; with keep_rows 0 nothing is kept).
    """
    n, v = hidden.shape[0], weight.shape[0]
    acc = compute_dtype(hidden)
    dev = hidden.device
    w = weight.to(acc)
    b = bias.to(acc) if bias is not None else None
    valid = labels != ignore_index
    rows = valid.nonzero()[:, 0] if compact else torch.arange(n, device=dev)
    r = rows.numel()
    k = min(max(0, int(keep_rows)), r)
    chunk = max(1, int(chunk))
    logp = torch.zeros(n, dtype=acc, device=dev)
    lse = torch.zeros(n, dtype=acc, device=dev)
    ent = torch.zeros(n, dtype=acc, device=dev) if need_entropy else None
    extras = {name: torch.zeros(n, dtype=torch.bool if name == "is_top1" else acc, device=dev) for name in stats}
    logsm = _buffer((k, v), acc, dev)
    probs = not need_entropy  # the P~ form (see above): the backward needs no pass over [kept, V]
    # c' of every kept row (L form), or of one chunk at a time (P~ form: only c' at the label is kept)
    dcap = _buffer((k if not probs else min(chunk, k), v), acc, dev) if (softcap is not None and k) else None
    kept_ent = _buffer(k, acc, dev) if need_entropy else None
    work = _buffer((min(chunk, r - k), v), acc, dev) if r > k else None
    prob = _buffer((min(chunk, r), v), acc, dev) if need_entropy and r else None
    hv = hidden.index_select(0, rows) if r < n else hidden
    yv = labels.index_select(0, rows) if r < n else torch.where(valid, labels, 0)
    # kept rows in chunks that do not straddle the kept / scored boundary
    bounds = [(s, min(s + chunk, k)) for s in range(0, k, chunk)] + [(s, min(s + chunk, r)) for s in range(k, r, chunk)]
    logp_v = _buffer(r, acc, dev)
    lse_v = _buffer(r, acc, dev)
    ent_v = _buffer(r, acc, dev) if need_entropy else None
    stat_v = {name: _buffer(r, extras[name].dtype, dev) for name in stats}
    for s, e in bounds:
        c = e - s
        z = logsm[s:e] if s < k else work[:c]
        dc = (dcap[:c] if probs else dcap[s:e]) if (dcap is not None and s < k) else None
        _scaled_logits(z, hv[s:e].to(acc), w, b, temperature, softcap, logit_scale, dc)
        y = yv[s:e, None]
        if "mean_logits" in stats:
            stat_v["mean_logits"][s:e] = z.mean(-1)
        # lse = z_j - L_j at the arg-max j, where L_j = -log sum e^(z - max) is exact: as precise as logsumexp.
        # Wanted where the backward recomputes (rows not kept) or for the statistics; one read of the chunk.
        top = z.max(-1) if (s >= k and need_lse) or "is_top1" in stats else None
        if "is_top1" in stats:
            stat_v["is_top1"][s:e] = top.indices == y[:, 0]
        zy = z.gather(1, y)[:, 0] if top is None else None
        if s < k and probs and compact:
            # p itself, in place (one fused pass, as the log-softmax would be), and log p_y: no exp pass for P~.
            # log p_y is exact to an ulp where p_y is normal; the rare rows where it is not are rescored exactly
            # (their logits rebuilt: a GEMM over those rows only; the count reads the host, hence CPU only)
            zy = z.gather(1, y)[:, 0] if zy is None else zy
            torch._softmax(z, -1, False, out=z)
            ly = torch.log(z.gather(1, y)[:, 0])
            tiny = (ly < _LOG_TINY).nonzero()[:, 0]
            if tiny.numel():
                zt = _scaled_logits(torch.empty((tiny.numel(), v), dtype=acc, device=dev),
                                    hv[s:e].index_select(0, tiny).to(acc), w, b, temperature, softcap, logit_scale)
                ly[tiny] = zt.gather(1, y[tiny])[:, 0] - torch.logsumexp(zt, -1)
            logp_v[s:e] = ly
            lse_v[s:e] = zy - ly
            if "log_sum_sq_probs" in stats:  # log sum p^2: the sum is at least max p^2 >= 1 / V^2, no underflow
                stat_v["log_sum_sq_probs"][s:e] = torch.einsum("ij,ij->i", z, z).log_()
            z.scatter_add_(1, y, torch.full((c, 1), -1.0, dtype=acc, device=dev))  # P~ = c' (p - 1[j = y])
            if dc is not None:
                z.mul_(dc)
            continue
        torch._log_softmax(z, -1, False, out=z)  # L = z - lse, in place: one fused pass
        ly = z.gather(1, y)[:, 0]
        logp_v[s:e] = ly
        lse_v[s:e] = (zy - ly) if top is None else top.values - z.gather(1, top.indices[:, None])[:, 0]
        if "log_sum_sq_probs" in stats:  # log sum p^2 = logsumexp(2 L)
            stat_v["log_sum_sq_probs"][s:e] = torch.logsumexp(z * 2, -1)
        if need_entropy:
            p = torch.exp(z, out=prob[:c])
            h_c = torch.einsum("ij,ij->i", p, z).neg_()  # H = -sum p L
            ent_v[s:e] = h_c
            if s < k:
                kept_ent[s:e] = h_c
        elif s < k:  # P~ = c' (exp(L) - 1[j = y]), in place
            z.exp_()
            z.scatter_add_(1, y, torch.full((c, 1), -1.0, dtype=acc, device=dev))
            if dc is not None:
                z.mul_(dc)
    vr = valid.index_select(0, rows) if r < n else valid
    logp[rows] = torch.where(vr, torch.clamp_max(logp_v, 0.0), 0.0)
    lse[rows] = torch.where(vr, lse_v, 0.0)
    for name in stats:
        extras[name][rows] = torch.where(vr, stat_v[name], False if name == "is_top1" else 0.0)
    mu = None
    if need_entropy:
        ent[rows] = torch.where(vr, ent_v, 0.0)
        mu = torch.where(valid, lse - ent, 0.0)
    return logp, ent, lse, mu, extras, Kept(rows, logsm, None if probs else dcap, kept_ent, probs)


def keep_backward(
    kept: Kept,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    grad_logp: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    *,
    temperature: float,
    softcap: float | None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    chunk: int = DEFAULT_CHUNK,
    dh: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
    db: torch.Tensor | None = None,
    fresh: bool = False,
) -> None:
    """Add the gradients of the kept rows into the accumulators ``dh`` (N, D), ``dw`` (V, D), ``db`` (V,) (compute
    dtype; None: not wanted), from the kept log-softmax: 2 GEMMs a chunk, no logits recomputed.

    grad_logp, grad_entropy: (N,) per-token upstream gradients or None (indexed like the flattened tokens);
    labels: the (N,) labels with ``ignore_index`` at ignored tokens, which get no gradient. ``fresh`` (the P~ form
    only, every valid token kept): ``dw`` and, with every token valid, ``dh`` are uninitialised and written."""
    k = kept.logsm.shape[0]
    if k == 0 or (dh is None and dw is None and db is None) or (grad_logp is None and grad_entropy is None):
        return
    acc = kept.logsm.dtype
    dev = kept.logsm.device
    w = weight.to(acc)
    rows = kept.rows[:k]
    scale = logit_scale / temperature
    y = labels.index_select(0, rows)
    ok = y != ignore_index  # all True when the rows were compacted
    g = torch.where(ok, grad_logp.index_select(0, rows).to(acc) * scale, 0.0) if grad_logp is not None else None
    e = torch.where(ok, grad_entropy.index_select(0, rows).to(acc) * scale, 0.0) if grad_entropy is not None else None
    y = torch.where(ok, y, 0)
    chunk = max(1, int(chunk))
    v = kept.logsm.shape[1]
    work = torch.empty((min(chunk, k), v), dtype=acc, device=dev)
    work2 = torch.empty_like(work) if e is not None else None
    # all tokens valid: the kept rows are 0..k-1, slices instead of gathers
    contiguous = kept.rows.numel() == hidden.shape[0]
    if kept.probs:
        _keep_backward_probs(kept, hidden, w, y, g, contiguous, dh, dw, db, fresh)
        return
    dh_v = (dh[:k] if contiguous else torch.empty((k, hidden.shape[1]), dtype=acc, device=dev)) if dh is not None \
        else None
    for s in range(0, k, chunk):
        t = min(s + chunk, k)
        c = t - s
        L = kept.logsm[s:t]
        dz = torch.exp(L, out=work[:c])  # p
        if e is not None:
            # dz = g (1[j = y] - p) - e p (L + H): -p (g + e (L + H)) + g 1[j = y]
            q = torch.add(L, kept.entropy[s:t, None], out=work2[:c]).mul_(e[s:t, None])
            if g is not None:
                q.add_(g[s:t, None])
            dz.mul_(q).neg_()
        else:
            dz.mul_(-g[s:t, None])
        if g is not None:
            dz.scatter_add_(1, y[s:t, None], g[s:t, None])
        if kept.dcap is not None:
            dz.mul_(kept.dcap[s:t])
        if dh_v is not None:
            dh_v[s:t].addmm_(dz, w) if contiguous else torch.mm(dz, w, out=dh_v[s:t])
        if dw is not None:
            h = hidden[s:t] if contiguous else hidden.index_select(0, rows[s:t])
            dw.addmm_(dz.T, h.to(acc))
        if db is not None:
            db.add_(dz.sum(0))
    if dh is not None and not contiguous:
        dh.index_add_(0, rows, dh_v)


def _keep_backward_probs(kept: Kept, hidden, w, y, g, contiguous: bool, dh, dw, db, fresh: bool = False) -> None:
    """The P~ form of :func:`keep_backward` (``g`` already times logit_scale / temperature, 0 at ignored rows): one
    GEMM for dh and one for dW over all kept rows, O(K D) work besides. ``fresh``: ``dh`` (when every token is
    kept) and ``dw`` hold no values yet and are written, not added to (no zero fill)."""
    k = kept.logsm.shape[0]
    acc = kept.logsm.dtype
    rows = kept.rows[:k]
    pt = kept.logsm
    gn = g.neg()  # dz = -s g P~
    if dh is not None:  # dh = -s g (P~ W)
        if contiguous and fresh:
            torch.mm(pt, w, out=dh[:k]).mul_(gn[:, None])
        elif contiguous:
            dh[:k].addcmul_(torch.mm(pt, w), gn[:, None])
        else:
            dh.index_add_(0, rows, torch.mm(pt, w).mul_(gn[:, None]))
    if dw is not None or db is not None:
        if dw is not None:  # dW = P~^T (-s g h)
            h = (hidden[:k] if contiguous else hidden.index_select(0, rows)).to(acc)
            gh = h * gn[:, None]
            if fresh:
                torch.mm(pt.T, gh, out=dw)
            else:
                dw.addmm_(pt.T, gh)
        if db is not None:
            db.addmv_(pt.T, gn)
