"""The embedded verifiable task: two-number addition, ``"12+7="`` -> ``"19"``, checked by exact match.

Every (a, b) with 0 <= a, b <= ``max_operand`` is shuffled with a fixed seed and cut into disjoint splits, so
held-out accuracy measures generalization, not recall:

    heldout.jsonl     {"prompt", "answer"}                 evaluation only (greedy decoding, exact match)
    sft.jsonl         {"prompt", "completion"}             supervised fine-tuning
    preference.jsonl  {"prompt", "chosen", "rejected"}     DPO; rejected = a plausible wrong sum
    rl.jsonl          {"prompt", "answer"}                 GRPO/PPO prompts; ``answer`` reaches the reward functions

The shipped copies under ``fastalign/data/demo/`` (``data.demo_files()``) are :func:`write_task_files` output for
the default :class:`AdditionTask` (a test regenerates and compares them).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastalign.train import data, generation
from fastalign.train.data import DEMO_SPLITS as SPLITS
from fastalign.train.rewards import exact_match


@dataclass(frozen=True)
class AdditionTask:
    """Sizes of the splits (disjoint problems) and the seed that draws them."""

    max_operand: int = 99
    n_heldout: int = 500
    n_sft: int = 3000
    n_preference: int = 2000
    n_rl: int = 2000
    seed: int = 0

    def __post_init__(self):
        total = (self.max_operand + 1) ** 2
        need = self.n_heldout + self.n_sft + self.n_preference + self.n_rl
        if need > total:
            raise ValueError(f"the splits need {need} distinct problems but max_operand={self.max_operand} has {total}")


def prompt_text(a: int, b: int) -> str:
    return f"{a}+{b}="


def wrong_answer(a: int, b: int, rng: random.Random) -> int:
    """A plausible mistake: off by one, off by ten, a dropped carry, or swapped digits; never the right sum."""
    right = a + b
    no_carry = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(f"{a:03d}", f"{b:03d}")))
    candidates = [right + 1, right - 1, right + 10, right - 10, no_carry, int(str(right)[::-1])]
    candidates = [c for c in candidates if c >= 0 and c != right]
    return rng.choice(candidates)


def make_splits(task: AdditionTask = AdditionTask()) -> dict[str, list[dict]]:
    """The four splits as lists of JSON rows (deterministic in ``task``)."""
    rng = random.Random(task.seed)
    problems = [(a, b) for a in range(task.max_operand + 1) for b in range(task.max_operand + 1)]
    rng.shuffle(problems)
    sizes = dict(heldout=task.n_heldout, sft=task.n_sft, preference=task.n_preference, rl=task.n_rl)
    splits, start = {}, 0
    for name in SPLITS:
        chunk, start = problems[start:start + sizes[name]], start + sizes[name]
        if name == "sft":
            splits[name] = [{"prompt": prompt_text(a, b), "completion": str(a + b)} for a, b in chunk]
        elif name == "preference":
            splits[name] = [{"prompt": prompt_text(a, b), "chosen": str(a + b),
                             "rejected": str(wrong_answer(a, b, rng))} for a, b in chunk]
        else:
            splits[name] = [{"prompt": prompt_text(a, b), "answer": str(a + b)} for a, b in chunk]
    return splits


def write_task_files(out_dir: str | Path, task: AdditionTask = AdditionTask()) -> dict[str, Path]:
    """Write ``<split>.jsonl`` for every split (and ``task.json``) to ``out_dir``; returns {split: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in make_splits(task).items():
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (out / "task.json").write_text(json.dumps(asdict(task), indent=1) + "\n", encoding="utf-8")
    return paths


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, tokenizer, rows: Sequence[dict], *, max_new_tokens: int = 8,
                      batch_size: int = 256, chat_template: str = "auto", max_prompt_length: int = 256,
                      backend: generation.GenerationBackend | None = None) -> float:
    """Exact-match accuracy of greedy completions on rows with ``prompt`` and ``answer`` (e.g. heldout.jsonl).

    Prompts are encoded by ``data.tokenize_prompts``, exactly as the trainers encode them (``chat_template``
    as in the trainer configs: auto = the template for message-list prompts only, on = for every prompt).
    """
    rows = list(rows)
    if not rows:
        raise ValueError("evaluate_accuracy needs at least one row")
    backend = backend or generation.HFGenerationBackend(model, pad_token_id=tokenizer.pad_token_id,
                                                     eos_token_id=tokenizer.eos_token_id, batch_size=batch_size)
    encoded = data.tokenize_prompts(rows, tokenizer, max_prompt_length=max_prompt_length,
                                        chat_template=chat_template, name="eval")
    prompt_ids = [e["prompt_ids"] for e in encoded]
    completions = backend.generate(prompt_ids, generation.SamplingParams(max_new_tokens=max_new_tokens, greedy=True))
    texts = generation.decode_completions(tokenizer, completions)
    scores = exact_match([r["prompt"] for r in rows], texts, answer=[r["answer"] for r in rows])
    return sum(scores) / len(scores)


# the shipped split files are found through fastalign.train.data
