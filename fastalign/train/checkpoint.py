"""Checkpoints: ``save_pretrained`` weights (safetensors) + everything needed to continue bit-for-bit.

Layout of ``RUN_DIR/checkpoints/step-000010/``::

    model/               save_pretrained (config.json, model.safetensors; adapter_* files for LoRA) + tokenizer
    value/ ...           the same for each extra trained model (a PPO value model)
    trainer_state.pt     algorithm, step, optimizer, scheduler, data position and other ``extra`` state, counters
    rng-rank0.pt ...     python, numpy, torch (and CUDA) RNG state of each process
    rank0-state.pt ...   per-process state that is not the same on every rank (the rollout in use), when there is any
    MANIFEST.json        every file above with its size and SHA-256 (manifest.py)
    COMPLETE             written last; a directory without it is ignored

Written into ``checkpoints/.tmp-step-000010`` and renamed when complete, so a crash never leaves a checkpoint
that looks whole; a resume verifies the manifest and falls back past checkpoints that fail (``resume.py``).
Weights holding NaN/inf are never saved. The ``.pt`` files are our own pickles: ``torch.load(weights_only=False)``
of trusted files.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastalign.train import distributed, manifest
from fastalign.train.models import unwrap

_STEP_DIR = re.compile(r"^step-(\d+)$")
KILL_ENV = "FASTALIGN_TEST_KILL_AT"  # "<stage>[@<step>]": SIGKILL this process at that stage of a save (tests only)


class NonFiniteWeights(RuntimeError):
    """The weights hold NaN/inf: they are not saved (the last checkpoint stays the newest)."""


def fault_point(stage: str, step: int | str) -> None:
    """The kill tests' hook: with ``FASTALIGN_TEST_KILL_AT=stage`` (or ``stage@step``) set, the process SIGKILLs
    itself here, as a crash at that point of a save would stop it. A no-op otherwise."""
    spec = os.environ.get(KILL_ENV)
    if spec:
        name, _, at = spec.partition("@")
        if name == stage and at in ("", str(step)):
            os.kill(os.getpid(), signal.SIGKILL)


def check_finite(models: dict[str, nn.Module], where: str) -> None:
    """Raise :class:`NonFiniteWeights` (on every process) when any parameter holds NaN/inf (collective)."""
    bad = []
    for model_name, model in models.items():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # an FSDP2 shard
            if not bool(torch.isfinite(local.detach()).all()):
                bad.append(f"{model_name}: {name}")
    if distributed.sum_over_processes([len(bad)])[0]:
        raise NonFiniteWeights(f"the weights hold NaN/inf ({', '.join(bad[:3]) or 'on another process'}); not saved "
                               f"to {where}, the newest checkpoint is kept as it is")


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Gathered CPU state dict of an FSDP2-wrapped model, keys as the unwrapped model names them; None when
    the model is not sharded (save_pretrained reads the parameters directly)."""
    if not distributed.is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    # the gather returns tied weights as separate copies; save_pretrained's own layout keeps only the source
    hf = unwrap(model)
    tied = getattr(hf, "_tied_weights_keys", None) or {}
    if getattr(hf.config, "tie_word_embeddings", False) and isinstance(tied, dict):
        for key in tied:
            sd.pop(key, None)
    return sd


def save_model(model: nn.Module, path: str | Path, tokenizer=None, *, is_main: bool = True) -> None:
    """save_pretrained (safetensors) of the unwrapped model, plus the tokenizer. Collective under FSDP2."""
    state = full_state_dict(model)  # every rank joins the gather
    if not is_main:
        return
    hf = unwrap(model, keep_peft=True)  # peft saves and loads its adapters
    kwargs = {"state_dict": state} if state is not None else {}
    hf.save_pretrained(str(path), safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load save_pretrained weights from ``path`` into an (unwrapped, unsharded) model in place."""
    from safetensors.torch import load_file

    path = Path(path)
    hf = unwrap(model, keep_peft=True)  # peft saves and loads its adapters
    if is_peft(hf):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(hf, load_file(str(path / "adapter_model.safetensors")))
        bad = [k for k in getattr(result, "unexpected_keys", [])]
        if bad:
            raise RuntimeError(f"{path}: unexpected adapter keys {bad[:5]}")
        return
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(file)))
    if not state:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    base = unwrap(hf)
    missing, unexpected = base.load_state_dict(state, strict=False)
    tied = set(getattr(base, "_tied_weights_keys", None) or [])
    tied |= {"lm_head.weight"} if getattr(base.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"{path}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def optimizer_state(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state; under FSDP2 gathered into a full (unsharded) CPU state keyed by parameter name."""
    if any(distributed.is_fsdp(m) for m in models.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(nn.ModuleDict(models), optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return optimizer.state_dict()


def load_optimizer_state(models: dict[str, nn.Module], optimizer: torch.optim.Optimizer, state: dict) -> None:
    if any(distributed.is_fsdp(m) for m in models.values()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(nn.ModuleDict(models), optimizer, state,
                                 options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    else:
        optimizer.load_state_dict(state)


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoints under ``run_dir/checkpoints`` that carry COMPLETE, newest first (not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / manifest.COMPLETE).is_file()]
    return sorted(done, key=step_of, reverse=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints``, or None (``resume.select_checkpoint`` also
    verifies it)."""
    return next(iter(complete_checkpoints(run_dir)), None)


def save_checkpoint(run_dir: str | Path, step: int, *, models: dict[str, nn.Module], optimizer, scheduler, info,
                    tokenizer=None, extra: dict | None = None, counters: dict | None = None, keep: int = 0,
                    rank_state: dict | None = None, algorithm: str | None = None) -> Path:
    """Write a checkpoint atomically (a collective: call it on every rank). Returns its directory.

    ``extra``: objects with ``state_dict`` whose state is the same on every process (saved once);
    ``rank_state``: the same for state each process holds its own of (saved per process)."""
    final = checkpoint_dir(run_dir, step)
    check_finite(models, str(final))
    tmp = final.parent / f".tmp-{final.name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    fault_point("tmp-created", step)
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    if rank_state:
        torch.save({name: obj.state_dict() for name, obj in rank_state.items()}, tmp / f"rank{info.rank}-state.pt")
    for name, model in models.items():
        save_model(model, tmp / name, tokenizer if name == "model" else None, is_main=info.is_main)
    fault_point("weights-written", step)
    opt_state = optimizer_state(models, optimizer)
    if info.is_main:
        state = {
            "algorithm": algorithm,
            "step": step,
            "world_size": info.world_size,
            "optimizer": opt_state,
            "scheduler": scheduler.state_dict(),
            "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()},
            "counters": dict(counters or {}),
        }
        torch.save(state, tmp / "trainer_state.pt")
    fault_point("state-written", step)
    distributed.barrier()
    if info.is_main:
        manifest.write_manifest(tmp)
        fault_point("manifest-written", step)
        manifest.mark_complete(tmp, str(step))
        fault_point("complete-written", step)
        if final.exists():  # re-saving the same step (e.g. the final step after a cadence save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        manifest.sync_dir(final.parent)
        fault_point("renamed", step)
        _prune(final.parent, keep, step)
    distributed.barrier()
    return final


def _prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (the one just written); never one past it."""
    if keep <= 0:
        return
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name) and step_of(p) <= step), key=step_of)
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def save_final(run_dir: str | Path, models: dict[str, nn.Module], tokenizer, info) -> Path:
    """The trained model(s) in ``RUN_DIR/final`` (``save_pretrained`` + tokenizer; extra models in ``final/<name>``),
    written like a checkpoint: into ``.tmp-final``, checked for weights, sealed with a manifest, renamed, verified.
    A collective. Raises :class:`NonFiniteWeights` (nothing written) or ``RuntimeError`` naming what is missing."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / "final", run_dir / ".tmp-final", run_dir / ".old-final"
    check_finite(models, str(final))
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    dirs = {name: tmp if name == "model" else tmp / name for name in models}
    for name, model in models.items():
        save_model(model, dirs[name], tokenizer if name == "model" else None, is_main=info.is_main)
    fault_point("final-written", "final")
    if info.is_main:
        for name, path in dirs.items():
            if not list(path.glob("*.safetensors")):
                raise RuntimeError(f"saving {name} to {path} wrote no weights (save_pretrained failed)")
        manifest.write_manifest(tmp)
        manifest.mark_complete(tmp, "final")
        fault_point("final-sealed", "final")
        if final.exists():  # a resumed run that had finished before: the old final stays until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(tmp, final)
        manifest.sync_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)
        problem = manifest.verify(final)
        if problem:
            raise RuntimeError(f"{final} fails verification after the save: {problem}")
    distributed.barrier()
    return final


def load_trainer_state(path: str | Path, info) -> tuple[dict, dict | None, dict | None]:
    """(trainer_state, this rank's RNG state, this rank's ``rank_state``); the last two are None when the world
    size changed (or the checkpoint has none)."""
    path = Path(path)
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    same_world = state["world_size"] == info.world_size
    rng_file, rank_file = path / f"rng-rank{info.rank}.pt", path / f"rank{info.rank}-state.pt"
    rng = torch.load(rng_file, weights_only=False) if same_world and rng_file.is_file() else None
    rank = torch.load(rank_file, weights_only=False, map_location="cpu") if same_world and rank_file.is_file() \
        else None
    return state, rng, rank
