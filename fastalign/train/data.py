"""Data: local JSONL/JSON/Parquet through ``datasets``, validated row by row, tokenized, batched.

Formats (one JSON object per line, or Parquet columns):
- SFT: ``{"prompt": str, "completion": str}`` or ``{"messages": [{"role", "content"}, ...]}`` (the last message
  is the trained completion and must be the assistant's; earlier turns are the prompt).
- preference (RM, DPO): ``{"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}``,
  optionally ``"label"``: p(chosen is preferred) in [0, 1], a soft label (see :data:`LABEL`).
- RL (GRPO, PPO): ``{"prompt": str | messages, ...}``; every other field is kept for the reward functions.

A malformed row raises an error naming the file and line (row, for Parquet). Rows are never dropped silently:
truncations and drops are counted and logged.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fastalign.train")

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"sft": DATA_DIR / "sft_tiny.jsonl", "preference": DATA_DIR / "preference_tiny.jsonl"}
IGNORE = -100


class DataError(ValueError):
    """A malformed data file or row; the message names the file and line."""


# ------------------------------------------------------------------------------------------------- loading

def _read_rows(path: Path) -> list[tuple[str, dict]]:
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


# An optional soft preference label on a preference row: p(chosen is preferred) in [0, 1], e.g. from
# `fastalign cai label`. DPO uses it as per-pair cDPO label smoothing (eps = 1 - label), RM as the Bradley-Terry
# target; rows without one count as 1.
LABEL = "label"


def _check_label(where: str, row: dict) -> None:
    value = row.get(LABEL)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1):
        raise DataError(f"{where}: field {LABEL!r} must be a number in [0, 1] (the probability that 'chosen' is "
                        f"preferred), got {value!r}")


def soft_labels(examples: list[dict]) -> torch.Tensor:
    """(B,) fp32 per-pair labels of tokenized preference examples (1 where a row has none)."""
    return torch.tensor([1.0 if e.get(LABEL) is None else float(e[LABEL]) for e in examples])


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


def load_rows(path: str | Path | None, kind: str, *, max_samples: int | None = None):
    """Validated rows as a ``datasets.Dataset`` (JSONL and JSON are parsed here first so that errors carry
    line numbers). ``path=None``: the shipped tiny data set for ``kind``."""
    from datasets import Dataset

    if path is None:
        if kind not in SHIPPED:
            raise DataError(f"no shipped data set for {kind!r}; pass train_file")
        path = SHIPPED[kind]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist")
    rows = _read_rows(path)
    for where, row in rows:
        validate_row(where, row, kind)
    if not rows:
        raise DataError(f"{path}: no rows")
    if max_samples is not None and len(rows) > max_samples:
        log.info("%s: using %d of %d rows (max_samples)", path, max_samples, len(rows))
        rows = rows[:max_samples]
    keys = list(dict.fromkeys(k for _, r in rows for k in r))  # from_list would take the first row's keys only
    try:
        return Dataset.from_list([{k: r.get(k) for k in keys} for _, r in rows])
    except Exception as exc:  # e.g. a field that is a string in one row and a list in another
        raise DataError(f"{path}: rows do not share one schema ({type(exc).__name__}: {exc})") from None


# -------------------------------------------------------------------------------------------- tokenization

def uses_chat(tokenizer, mode: str = "auto") -> bool:
    if mode == "on" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template='on' but the tokenizer has no chat template")
    return mode == "on" or (mode == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def render_prompt(tokenizer, prompt, chat: bool) -> str:
    """The prompt text the model sees: chat-templated (with the generation prompt) or as is."""
    if chat:
        return tokenizer.apply_chat_template(_as_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, list):
        raise DataError("a conversational prompt needs a tokenizer with a chat template")
    return prompt


def render_completion(tokenizer, prompt, completion, chat: bool) -> str:
    """The completion text that follows ``render_prompt``: under a chat template, what the template adds after
    the generation prompt (end-of-turn tokens included); otherwise the text plus EOS."""
    if chat:
        msgs = _as_messages(prompt, "user") + _as_messages(completion, "assistant")
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        head = render_prompt(tokenizer, prompt, True)
        if not full.startswith(head):
            raise ValueError("the chat template is not prefix-stable; cannot split prompt from completion")
        return full[len(head):]
    if isinstance(completion, list):
        completion = "".join(m["content"] for m in completion)
    return completion + (tokenizer.eos_token or "")


def encode_prompt(tokenizer, prompt, chat: bool, max_prompt_length: int, stats: Counts | None = None) -> list[int]:
    ids = tokenizer(render_prompt(tokenizer, prompt, chat), add_special_tokens=not chat)["input_ids"]
    if len(ids) > max_prompt_length:  # keep the end: it holds the question and the generation prompt
        ids = ids[-max_prompt_length:]
        if stats is not None:
            stats.truncated_prompts += 1
    return ids


@dataclass
class Counts:
    """What tokenization changed; logged once per data set so nothing is dropped silently."""

    rows: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped_no_completion: int = 0
    notes: list[str] = field(default_factory=list)

    def log(self, name: str) -> None:
        log.info("%s: %d rows; %d prompts truncated, %d completions truncated, %d rows dropped (no room for a "
                 "completion token)", name, self.rows, self.truncated_prompts, self.truncated_completions,
                 self.dropped_no_completion)


def _encode_pair(tokenizer, prompt, completion, chat, max_length, max_prompt_length, counts):
    p = encode_prompt(tokenizer, prompt, chat, max_prompt_length, counts)
    c = tokenizer(render_completion(tokenizer, prompt, completion, chat), add_special_tokens=False)["input_ids"]
    room = max_length - len(p)
    if len(c) > room:
        c = c[:max(room, 0)]
        counts.truncated_completions += room > 0  # room <= 0 is a drop, counted by the caller
    return p, c


def tokenize_sft(rows, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str = "auto",
                 completion_only_loss: bool = True, name: str = "sft") -> list[dict]:
    """Examples ``{"input_ids", "labels"}`` (lists); labels are IGNORE on prompt tokens when completion-only."""
    chat = uses_chat(tokenizer, chat_template)
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        if row.get("messages"):
            prompt, completion = row["messages"][:-1], row["messages"][-1]["content"]
            if not prompt:
                prompt = ""
        else:
            prompt, completion = row["prompt"], row["completion"]
        p, c = _encode_pair(tokenizer, prompt, completion, chat, max_length, max_prompt_length, counts)
        if not c:
            counts.dropped_no_completion += 1
            continue
        labels = ([IGNORE] * len(p) if completion_only_loss else list(p)) + list(c)
        out.append({"input_ids": p + c, "labels": labels})
    counts.log(name)
    if not out:
        raise DataError(f"{name}: every row was dropped (prompts longer than max_length={max_length})")
    return out


def tokenize_preference(rows, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str = "auto",
                        name: str = "preference", extra_columns: tuple[str, ...] = ()) -> list[dict]:
    """Examples ``{"prompt_ids", "chosen_ids", "rejected_ids", **extra}``."""
    chat = uses_chat(tokenizer, chat_template)
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        p, c = _encode_pair(tokenizer, row["prompt"], row["chosen"], chat, max_length, max_prompt_length, counts)
        _, r = _encode_pair(tokenizer, row["prompt"], row["rejected"], chat, max_length, max_prompt_length, counts)
        if not c or not r:
            counts.dropped_no_completion += 1
            continue
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, **{k: row[k] for k in extra_columns}})
    counts.log(name)
    if not out:
        raise DataError(f"{name}: every row was dropped (prompts longer than max_length={max_length})")
    return out


def tokenize_prompts(rows, tokenizer, *, max_prompt_length: int, chat_template: str = "auto",
                     name: str = "rl") -> list[dict]:
    """RL prompts: ``{"prompt_ids", "prompt_text", **every other field of the row}`` for reward functions."""
    chat = uses_chat(tokenizer, chat_template)
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        ids = encode_prompt(tokenizer, row["prompt"], chat, max_prompt_length, counts)
        extras = {k: v for k, v in row.items() if k != "prompt"}
        out.append({**extras, "prompt": row["prompt"], "prompt_ids": ids,
                    "prompt_text": render_prompt(tokenizer, row["prompt"], chat)})
    counts.log(name)
    return out


# ------------------------------------------------------------------------------------------------ batching

def pad_right(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs], dtype=torch.long)


def pad_left(seqs: list[list[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], dtype=torch.long)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding), all (B, T)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
        "labels": pad_right([e["labels"] for e in examples], IGNORE),
    }


def pack_sft(examples: list[dict], max_length: int) -> list[dict]:
    """Concatenate examples and cut the stream into rows of ``max_length`` tokens (the last may be shorter).
    Label masks travel with their tokens."""
    ids = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    return [{"input_ids": ids[i:i + max_length], "labels": labels[i:i + max_length]}
            for i in range(0, len(ids), max_length)]


def collate_preference(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, (2B, T) right-padded, labels IGNORE on prompt and padding."""
    seqs, labels = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for e in examples:
            seqs.append(e["prompt_ids"] + e[key])
            labels.append([IGNORE] * len(e["prompt_ids"]) + e[key])
    return {
        "input_ids": pad_right(seqs, pad_id),
        "attention_mask": pad_right([[1] * len(s) for s in seqs], 0),
        "labels": pad_right(labels, IGNORE),
    }


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids``, ``attention_mask`` (B, T)."""
    ids = [e["prompt_ids"] for e in examples]
    return {"input_ids": pad_left(ids, pad_id), "attention_mask": pad_left([[1] * len(s) for s in ids], 0)}


class Sampler:
    """An endless, resumable stream of example indices: a fresh seeded permutation each epoch, each global
    batch split across ranks (rank r takes its contiguous slice), so N processes see what one process with
    N times the batch would. ``state_dict`` is the data position saved in checkpoints."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1):
        if size < 1:
            raise ValueError("Sampler needs at least one example")
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def next(self) -> list[int]:
        """This rank's indices of the next global batch (batch_size * world_size examples)."""
        out = []
        for _ in range(self.batch_size * self.world_size):
            if self.pos == self.size:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.pos])
            self.pos += 1
        return out[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()
