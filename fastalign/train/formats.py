"""Data formats: read a local JSONL/JSON/Parquet file into rows and check each row against its kind's format.

TRL's dataset types, each "standard" (strings) or "conversational" (lists of ``{"role", "content"}`` messages):

- SFT: language modelling ``{"text": str}`` or ``{"messages": [...]}`` (every token is trained), or prompt-completion
  ``{"prompt", "completion"}`` (the completion is trained; both strings or both message lists).
- preference (RM, DPO): ``{"prompt", "chosen", "rejected"}``, or implicit prompt ``{"chosen", "rejected"}`` where
  the prompt is the shared prefix of the two (:func:`extract_prompt`, TRL's rule); all strings or all messages.
  TRL's unpaired preference rows ``{"prompt", "completion", "label": bool}`` (KTO, BCO) are refused: no fastalign
  trainer trains on unpaired rows. A paired row may carry other fields for its trainer (a margin column), and an
  optional soft ``"label"``: p(chosen is preferred), a number in [0, 1] (:data:`LABEL`). The two meanings of
  ``label`` are told apart by the row's shape: with chosen/rejected it is the soft label, with completion the
  unpaired one.
- RL (GRPO, PPO): prompt-only ``{"prompt": str | messages, ...}``; every other field is kept for the reward functions.

Every row is checked on its own, so a file may mix standard and conversational rows, or explicit and implicit
prompts (one field holding strings in some rows and messages in others is refused, with the line: a column has
one type). A malformed row raises a :class:`DataError` naming the file and line (row, for Parquet).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


@dataclass(frozen=True)
class RowFormat:
    """A row's TRL dataset type: ``name`` in language-modelling, prompt-completion, preference,
    implicit-prompt preference, prompt-only; ``conversational``: its fields are message lists."""

    name: str
    conversational: bool

    def __str__(self) -> str:
        return f"{self.name} ({'conversational' if self.conversational else 'standard'})"


# fields TRL hands to the chat template per row; a silently ignored one would change the tokens
TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")
LABEL = "label"  # an optional soft preference label on a paired row: p(chosen is preferred) in [0, 1]


def _check_label(where: str, row: dict) -> None:
    value = row.get(LABEL)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise DataError(f"{where}: field {LABEL!r} must be a number in [0, 1] (the probability that 'chosen' is "
                        f"preferred), got {value!r}")


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


def is_messages(value) -> bool:
    """A non-empty list of ``{"role": str, "content": str}`` messages (a conversational field)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _present(row: dict, key: str) -> bool:
    return row.get(key) is not None  # a Parquet or merged row holds None for a field it lacks


def _kind_of(where: str, row: dict, key: str, *, messages_ok: bool = True) -> bool:
    """True for a message list, False for a string; DataError otherwise."""
    if not _present(row, key):
        raise DataError(f"{where}: missing field {key!r} (has {sorted(k for k in row if _present(row, k))})")
    value = row[key]
    if isinstance(value, str):
        return False
    if messages_ok and is_messages(value):
        return True
    raise DataError(f"{where}: field {key!r} must be a string" + (" or a non-empty list of {role, content} "
                    "messages" if messages_ok else "") + f", got {type(value).__name__}")


def _same_kind(where: str, row: dict, keys: Sequence[str]) -> bool:
    kinds = {key: _kind_of(where, row, key) for key in keys}
    if len(set(kinds.values())) > 1:
        strings = [k for k, conv in kinds.items() if not conv]
        lists = [k for k, conv in kinds.items() if conv]
        hint = ""
        if "prompt" in strings and lists:
            hint = "; if chosen and rejected hold the whole conversation, drop 'prompt' (the implicit prompt)"
        raise DataError(f"{where}: {strings} {'is a string' if len(strings) == 1 else 'are strings'} but {lists} "
                        f"{'is a message list' if len(lists) == 1 else 'are message lists'}: a row is standard "
                        f"(all strings) or conversational (all message lists){hint}")
    return next(iter(kinds.values()))


def row_format(where: str, row: Any, kind: str) -> RowFormat:
    """Check ``row`` against the formats of ``kind`` (sft | preference | rl) and return its :class:`RowFormat`."""
    if kind not in ("sft", "preference", "rl"):
        raise ValueError(f"kind must be sft, preference or rl; got {kind!r}")
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind != "rl":
        for key in TEMPLATE_FIELDS:
            if _present(row, key):
                raise DataError(f"{where}: a per-row {key!r} field is not supported (TRL passes it to the chat "
                                f"template; here it would be ignored and change the tokens): remove it")
    if kind == "sft":
        lm = [k for k in ("messages", "text") if _present(row, k)]
        pc = [k for k in ("prompt", "completion") if _present(row, k)]
        if len(lm) > 1 or (lm and pc):
            raise DataError(f"{where}: fields {lm + pc} mix SFT formats: use 'text' or 'messages' (language "
                            "modelling) or 'prompt' + 'completion'")
        if lm == ["messages"]:
            _kind_of(where, row, "messages")
            if not is_messages(row["messages"]):
                raise DataError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} messages")
            return RowFormat("language modelling", True)
        if lm == ["text"]:
            _kind_of(where, row, "text", messages_ok=False)
            return RowFormat("language modelling", False)
        if not pc:
            raise DataError(f"{where}: an SFT row needs 'text', 'messages', or 'prompt' and 'completion' "
                            f"(has {sorted(k for k in row if _present(row, k))})")
        return RowFormat("prompt-completion", _same_kind(where, row, ("prompt", "completion")))
    if kind == "preference":
        if not (_present(row, "chosen") or _present(row, "rejected")) and _present(row, "completion") \
                and LABEL in row:
            raise DataError(f"{where}: an unpaired preference row ({{prompt, completion, label}}, TRL's KTO/BCO "
                            "format): no fastalign trainer trains on unpaired rows; RM and DPO need pairs "
                            "{prompt, chosen, rejected}")
        if _present(row, "prompt"):
            conversational = _same_kind(where, row, ("prompt", "chosen", "rejected"))
            _check_label(where, row)
            return RowFormat("preference", conversational)
        conversational = _same_kind(where, row, ("chosen", "rejected"))
        extract_prompt(row["chosen"], row["rejected"], where=where)  # refuses rows without a shared prefix
        _check_label(where, row)
        return RowFormat("implicit-prompt preference", conversational)
    _kind_of(where, row, "prompt")
    return RowFormat("prompt-only", is_messages(row["prompt"]))


def validate_row(where: str, row: Any, kind: str) -> None:
    row_format(where, row, kind)


def extract_prompt(chosen, rejected, *, where: str = "row"):
    """(prompt, chosen, rejected) of an implicit-prompt pair: the prompt is the shared prefix of the two (strings
    or message lists), as TRL's ``extract_prompt``: scan to the first position where they differ; for strings, a
    space just before it goes to the completions; when one is a prefix of the other, the last shared element goes
    to the completions too (TRL's loop ends one short). A pair with no shared prefix has no prompt: DataError."""
    shortest = min(len(chosen), len(rejected))
    first_diff = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if first_diff is None:
        cut = shortest - 1
    else:
        cut = first_diff
        if cut > 0 and isinstance(chosen, str) and chosen[cut - 1] == " ":
            cut -= 1
    if cut <= 0:
        raise DataError(f"{where}: 'chosen' and 'rejected' share no prefix, so there is no implicit prompt: add a "
                        "'prompt' field")
    return chosen[:cut], chosen[cut:], rejected[cut:]
