"""Checkpoints: ``save_pretrained`` weights (safetensors) + everything needed to continue bit-for-bit.

Layout of ``RUN_DIR/checkpoints/step-000010/``::

    model/               save_pretrained (config.json, model.safetensors; adapter_* files for LoRA) + tokenizer
    value/ ...           the same for each extra trained model (a PPO value model)
    trainer_state.pt     step, optimizer, scheduler, data position and other ``extra`` state, counters
    rng-rank0.pt ...     python, numpy, torch (and CUDA) RNG state of each process
    COMPLETE             written last; a directory without it is ignored

Written into ``checkpoints/.tmp-step-000010`` and renamed when complete, so a crash never leaves a checkpoint
that looks whole. The ``.pt`` files are our own pickles: ``torch.load(weights_only=False)`` of trusted files.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastalign.train import distributed
from fastalign.train.models import unwrap

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``run_dir/checkpoints``, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "COMPLETE").is_file()]
    return max(done, key=lambda p: int(_STEP_DIR.match(p.name).group(1)), default=None)


def save_checkpoint(run_dir: str | Path, step: int, *, models: dict[str, nn.Module], optimizer, scheduler, info,
                    tokenizer=None, extra: dict | None = None, counters: dict | None = None,
                    keep: int = 0) -> Path:
    """Write a checkpoint atomically (a collective: call it on every rank). Returns its directory."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    torch.save(rng_state(), tmp / f"rng-rank{info.rank}.pt")
    for name, model in models.items():
        save_model(model, tmp / name, tokenizer if name == "model" else None, is_main=info.is_main)
    opt_state = optimizer_state(models, optimizer)
    if info.is_main:
        state = {
            "step": step,
            "world_size": info.world_size,
            "optimizer": opt_state,
            "scheduler": scheduler.state_dict(),
            "extra": {name: obj.state_dict() for name, obj in (extra or {}).items()},
            "counters": dict(counters or {}),
        }
        torch.save(state, tmp / "trainer_state.pt")
    distributed.barrier()
    if info.is_main:
        (tmp / "COMPLETE").write_text(str(step))
        if final.exists():  # re-saving the same step (e.g. the final step after a cadence save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _prune(final.parent, keep)
    distributed.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)),
                   key=lambda p: int(_STEP_DIR.match(p.name).group(1)))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(path: str | Path, info) -> tuple[dict, dict | None]:
    """(trainer_state, this rank's RNG state or None when the world size changed)."""
    path = Path(path)
    state = torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
    rng_file = path / f"rng-rank{info.rank}.pt"
    rng = torch.load(rng_file, weights_only=False) if state["world_size"] == info.world_size and \
        rng_file.is_file() else None
    return state, rng
