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
        raw = hidden[rows].to(acc) @ w.T
        if b is not None:
            raw += b
        z = _transform(raw, temperature, softcap, logit_scale)
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
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Chunked backward that recomputes each ``[chunk, V]`` block of logits.

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
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_dw else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (need_db and bias is not None) else None
    for start in range(0, n, chunk):
        rows = slice(start, min(start + chunk, n))
        v = valid[rows]
        h = hidden[rows].to(acc)
        raw = h @ w.T
        if b is not None:
            raw += b
        z = _transform(raw, temperature, softcap, logit_scale)
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
            da *= 1 - torch.tanh(raw * logit_scale / softcap) ** 2
        if logit_scale != 1.0:
            da *= logit_scale
        if dh is not None:
            dh[rows] = da @ w
        if dw is not None:
            dw += da.T @ h
        if db is not None:
            db += da.sum(0)
    return (
        dh.to(hidden.dtype) if dh is not None else None,
        dw.to(weight.dtype) if dw is not None else None,
        db.to(bias.dtype) if db is not None else None,
    )
