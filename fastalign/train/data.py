"""Data: rows of a local file (``formats``) -> tokenized examples -> padded batches, plus the shipped data sets.

    load_rows(path, kind)          validated rows (a ``datasets.Dataset``); path=None: the shipped tiny data set
    tokenize_sft / _preference / _prompts      rows -> examples (lists of token ids), chat template applied
    collate_sft / _preference / _prompts       examples -> (B, T) tensors; pack_sft; Sampler (which examples)

Rows are never dropped silently: truncations and drops are counted and logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastalign.train import formats
from fastalign.train.formats import DataError, read_rows, validate_row

log = logging.getLogger("fastalign.train")

IGNORE = -100  # the label of a position that takes no loss (prompt, padding), as in torch's cross-entropy

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"sft": DATA_DIR / "sft_tiny.jsonl", "preference": DATA_DIR / "preference_tiny.jsonl"}
# the embedded addition task's splits (fastalign.train.task writes them; the demo and GRPO/PPO default to them)
DEMO_DATA_DIR = DATA_DIR / "demo"
DEMO_SPLITS = ("heldout", "sft", "preference", "rl")
# a fresh permutation per epoch: generator seed = seed * EPOCH_SEED_STRIDE + epoch (a prime stride)
EPOCH_SEED_STRIDE = 100003


def demo_files() -> dict[str, Path]:
    """The shipped split files of the addition task (``fastalign/data/demo/<split>.jsonl``)."""
    return {name: DEMO_DATA_DIR / f"{name}.jsonl" for name in DEMO_SPLITS}


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: positions whose label is trained: not IGNORE, and never column 0 (nothing predicts it)."""
    valid = labels != IGNORE
    valid[:, 0] = False
    return valid


# An optional soft preference label on a preference row: p(chosen is preferred) in [0, 1], e.g. from
# `fastalign cai label`. DPO uses it as per-pair cDPO label smoothing (eps = 1 - label), RM as the Bradley-Terry
# target; rows without one count as 1. Checked by formats.validate_row.
LABEL = formats.LABEL


def soft_labels(examples: list[dict]) -> torch.Tensor:
    """(B,) fp32 per-pair labels of tokenized preference examples (1 where a row has none)."""
    return torch.tensor([1.0 if e.get(LABEL) is None else float(e[LABEL]) for e in examples])


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
        raise DataError(f"data file {str(path)!r} " + ("is a directory" if path.is_dir() else "does not exist"))
    rows = read_rows(path)
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


def attention_mask(seqs: list[list[int]], *, left: bool = False) -> torch.Tensor:
    """(B, T) int64: 1 on each sequence's tokens, 0 on the padding :func:`pad_right` (``left``: :func:`pad_left`)
    adds."""
    ones = [[1] * len(s) for s in seqs]
    return pad_left(ones, 0) if left else pad_right(ones, 0)


def collate_sft(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding), all (B, T)."""
    ids = [e["input_ids"] for e in examples]
    return {
        "input_ids": pad_right(ids, pad_id),
        "attention_mask": attention_mask(ids),
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
        "attention_mask": attention_mask(seqs),
        "labels": pad_right(labels, IGNORE),
    }


def collate_prompts(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded prompts for generation: ``input_ids``, ``attention_mask`` (B, T)."""
    ids = [e["prompt_ids"] for e in examples]
    return {"input_ids": pad_left(ids, pad_id), "attention_mask": attention_mask(ids, left=True)}


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
        g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + self.epoch)
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
