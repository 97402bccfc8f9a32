"""Which checkpoint a resume continues from: the newest one that passes verification.

Every complete checkpoint (one that carries COMPLETE) is checked against its MANIFEST.json: each file's size and
SHA-256. When the newest fails, the reason is logged and the one before it is tried; the checkpoints newer than the
one chosen are then moved aside to ``checkpoints/.bad-step-N`` (kept for inspection, never resumed or pruned).
When checkpoints exist but none passes, the resume is an error, and nothing is moved: a run never restarts from
scratch because its checkpoints are damaged. A checkpoint written before manifests existed is accepted when its
files load, with a warning that it was not verified.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from fastalign.train import checkpoint, distributed, manifest

log = logging.getLogger("fastalign.train")


class CheckpointError(RuntimeError):
    """No checkpoint of the run can be resumed from; the message lists each one and why it failed."""


def verify_checkpoint(path: Path) -> str | None:
    """None when the checkpoint at ``path`` is whole; otherwise what is wrong with it."""
    if (path / manifest.MANIFEST).is_file():
        return manifest.verify(path)
    try:  # written by an older fastalign: at least every file must load
        from safetensors import safe_open

        torch.load(path / "trainer_state.pt", weights_only=False, map_location="cpu")
        weights = sorted(path.rglob("*.safetensors"))
        if not weights:
            return "no .safetensors weights"
        for file in weights:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    fh.get_slice(key)
    except Exception as exc:  # any unreadable file: this checkpoint cannot be resumed from
        return f"no {manifest.MANIFEST}, and a file does not load ({type(exc).__name__}: {exc})"
    log.warning("resume: %s has no %s (an older fastalign wrote it): its files load, but are not verified", path,
                manifest.MANIFEST)
    return None


def select_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes :func:`verify_checkpoint`; None when there is no complete
    checkpoint at all. Raises :class:`CheckpointError` when there are some but none passes."""
    failed: list[tuple[Path, str]] = []
    for path in checkpoint.complete_checkpoints(run_dir):
        problem = verify_checkpoint(path)
        if problem is None:
            for bad, _ in failed:
                aside = bad.with_name(f".bad-{bad.name}")
                shutil.rmtree(aside, ignore_errors=True)
                os.rename(bad, aside)
                log.warning("resume: moved %s aside to %s", bad.name, aside)
            if failed:
                log.warning("resume: falling back to %s", path)
            return path
        log.warning("resume: checkpoint %s fails verification: %s", path, problem)
        failed.append((path, problem))
    if failed:
        raise CheckpointError(f"resume: no checkpoint in {Path(run_dir) / 'checkpoints'} passes verification ("
                              + "; ".join(f"{p.name}: {why}" for p, why in failed) + "); nothing was changed")
    return None


def resume_point(run_dir: str | Path, info) -> Path | None:
    """:func:`select_checkpoint` on the main process, its answer on every process (a collective)."""
    answer = None
    if info.is_main:
        try:
            path = select_checkpoint(run_dir)
            answer = ("ok", str(path) if path is not None else None)
        except CheckpointError as exc:
            answer = ("error", str(exc))
    kind, value = distributed.broadcast_object(answer)
    if kind == "error":
        raise CheckpointError(value)
    return Path(value) if value is not None else None
