"""Seeded inputs shared by the op tests: each call draws from its own generator, so a case's inputs depend only on
its seed."""
import zlib

import torch


def stable_seed(*key) -> int:
    """A per-case seed that is the same in every process (str hashes are not)."""
    return zlib.crc32(repr(key).encode()) % 10_000


def randn(*shape, seed, dtype=torch.float32, scale=1.0, device="cpu"):
    """Standard normal values drawn in float64, times ``scale``, then cast (bf16-exact when dtype is bf16)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def random_mask(batch, length, seed, device="cpu"):
    """(B, T) bool, ~75% valid, with row B // 2 all masked."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=g) > 0.25
    mask[batch // 2] = False
    return mask.to(device)


def policy_case(shape, seed, per_sequence_adv, *, dtype=torch.float32, adv_dtype=None, device="cpu"):
    """(logprobs, old_logprobs, advantages, mask) of a PPO batch: ratios around exp(+-0.3), advantages (B,) per
    sequence or (B, T) per token, in ``adv_dtype`` (default ``dtype``)."""
    logp = randn(*shape, seed=seed, scale=0.3, dtype=dtype, device=device)
    old = (logp.double() + randn(*shape, seed=seed + 1, scale=0.3, dtype=torch.float64, device=device)).to(dtype)
    adv_shape = shape[:1] if per_sequence_adv else shape
    adv = randn(*adv_shape, seed=seed + 2, dtype=dtype if adv_dtype is None else adv_dtype, device=device)
    return logp, old, adv, random_mask(*shape, seed + 3, device=device)
