"""Files of the feedback stages: validated input rows, and append-only JSONL outputs that survive a kill.

Input rows (``.jsonl``: one JSON object per line; ``.json``: a list of objects) are checked field by field and
a bad one raises :class:`FeedbackError` naming the file, the line and the field::

    prompts.jsonl:line 7: field 'prompt' must be a string or a list of {role, content} messages, got int

:class:`Journal` is how every stage writes: rows are appended a batch at a time and each batch is flushed and
fsynced before the next one starts, so a killed run loses at most the batch in flight. On reopening, complete
rows are read back (their ids are the work already done) and a torn last line — a write cut short by the kill —
is cut off; a bad line anywhere else is corruption and an error.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from fastalign.train import formats


class FeedbackError(ValueError):
    """Bad input to a feedback stage (a file, a row, a constitution field); the message says where."""


# ----------------------------------------------------------------------------------------------- reading rows

def read_rows(path: str | Path) -> list[tuple[str, Any]]:
    """(location, value) for every row of a ``.jsonl``, ``.json`` or ``.parquet`` file (the trainers' reader);
    location is ``file:line N``."""
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"{path}: no such file")
    try:
        return formats.read_rows(path)
    except formats.DataError as exc:
        raise FeedbackError(str(exc)) from None


def is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def check_text(where: str, row: dict, key: str, *, messages_ok: bool = False, optional: bool = False):
    """``row[key]`` if it is a string (or, when allowed, a message list); else an error naming the field."""
    if row.get(key) is None:
        if optional:
            return None
        raise FeedbackError(f"{where}: missing field {key!r} (has {sorted(row)})")
    value = row[key]
    if isinstance(value, str) or (messages_ok and is_messages(value)):
        return value
    kind = "a string or a list of {role, content} messages" if messages_ok else "a string"
    raise FeedbackError(f"{where}: field {key!r} must be {kind}, got {type(value).__name__}")


def prompt_text(prompt) -> str:
    """A prompt (string or messages) as one string, for hashing, deduplication and lengths."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def normalize(text: str) -> str:
    """Whitespace-collapsed, case-folded text: what counts as "the same" prompt or revision."""
    return re.sub(r"\s+", " ", text).strip().casefold()


def row_id(prompt) -> str:
    """A stable id from the normalized prompt text (16 hex digits of its SHA-256)."""
    return hashlib.sha256(normalize(prompt_text(prompt)).encode("utf-8")).hexdigest()[:16]


def load_prompts(path: str | Path, *, max_rows: int | None = None) -> tuple[list[dict], int]:
    """Prompt rows ``{"id", "prompt", "category"?}`` of a prompts file, deduplicated by normalized prompt text
    (the first occurrence is kept), and the number of duplicates dropped. ``id`` defaults to :func:`row_id`."""
    rows, seen, seen_ids, duplicates = [], set(), set(), 0
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise FeedbackError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = check_text(where, row, "prompt", messages_ok=True)
        if not prompt_text(prompt).strip():
            raise FeedbackError(f"{where}: field 'prompt' is empty")
        category = check_text(where, row, "category", optional=True)
        rid = row.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
            raise FeedbackError(f"{where}: field 'id' must be a string or an integer, got {type(rid).__name__}")
        norm = normalize(prompt_text(prompt))
        if norm in seen:
            duplicates += 1
            continue
        rid = str(rid) if rid is not None else row_id(prompt)
        if rid in seen_ids:
            raise FeedbackError(f"{where}: field 'id' {rid!r} is used by an earlier row")
        seen.add(norm)
        seen_ids.add(rid)
        rows.append({"id": rid, "prompt": prompt, **({"category": category} if category is not None else {})})
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise FeedbackError(f"{path}: no rows")
    return rows, duplicates


def where(path, rows: list[dict]) -> list[str]:
    """How errors name each prompt row of ``path``: by its id."""
    return [f"{path}: the row with id {r['id']!r}" for r in rows]


# ---------------------------------------------------------------------------------------------- the journal

class Journal:
    """An append-only JSONL file written in fsynced batches, readable back after a kill.

    ``Journal(path)`` reads what is there (cutting off a torn last line), ``rows`` holds it, ``append(batch)``
    writes a batch durably. Rows are dicts; the caller decides which field identifies finished work.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: list[dict] = []
        self.torn_bytes = 0  # size of the torn tail cut off on opening (0: none)
        if self.path.exists():
            self._recover()

    def _recover(self) -> None:
        data = self.path.read_bytes()
        good = 0  # byte offset just past the last complete, valid line
        lines = data.split(b"\n")
        for lineno, raw in enumerate(lines, 1):
            last = lineno == len(lines)
            end = good + len(raw) + (0 if last else 1)
            if not raw.strip():
                good = end if not last else good
                continue
            try:
                value = json.loads(raw.decode("utf-8"))
                if last:  # no newline after it: the write may have been cut at a lucky place; redo it
                    raise ValueError("unterminated last line")
                if not isinstance(value, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                if last:
                    break
                raise FeedbackError(f"{self.path}:line {lineno}: corrupt row ({exc}); only the last line of an "
                                    "interrupted run may be incomplete") from None
            self.rows.append(value)
            good = end
        if good < len(data):
            self.torn_bytes = len(data) - good
            with open(self.path, "r+b") as fh:
                fh.truncate(good)
                fh.flush()
                os.fsync(fh.fileno())

    def values(self, field: str) -> set:
        return {r.get(field) for r in self.rows}

    def append(self, rows: Iterable[dict]) -> None:
        """Write ``rows`` as JSON lines, then fsync: the batch is on disk when this returns."""
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        # one write(2) on an O_APPEND descriptor: a kill lands before or after it, not inside (a short write,
        # e.g. a full disk, leaves a torn last line, which reopening cuts off)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows.extend(rows)


def write_json(path: str | Path, value) -> Path:
    """Write ``value`` as indented JSON through a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def sidecar(path: str | Path, suffix: str) -> Path:
    """``out/sft.jsonl`` -> ``out/sft.<suffix>``: the rejected-rows journal and the summary next to an output."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(f"{stem}.{suffix}")
