"""The run directory: what a run leaves in ``output_dir``, and the rules for starting, overwriting and resuming one.

    RUN_DIR/
      run.json            algorithm, fastalign version, the resolved config, when the run started and was resumed
      config.yaml         the resolved config (reusable with --config)
      metrics.jsonl       one JSON object per optimizer step
      checkpoints/        step-000010/ ...: see checkpoint.py; each verified against its MANIFEST.json on resume
      final/              the trained model (save_pretrained + tokenizer), written and verified like a checkpoint

A directory that already holds a run (any of the entries above) is refused unless ``resume`` (continue it) or
``overwrite`` (move it aside to ``RUN_DIR.replaced-<timestamp>``, then start anew). A resume checks the earlier
run's ``run.json``: another algorithm is an error, so is a change to a field the checkpoint's data position,
RNG streams or weights depend on (:data:`EXACT_FIELDS`); any other changed field is listed in a warning.
Every path is checked here, before a model loads.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from fastalign import __version__
from fastalign.train import checkpoint, distributed, models
from fastalign.train.config_parsing import save_yaml, to_dict

log = logging.getLogger("fastalign.train")

RUN_FILE = "run.json"
MARKERS = (RUN_FILE, "config.yaml", "metrics.jsonl", "checkpoints", "final")  # any of them: the directory holds a run
IGNORED_FIELDS = frozenset({"resume", "overwrite", "progress", "output_dir"})  # how to run it, not what the run is
# fields a checkpoint's state depends on: data stream and order, rollout shape, model structure
EXACT_FIELDS = ("model", "train_file", "max_samples", "seed", "batch_size", "grad_accum", "max_length",
                "max_prompt_length", "chat_template", "packing", "lora_r", "lora_alpha", "lora_target_modules",
                "num_generations", "num_iterations")
MODEL_FIELDS = ("model", "ref_model", "value_model", "reward_model")  # local checkpoint directories


class RunDirError(ValueError):
    """``output_dir`` cannot be used as asked; the message says why and which flag to pass."""


def algorithm_name(cfg) -> str:
    """``sft`` for SFTConfig, ``grpo`` for GRPOConfig, ...: what run.json records and a resume must match."""
    return type(cfg).__name__.removesuffix("Config").lower()


def holds_run(run_dir: Path) -> list[str]:
    """The run entries present in ``run_dir`` (empty: a new or empty directory)."""
    return [name for name in MARKERS if (run_dir / name).exists()] if run_dir.is_dir() else []


def check_paths(cfg) -> None:
    """Every path the config names, checked before any model loads: errors name the field and the path."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"output_dir {str(run_dir)!r} is a file, not a directory")
    for name in ("final", "checkpoints"):
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise RunDirError(f"output_dir: {str(run_dir / name)!r} is a file; the run writes a directory there "
                              "(move the file away)")
    existing = next(p for p in (run_dir, *run_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"output_dir {str(run_dir)!r}: {str(existing)!r} is not a writable directory")
    train_file = getattr(cfg, "train_file", None)
    if train_file is not None:
        path = Path(train_file)
        if path.is_dir():
            raise RunDirError(f"train_file {train_file!r} is a directory; pass a .jsonl, .json or .parquet file")
        if not path.exists():
            raise RunDirError(f"train_file {train_file!r} does not exist")
    for field in MODEL_FIELDS:
        value = getattr(cfg, field, None)
        if value:
            try:
                models.check_local_path(value)
            except FileNotFoundError as exc:
                raise RunDirError(f"{field}: {exc}") from None


def open_run(cfg, info) -> Path:
    """Apply the run-directory rules for ``cfg`` (collective); write run.json and config.yaml. Returns RUN_DIR."""
    check_paths(cfg)
    run_dir = Path(cfg.output_dir)
    present = holds_run(run_dir)
    if present and not (cfg.resume or cfg.overwrite):
        raise RunDirError(f"output_dir {str(run_dir)!r} already holds a run ({', '.join(present)}); pass --resume to "
                          "continue it, --overwrite to move it aside and start anew, or choose another --output-dir")
    if cfg.resume and "final" in present and not checkpoint.complete_checkpoints(run_dir):
        raise RunDirError(f"resume: the run in {str(run_dir)!r} finished without checkpoints (save_steps 0), so there "
                          "is nothing to continue from; pass --overwrite to start anew, or train on from its final/ "
                          "with --model in another --output-dir")
    record = _read_record(run_dir) if cfg.resume and present else None
    changed = _check_resume(cfg, run_dir, record, info) if cfg.resume and present else {}
    if cfg.overwrite and present and Path.cwd().resolve().is_relative_to(run_dir.resolve()):
        raise RunDirError(f"overwrite: output_dir {str(run_dir)!r} holds the current directory; cannot move it aside")
    distributed.barrier()  # every process has checked before the main one changes anything
    if info.is_main:
        if cfg.overwrite and present:
            aside = _move_aside(run_dir)
            log.warning("overwrite: moved the earlier run in %s to %s", run_dir, aside)
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_record(run_dir, cfg, record, changed)
        save_yaml(cfg, run_dir / "config.yaml")
    distributed.barrier()
    return run_dir


def _read_record(run_dir: Path) -> dict | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"resume: {path} is not valid JSON ({exc}); it records the run's algorithm and config: "
                          "restore it, or start anew with --overwrite") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise RunDirError(f"resume: {path} does not hold a run record (algorithm, config)")
    return record


def _check_resume(cfg, run_dir: Path, record: dict | None, info) -> dict[str, list]:
    """Raise for another algorithm or a changed exactness field; warn about other changes. Returns the changes."""
    algorithm = algorithm_name(cfg)
    if record is None:
        if info.is_main:
            log.warning("resume: %s has no %s (an older fastalign wrote it): the earlier run's algorithm and config "
                        "cannot be checked", run_dir, RUN_FILE)
        return {}
    if record.get("algorithm") != algorithm:
        raise RunDirError(f"resume: {str(run_dir)!r} holds a {record.get('algorithm')!r} run, not {algorithm!r}; "
                          "resume it with `fastalign train " f"{record.get('algorithm')}`, or start the {algorithm} "
                          f"run elsewhere (e.g. --model {run_dir / 'final'} --output-dir OTHER)")
    old, new = record["config"], to_dict(cfg)
    changed = {k: [old[k], new[k]] for k in new if k in old and k not in IGNORED_FIELDS and old[k] != new[k]}
    exact = [k for k in EXACT_FIELDS if k in changed]
    if exact:
        listed = ", ".join(f"{k} {changed[k][0]!r} -> {changed[k][1]!r}" for k in exact)
        raise RunDirError(f"resume: changed since the run in {str(run_dir)!r} started: {listed}; its checkpoints' data "
                          "position, RNG streams and weights depend on these, so the run would not continue as it "
                          f"was. Resume with the earlier values, or start a new run (--model {run_dir / 'final'} "
                          "--output-dir OTHER)")
    if changed and info.is_main:
        log.warning("resume: changed since the run started: %s",
                    "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
    return changed


def _move_aside(run_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
    n = 1
    while aside.exists():
        aside, n = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}-{n}"), n + 1
    os.rename(run_dir, aside)
    return aside


def _write_record(run_dir: Path, cfg, record: dict | None, changed: dict) -> None:
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if record is None:
        record = {"algorithm": algorithm_name(cfg), "fastalign_version": __version__, "started": now, "resumed": []}
    else:
        record.setdefault("resumed", []).append({"time": now, "fastalign_version": __version__, "changed": changed})
    record["config"] = to_dict(cfg)
    write_json_atomic(run_dir / RUN_FILE, record)


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as JSON through a temporary file and a rename: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
