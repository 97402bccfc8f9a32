"""Data: rows of a local file (``formats``) -> tokenized examples -> padded batches, plus the shipped data sets.

    load_rows(path, kind)          validated rows (a ``datasets.Dataset``); path=None: the shipped tiny data set
    tokenize_sft / _preference / _prompts      rows -> examples (lists of token ids) by TRL 1.16's rules: standard
                                               (string) rows as plain text, conversational rows through the
                                               chat template (``chat_template``: auto | on | off)
    collate_sft / _preference / _prompts       examples -> (B, T) tensors; pack_sft; Sampler (which examples)

Rows are never dropped silently: truncations and drops are counted and logged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastalign.train import formats
from fastalign.train.formats import DataError, extract_prompt, is_messages, read_rows, row_format

log = logging.getLogger("fastalign.train")

IGNORE = -100  # the label of a position that takes no loss (prompt, padding), as in torch's cross-entropy

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
SHIPPED = {"sft": DATA_DIR / "sft_tiny.jsonl", "preference": DATA_DIR / "preference_tiny.jsonl"}
# the embedded addition task's splits (fastalign.train.task writes them; the demo and GRPO/PPO default to them)
DEMO_DATA_DIR = DATA_DIR / "demo"
DEMO_SPLITS = ("heldout", "sft", "preference", "rl")


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
# target; rows without one count as 1. Checked by formats.row_format (on paired rows; on a {prompt, completion}
# row, TRL's unpaired bool label, the row is refused).
LABEL = formats.LABEL


def soft_labels(examples: list[dict]) -> torch.Tensor:
    """(B,) fp32 per-pair labels of tokenized preference examples (1 where a row has none)."""
    return torch.tensor([1.0 if e.get(LABEL) is None else float(e[LABEL]) for e in examples])


def load_rows(path: str | Path | None, kind: str, *, max_samples: int | None = None, tokenizer=None,
              chat_template: str = "auto"):
    """Validated rows as a ``datasets.Dataset`` (JSONL and JSON are parsed here first so that errors carry
    line numbers). ``path=None``: the shipped tiny data set for ``kind``. With ``tokenizer``, each row is also
    checked against ``chat_template`` (a conversational row under ``off``, or any row needing a template the
    tokenizer lacks, is an error naming its line)."""
    from datasets import Dataset

    if path is None:
        if kind not in SHIPPED:
            raise DataError(f"no shipped data set for {kind!r}; pass train_file")
        path = SHIPPED[kind]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} " + ("is a directory" if path.is_dir() else "does not exist"))
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if max_samples is not None and len(rows) > max_samples:
        log.info("%s: using %d of %d rows (max_samples)", path, max_samples, len(rows))
        rows = rows[:max_samples]
    formats: dict[str, int] = {}
    for where, row in rows:
        fmt = row_format(where, row, kind)
        formats[str(fmt)] = formats.get(str(fmt), 0) + 1
        if tokenizer is not None and not (fmt.name == "language modelling" and not fmt.conversational):
            chat_for(fmt.conversational, chat_template, tokenizer, where=where)
    log.info("%s: %d rows: %s", path, len(rows), ", ".join(f"{n} {name}" for name, n in formats.items()))
    keys = list(dict.fromkeys(k for _, r in rows for k in r))  # from_list would take the first row's keys only
    try:
        return Dataset.from_list([{k: r.get(k) for k in keys} for _, r in rows])
    except Exception as exc:  # e.g. a field that is a string in one row and a list in another
        raise DataError(_schema_conflict(rows, keys) or f"{path}: rows do not share one schema "
                        f"({type(exc).__name__}: {exc})") from None


def _schema_conflict(rows: list[tuple[str, dict]], keys: list[str]) -> str | None:
    """The first row whose field has another JSON type than the same field in an earlier row, as a message."""
    def type_name(value) -> str:
        return "a message list" if is_messages(value) else type(value).__name__

    for key in keys:
        first = None
        for where, row in rows:
            if row.get(key) is None:
                continue
            if first is None:
                first = (where, type_name(row[key]))
            elif type_name(row[key]) != first[1]:
                return (f"{where}: field {key!r} is {type_name(row[key])} here but {first[1]} at {first[0]}: a field "
                        f"has one type across the file (write every {key!r} as a string, or every one as messages)")
    return None


# -------------------------------------------------------------------------------------------- tokenization
#
# TRL 1.16's rules (trl/trainer/{sft,dpo,reward}_trainer.py ``_prepare_dataset``, GRPOTrainer._tokenize_prompts):
# a standard row is plain text: EOS appended to completions (and to ``text``) unless already there, then
# ``tokenizer(prompt)`` and ``tokenizer(prompt + completion)`` (with the tokenizer's special tokens, e.g. BOS); a
# conversational row goes through ``apply_chat_template(..., tokenize=True)``: the prompt with the generation
# prompt, prompt + completion without. The completion is what follows the longest common prefix of the two token
# lists (a template may render the prompt alone differently; tokens may merge across the boundary).

CHAT_TEMPLATE_MODES = ("auto", "on", "off")


def chat_for(conversational: bool, mode: str, tokenizer, *, where: str = "a row") -> bool:
    """Whether a row goes through the tokenizer's chat template. ``auto`` (TRL's convention): exactly the
    conversational rows; ``on``: every prompt/completion row, strings becoming a user / an assistant message;
    ``off``: none (a conversational row is an error)."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if conversational and mode == "off":
        raise DataError(f"{where} is conversational (message lists) but chat_template='off' renders no template: "
                        "use --chat-template auto to render it through the tokenizer's chat template, or write its "
                        "fields as plain strings")
    use = conversational or mode == "on"
    if use and not getattr(tokenizer, "chat_template", None):
        why = "is conversational (message lists)" if conversational else "is to be wrapped (chat_template='on')"
        raise DataError(f"{where} {why}, which needs a chat template, and the tokenizer has none: give it one "
                        "(tokenizer.chat_template) or write the row as plain strings"
                        + (" with --chat-template auto" if not conversational else ""))
    return use


def uses_chat(tokenizer, mode: str = "auto") -> bool:
    """For callers that build prompts from messages themselves (``fastalign.feedback``): whether to render them
    through the tokenizer's chat template. ``auto``: when the tokenizer has one (else the caller's plain
    rendering); ``on``: required; ``off``: never. The trainers' per-row rule is :func:`chat_for`."""
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    if mode == "on" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template='on' but the tokenizer has no chat template")
    return mode == "on" or (mode == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def _as_messages(value, role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


def _chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def _text_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])  # the tokenizer's own special tokens, as TRL's processing_class(text)


def _with_eos(tokenizer, text: str) -> str:
    eos = tokenizer.eos_token or ""
    return text if text.endswith(eos) else text + eos


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def render_prompt(tokenizer, prompt, chat: bool) -> str:
    """The prompt text the model sees: chat-templated (with the generation prompt) or as is."""
    if chat:
        return tokenizer.apply_chat_template(_as_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, list):
        raise DataError("a conversational prompt goes through the chat template (chat=False was asked)")
    return prompt


def encode_prompt(tokenizer, prompt, chat: bool, max_prompt_length: int, stats: Counts | None = None) -> list[int]:
    """Prompt ids for generation (prompt-only rows), the end kept when longer than ``max_prompt_length``."""
    ids = _chat_ids(tokenizer, _as_messages(prompt, "user"), generation_prompt=True) if chat else \
        _text_ids(tokenizer, render_prompt(tokenizer, prompt, False))
    return _keep_end(ids, max_prompt_length, stats)


def _keep_end(ids: list[int], max_prompt_length: int, stats: Counts | None) -> list[int]:
    if len(ids) > max_prompt_length:  # keep the end: it holds the question and the generation prompt
        ids = ids[-max_prompt_length:]
        if stats is not None:
            stats.truncated_prompts += 1
    return ids


def encode_completions(tokenizer, prompt, completions: list, chat: bool,
                       stats: Counts | None = None) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, [completion ids, ...]) of one prompt and its completions, untruncated, by TRL's rules (above):
    ``prompt_ids + completion_ids[k]`` is exactly the tokenized prompt + completion k."""
    if chat:
        head = _as_messages(prompt, "user")
        prompt_ids = _chat_ids(tokenizer, head, generation_prompt=True)
        fulls = [_chat_ids(tokenizer, head + _as_messages(c, "assistant")) for c in completions]
    else:
        prompt_ids = _text_ids(tokenizer, prompt)
        fulls = [_text_ids(tokenizer, prompt + _with_eos(tokenizer, c)) for c in completions]
    n = min(common_prefix_length(prompt_ids, f) for f in fulls)
    if n < len(prompt_ids) and stats is not None:
        stats.prompt_tails_dropped += 1
    return prompt_ids[:n], [f[n:] for f in fulls]


@dataclass
class Counts:
    """What tokenization changed; logged once per data set so nothing is dropped silently."""

    rows: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    dropped_no_completion: int = 0
    prompt_tails_dropped: int = 0
    notes: list[str] = field(default_factory=list)

    def log(self, name: str) -> None:
        log.info("%s: %d rows; %d prompts truncated, %d completions truncated, %d rows dropped (no room for a "
                 "completion token)", name, self.rows, self.truncated_prompts, self.truncated_completions,
                 self.dropped_no_completion)
        if self.prompt_tails_dropped:
            log.warning("%s: in %d rows the tokenized prompt is not a prefix of the tokenized prompt + completion "
                        "(the chat template renders the prompt alone differently, or tokens merge across the "
                        "boundary); the completion starts where they diverge, as in TRL", name,
                        self.prompt_tails_dropped)


def _row_chat(row: dict, fields: tuple[str, ...], mode: str, tokenizer) -> bool:
    return chat_for(any(isinstance(row.get(k), list) for k in fields), mode, tokenizer)


def _fit(prompt_ids, completions, max_length, max_prompt_length, counts):
    """Prompt cut to max_prompt_length (keeping its end), each completion to the room left in max_length."""
    prompt_ids = _keep_end(prompt_ids, max_prompt_length, counts)
    room = max_length - len(prompt_ids)
    out = []
    for c in completions:
        if len(c) > room:
            c = c[:max(room, 0)]
            counts.truncated_completions += room > 0  # room <= 0 is a drop, counted by the caller
        out.append(c)
    return prompt_ids, out


def tokenize_sft(rows, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str = "auto",
                 completion_only_loss: bool = True, name: str = "sft") -> list[dict]:
    """Examples ``{"input_ids", "labels"}`` (lists). Prompt-completion rows: labels IGNORE on the prompt when
    ``completion_only_loss``; language-modelling rows (``text``, ``messages``): every token is trained, as TRL."""
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        if row.get("messages") is not None or row.get("text") is not None:
            if row.get("messages") is not None:
                chat_for(True, chat_template, tokenizer)  # refuses chat_template='off' and a tokenizer without one
                ids = _chat_ids(tokenizer, row["messages"])
            else:
                ids = _text_ids(tokenizer, _with_eos(tokenizer, row["text"]))
            if len(ids) > max_length:
                ids = ids[:max_length]
                counts.truncated_completions += 1
            out.append({"input_ids": ids, "labels": list(ids)})
            continue
        chat = _row_chat(row, ("prompt", "completion"), chat_template, tokenizer)
        p, (c,) = encode_completions(tokenizer, row["prompt"], [row["completion"]], chat, counts)
        p, (c,) = _fit(p, [c], max_length, max_prompt_length, counts)
        if not c:
            counts.dropped_no_completion += 1
            continue
        labels = ([IGNORE] * len(p) if completion_only_loss else list(p)) + list(c)
        out.append({"input_ids": p + c, "labels": labels})
    counts.log(name)
    if not out:
        raise DataError(f"{name}: every row was dropped (prompts longer than max_length={max_length})")
    return out


def explicit_prompt(row: dict) -> tuple:
    """(prompt, chosen, rejected) of a preference row; an implicit prompt is extracted (formats.extract_prompt)."""
    if row.get("prompt") is not None:
        return row["prompt"], row["chosen"], row["rejected"]
    return extract_prompt(row["chosen"], row["rejected"])


def tokenize_preference(rows, tokenizer, *, max_length: int, max_prompt_length: int, chat_template: str = "auto",
                        name: str = "preference", extra_columns: tuple[str, ...] = ()) -> list[dict]:
    """Examples ``{"prompt_ids", "chosen_ids", "rejected_ids", **extra}``."""
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        prompt, chosen, rejected = explicit_prompt(row)
        chat = chat_for(isinstance(chosen, list), chat_template, tokenizer)
        p, (c, r) = encode_completions(tokenizer, prompt, [chosen, rejected], chat, counts)
        p, (c, r) = _fit(p, [c, r], max_length, max_prompt_length, counts)
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
    counts, out = Counts(rows=len(rows)), []
    for row in rows:
        chat = _row_chat(row, ("prompt",), chat_template, tokenizer)
        ids = encode_prompt(tokenizer, row["prompt"], chat, max_prompt_length, counts)
        extras = {k: v for k, v in row.items() if k != "prompt"}
        out.append({**extras, "prompt": row["prompt"], "prompt_ids": ids,
                    "prompt_text": render_prompt(tokenizer, row["prompt"], chat)})
    counts.log(name)
    return out
