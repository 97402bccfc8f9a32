"""TRL in one line: ``fastalign.integrations.trl.enable()`` runs TRL's trainers on fastalign's fused LM head.

TRL 1.16 patches every trainer's model (DPO, GRPO, SFT, KTO, RLOO) with ``trl.trainer.utils.add_fused_lm_head``,
whose forward runs the backbone, selects the valid positions and calls ``_ChunkedLogProbFunction.apply(...)``, a
global of ``trl.trainer.utils`` looked up at call time. That autograd function is the seam: :func:`enable` puts
:class:`TRLFusedHead` in its place (in ``trl.trainer.utils`` and under every other name a loaded ``trl`` module
holds it by), so TRL's own loss math, PEFT, FSDP, MoE and ZeRO-3 handling are untouched and no objective can drift.

:class:`TRLFusedHead` takes TRL's arguments and returns TRL's outputs — per-token ``log_probs`` and ``entropy``
(differentiable) and the metrics ``log_sum_sq_probs``, ``mean_logits``, ``is_top1`` (not differentiable, as in
TRL) — computed by :func:`fastalign.linear_logprobs`'s head in one pass over the vocabulary: the Triton kernels on
CUDA tensors, the chunked PyTorch reference on CPU (``backend=`` / ``FASTALIGN_BACKEND`` choose otherwise). Like
TRL's, it runs the head in the autocast dtype when autocast is on (else in the hidden states' dtype), returns
gradients in the inputs' dtypes, and re-gathers a ZeRO-3 partitioned head for its backward. TRL's ``chunk_size``
(the width of its cuBLAS vocabulary tiles) has no counterpart: fastalign's head picks its own tiles.

The integration checks the installed TRL: the version (1.16.x), the replaced function's signature, its list of
optional outputs, and that ``add_fused_lm_head`` looks the function up by that global name. Anything else raises
a RuntimeError naming what it found and what it expects, and nothing is patched.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import types

import torch

from fastalign._backend import BACKENDS
from fastalign.integrations._common import autocast_dtype, cast
from fastalign.ops.logprobs import (
    head_backward,
    head_forward,
    keep_head_backward,
    keep_head_forward,
    plan_head,
    prepare_head,
    resolve_head_backend,
    rounded,
)

OP = "fastalign.integrations.trl"
SUPPORTED_TRL = (1, 16)
# trl.trainer.utils._ChunkedLogProbFunction.forward in TRL 1.16, and its outputs beside the log-probs
EXPECTED_PARAMETERS = ("ctx", "hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                       "final_logit_softcapping", "logit_scale", "outputs")
EXPECTED_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
SEAM = "_ChunkedLogProbFunction"  # the global of trl.trainer.utils that add_fused_lm_head calls
# the names TRL's ``outputs`` may hold ("log_probs" is always computed)
_KNOWN_OUTPUTS = ("log_probs", *EXPECTED_OUTPUTS)


class _State:
    backend = "auto"
    original = None  # TRL's class while enabled
    sites: list = []  # (module, attribute) pairs that held it
    scanned: tuple = (None, [])  # ((id of TRL's class, len(sys.modules)), its sites) of the last scan


def _sites(original) -> list:
    """Every (module, attribute) of a loaded ``trl`` module that holds ``original``; rescanned only when modules
    were imported since the last scan (a scan of sys.modules costs milliseconds, ``enabled()`` may run per step)."""
    key = (id(original), len(sys.modules))
    if _State.scanned[0] != key:
        modules = [m for name, m in list(sys.modules.items()) if name == "trl" or name.startswith("trl.")]
        sites = [(m, attr) for m in modules for attr, value in list(vars(m).items()) if value is original]
        _State.scanned = (key, sites)
    return [(m, attr) for m, attr in _State.scanned[1] if getattr(m, attr, None) is original]


class TRLFusedHead(torch.autograd.Function):
    """A drop-in for TRL 1.16's ``ChunkedLogProbFunction``: same arguments, same outputs and dtypes.

    Returns (log_probs (N,) fp32, entropy (N,) fp32 or None, log_sum_sq_probs (N,) fp32 or None,
    mean_logits (N,) fp32 or None, is_top1 (N,) bool or None); the last three are not differentiable. It runs as
    :func:`fastalign.linear_logprobs` does: on the torch backend the tokens the head's memory budget holds keep their
    softmax for the backward (``fastalign.last_head_plan()``), the others save 8 bytes a token (lse, and mu with
    entropy) and the backward recomputes their logits tile by tile.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=EXPECTED_OUTPUTS):
        unknown = [name for name in outputs if name not in _KNOWN_OUTPUTS]
        if unknown:
            raise ValueError(f"{OP}: outputs must be names from {_KNOWN_OUTPUTS}, got {unknown}")
        ctx.set_materialize_grads(False)  # an entropy logged only gets None, not zeros to multiply
        dtype = autocast_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            head = prepare_head(
                cast(hidden, dtype), cast(weight, dtype), targets, bias=cast(bias, dtype),
                temperature=temperature, softcap=final_logit_softcapping, logit_scale=logit_scale, op=OP,
            )
            backend = resolve_head_backend(_State.backend, head, op=OP)
            stats = tuple(name for name in ("mean_logits", "is_top1", "log_sum_sq_probs") if name in outputs)
            need_entropy = "entropy" in outputs
            ctx.kept = None
            if backend == "torch":  # the same memory-budgeted path as fastalign.linear_logprobs (HeadPlan)
                plan = plan_head(head, backend, op=OP, needs=tuple(ctx.needs_input_grad[:3]),
                                 need_entropy=need_entropy)
                logp, entropy, lse, mu, extras, kept = keep_head_forward(head, plan, need_entropy=need_entropy,
                                                                         stats=stats)
                ctx.kept, ctx.chunk = (kept, plan.chunk_rows) if kept.logsm.shape[0] else (None, 0)
            else:
                logp, entropy, lse, mu, extras = head_forward(head, backend, need_entropy=need_entropy, stats=stats)
        ctx.head = head._replace(hidden=None, weight=None, bias=None)
        ctx.backend, ctx.dtype = backend, dtype
        # the parameters themselves, not their casts: ZeRO-3 frees and re-gathers them, and a cast would hold a
        # second copy of the head until the backward
        ctx.save_for_backward(hidden, weight, bias, lse, mu)
        metrics = [extras.get(name) for name in ("log_sum_sq_probs", "mean_logits", "is_top1")]
        ctx.mark_non_differentiable(*(m for m in metrics if m is not None))
        return (logp, entropy, *metrics)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_):
        hidden, weight, bias, lse, mu = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        if (grad_logp is None and grad_entropy is None) or not any(needs):
            return (None,) * 9
        from trl.trainer.utils import maybe_gather_lm_head_ctx

        with maybe_gather_lm_head_ctx(weight, bias), torch.autocast(hidden.device.type, enabled=False):
            head = ctx.head._replace(hidden=cast(hidden, ctx.dtype), weight=cast(weight, ctx.dtype),
                                     bias=cast(bias, ctx.dtype))
            if ctx.kept is not None:
                dh, dw, db = rounded(head, *keep_head_backward(head, ctx.kept, lse, mu, grad_logp, grad_entropy,
                                                               needs, ctx.chunk))
            else:
                dh, dw, db = head_backward(head, ctx.backend, lse, mu, grad_logp, grad_entropy, needs)
        return (cast(dh, hidden.dtype), cast(dw, weight.dtype), cast(db, bias.dtype if bias is not None else None),
                None, None, None, None, None, None)


# ------------------------------------------------------------------------------------------------ the check

def _names_called(code: types.CodeType) -> set[str]:
    """Every global name a function and the functions defined inside it look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_called(const)
    return names


def _describe(fn) -> str:
    try:
        return f"forward{inspect.signature(fn.forward)}"
    except (TypeError, ValueError, AttributeError):
        return repr(fn)


def _check_trl():
    """TRL's module and the class :func:`enable` replaces, after checking they are the ones this was written for."""
    try:
        import trl
        from trl.trainer import utils
    except ImportError as exc:
        raise ImportError(f"{OP} needs TRL {SUPPORTED_TRL[0]}.{SUPPORTED_TRL[1]} (pip install "
                          f"'trl=={SUPPORTED_TRL[0]}.{SUPPORTED_TRL[1]}.*'): {exc}") from exc
    from packaging.version import InvalidVersion, Version

    version = getattr(trl, "__version__", "unknown")
    original = _State.original or getattr(utils, SEAM, None)
    found = []
    try:
        if Version(version).release[:2] != SUPPORTED_TRL:
            found.append(f"version {version}")
    except InvalidVersion:
        found.append(f"version {version!r}")
    params = None
    if original is not None:
        try:
            params = tuple(inspect.signature(original.forward).parameters)
        except (TypeError, ValueError, AttributeError):
            pass
    if params != EXPECTED_PARAMETERS:
        found.append(f"trl.trainer.utils.{SEAM} = {_describe(original) if original is not None else 'missing'}")
    outputs = getattr(sys.modules.get(getattr(original, "__module__", "")), "OPTIONAL_OUTPUTS", None)
    if params == EXPECTED_PARAMETERS and tuple(outputs or ()) != EXPECTED_OUTPUTS:
        found.append(f"OPTIONAL_OUTPUTS = {outputs}")
    add_head = getattr(utils, "add_fused_lm_head", None)
    if add_head is None or SEAM not in _names_called(add_head.__code__):
        found.append(f"add_fused_lm_head does not call {SEAM}")
    if found:
        raise RuntimeError(
            f"{OP} was written for TRL {SUPPORTED_TRL[0]}.{SUPPORTED_TRL[1]}, whose add_fused_lm_head calls "
            f"trl.trainer.utils.{SEAM}.apply with forward({', '.join(EXPECTED_PARAMETERS)}) and optional outputs "
            f"{EXPECTED_OUTPUTS}; found TRL {version} with {'; '.join(found)}. Nothing was patched: pin "
            f"trl=={SUPPORTED_TRL[0]}.{SUPPORTED_TRL[1]}.* or call fastalign's ops directly."
        )
    return original


# -------------------------------------------------------------------------------------------- the switch

def is_enabled() -> bool:
    """Whether TRL's fused head is fastalign's now."""
    return _State.original is not None


def enable(*, backend: str = "auto") -> None:
    """Swap TRL's fused LM head for fastalign's in every TRL trainer (idempotent).

    Args:
        backend: the head's backend, as in :func:`fastalign.linear_logprobs` ("auto": Triton on CUDA tensors, the
            PyTorch reference on CPU).

    Raises:
        ImportError: TRL is not installed.
        RuntimeError: the installed TRL is not the version / API this integration was written for (nothing patched).
        ValueError: an unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{OP}.enable: backend must be one of {BACKENDS}, got {backend!r}")
    original = _check_trl()
    if not is_enabled():
        sites = _sites(original)
        for module, name in sites:
            setattr(module, name, TRLFusedHead)
        _State.original, _State.sites = original, sites
    _State.backend = backend


def disable() -> None:
    """Put TRL's own fused head back (a no-op when not enabled)."""
    for module, name in _State.sites:
        setattr(module, name, _State.original)
    _State.original, _State.sites, _State.backend = None, [], "auto"


@contextlib.contextmanager
def enabled(*, backend: str = "auto"):
    """``with enabled(): trainer.train()`` — fastalign's head inside the block, the previous state after it."""
    was_enabled, previous_backend = is_enabled(), _State.backend
    enable(backend=backend)
    try:
        yield
    finally:
        if was_enabled:
            _State.backend = previous_backend
        else:
            disable()
