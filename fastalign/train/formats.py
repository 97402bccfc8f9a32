"""Data formats: read a local JSONL/JSON/Parquet file into rows and check each row against its kind's format.

Formats (one JSON object per line, or Parquet columns):
- SFT: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}`` (the last message
  is the trained completion and must be the assistant's; earlier turns are the prompt).
- preference (RM, DPO): ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``,
  optionally ``"label"``: p(chosen is preferred) in [0, 1], a soft label (see :data:`LABEL`).
- RL (GRPO, PPO): ``{"prompt": str | messages, ...}``; every other field is kept for the reward functions.

A malformed row raises a :class:`DataError` naming the file and line (row, for Parquet).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


def read_rows(path: Path) -> list[tuple[str, dict]]:
    """(location, row) pairs; location is ``file:line N`` (JSONL), ``file:item N`` or ``file:row N``."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson") or (suffix == ".json" and not path.read_text(encoding="utf-8").lstrip()
                                           .startswith("[")):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append((f"{path}:line {lineno}", json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:line {lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        return rows
    if suffix == ".json":
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:line {exc.lineno}: invalid JSON ({exc.msg})") from None
        return [(f"{path}:item {i}", row) for i, row in enumerate(items)]
    if suffix == ".parquet":
        from datasets import Dataset

        try:
            ds = Dataset.from_parquet(str(path))
        except Exception as exc:
            raise DataError(f"{path}: cannot read Parquet ({type(exc).__name__}: {exc})") from None
        return [(f"{path}:row {i}", row) for i, row in enumerate(ds)]
    raise DataError(f"{path}: unsupported data file type {suffix!r} (use .jsonl, .json or .parquet)")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _check_text(where: str, row: dict, key: str, *, messages_ok: bool = True) -> None:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r} (has {sorted(row)})")
    value = row[key]
    if isinstance(value, str) or (messages_ok and _is_messages(value) and value):
        return
    raise DataError(f"{where}: field {key!r} must be a string" + (" or a non-empty list of {role, content} "
                    "messages" if messages_ok else "") + f", got {type(value).__name__}")


LABEL = "label"  # an optional soft preference label: p(chosen is preferred) in [0, 1]


def _check_label(where: str, row: dict) -> None:
    value = row.get(LABEL)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise DataError(f"{where}: field {LABEL!r} must be a number in [0, 1] (the probability that 'chosen' is "
                        f"preferred), got {value!r}")


def validate_row(where: str, row: Any, kind: str) -> None:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == "sft":
        if "messages" in row and row["messages"] is not None:
            _check_text(where, row, "messages")
            if row["messages"][-1]["role"] != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's (the trained completion)")
        else:
            if "prompt" not in row and "completion" not in row:
                raise DataError(f"{where}: an SFT row needs 'prompt' and 'completion', or 'messages' "
                                f"(has {sorted(row)})")
            _check_text(where, row, "prompt")
            _check_text(where, row, "completion")
    elif kind == "preference":
        for key in ("prompt", "chosen", "rejected"):
            _check_text(where, row, key)
        _check_label(where, row)
    elif kind == "rl":
        _check_text(where, row, "prompt")
    else:
        raise ValueError(f"kind must be sft, preference or rl; got {kind!r}")
