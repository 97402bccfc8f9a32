"""Reward functions for GRPO/PPO: rule-based checks, a registry, and reward-model scoring.

A reward function is any callable ``fn(prompts, completions, **fields) -> list[float]``, one float per completion
(the TRL convention). ``fields`` carries every extra column of the RL dataset row (e.g. ``answer``), repeated
so that ``fields[k][i]`` belongs to ``completions[i]``, plus ``truncated`` (list[bool]: the completion hit
``max_new_tokens`` without EOS). Functions take what they need by name and swallow the rest with ``**_``.

Names resolve through :data:`REWARD_FUNCTIONS` (add yours with :func:`register_reward`) or as an import path
``"package.module:function"``, found on sys.path or in the current directory (as ``python -m`` finds it). :class:`RewardModelScorer` turns a reward-model checkpoint directory written by
``fastalign train rm`` into such a callable, so rule-based and learned rewards mix freely with weights.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch

from fastalign.train import batching, data, models
from fastalign.train.config import reward_function_names

RewardFn = Callable[..., list[float]]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}

_INTEGER = re.compile(r"-?\d+")


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make ``fn`` available as ``--reward_funcs name``. Re-registering a name raises."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARD_FUNCTIONS and REWARD_FUNCTIONS[name] is not fn:
            raise ValueError(f"reward function {name!r} is already registered")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """A registered reward function by name, or ``"module:attr"`` imported; a clear error otherwise."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        mod = import_reward_module(module, name)
        if not hasattr(mod, attr):
            raise ValueError(f"cannot import reward function {name!r}: module {module!r} "
                             f"({getattr(mod, '__file__', None) or 'no file'}) has no attribute {attr!r}")
        fn = getattr(mod, attr)
        if not callable(fn):
            raise TypeError(f"reward function {name!r} is not callable")
        return fn
    known = ", ".join(sorted(REWARD_FUNCTIONS))
    raise ValueError(f"unknown reward function {name!r}; registered: {known}; or pass 'package.module:function'")


def import_reward_module(module: str, name: str):
    """Import ``module`` as ``python -m`` would: from sys.path, then from the current directory (a console script
    such as ``fastalign`` does not put it on the path). A module found nowhere raises saying where it looked."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
            raise ValueError(f"cannot import reward function {name!r}: {err}") from err  # an import inside it
        missing = err.name
    except ImportError as err:
        raise ValueError(f"cannot import reward function {name!r}: {err}") from err
    cwd = os.getcwd()
    searched_cwd = cwd in sys.path or "" in sys.path
    if not searched_cwd:
        sys.path.insert(0, cwd)  # where python -m puts it; kept, so the module's own later imports work too
        importlib.invalidate_caches()
        try:
            return importlib.import_module(module)
        except ModuleNotFoundError as err:
            sys.path.remove(cwd)
            if err.name is None or not (module == err.name or module.startswith(err.name + ".")):
                raise ValueError(f"cannot import reward function {name!r}: {err}") from err
            missing = err.name
        except ImportError as err:
            raise ValueError(f"cannot import reward function {name!r}: {err}") from err
    places = [p or "(current directory)" for p in sys.path]
    shown = ", ".join(places[:6]) + (f", ... ({len(places) - 6} more)" if len(places) > 6 else "")
    raise ValueError(f"cannot import reward function {name!r}: no module named {missing!r} in the current directory "
                     f"{cwd} nor on sys.path ({shown}); run from the directory that holds it, or add its directory "
                     f"to PYTHONPATH")


def normalize_answer(text: str) -> str:
    """Whitespace-free text: char-level tokenizers may decode ``"19"`` as ``"1 9"``."""
    return re.sub(r"\s+", "", str(text))


def _field(fields: dict[str, Any], key: str, n: int, fn: str) -> list:
    if key not in fields:
        raise KeyError(f"reward function {fn!r} needs the dataset field {key!r}; the rows have {sorted(fields)}")
    values = list(fields[key])
    if len(values) != n:
        raise ValueError(f"reward field {key!r} has {len(values)} values for {n} completions")
    return values


@register_reward("exact_match")
def exact_match(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """1.0 where the completion equals the row's ``answer`` (whitespace ignored), else 0.0."""
    answers = _field(fields, "answer", len(completions), "exact_match")
    return [float(normalize_answer(c) == normalize_answer(a)) for c, a in zip(completions, answers)]


@register_reward("format")
def integer_format(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """1.0 where the completion is one bare integer that ended with EOS (not truncated), else 0.0."""
    truncated = fields.get("truncated") or [False] * len(completions)
    return [
        float(bool(_INTEGER.fullmatch(normalize_answer(c))) and not t) for c, t in zip(completions, truncated)
    ]


@register_reward("numeric_closeness")
def numeric_closeness(prompts: Sequence[str], completions: Sequence[str], **fields) -> list[float]:
    """Dense shaping: ``1 / (1 + |pred - answer|)`` for integer completions, 0.0 when no integer parses."""
    answers = _field(fields, "answer", len(completions), "numeric_closeness")
    out = []
    for c, a in zip(completions, answers):
        text = normalize_answer(c)
        out.append(1.0 / (1.0 + abs(int(text) - int(a))) if _INTEGER.fullmatch(text) else 0.0)
    return out


class RewardModelScorer:
    """Score ``prompt + completion`` with a reward-model checkpoint (``RUN_DIR/final`` of ``fastalign train rm``).

    Rows are tokenized exactly as the RM trainer tokenized its pairs (``data.encode_completions``: a
    conversational prompt through the RM tokenizer's chat template with the completion as the assistant's
    message, a string prompt as plain text; ``chat_template`` as in the trainer configs), so a policy with another
    tokenizer can still be scored. The scalar head's output at the last token is the reward; no grad.

    Args:
        path: checkpoint directory (safetensors, ``save_pretrained`` layout) with its tokenizer.
        device, dtype: where and how to run it. batch_size: completions per forward.
        max_length, max_prompt_length: token budgets (prompts keep their end, completions their start).
    """

    def __init__(self, path: str, *, device: str | torch.device = "cpu", dtype: str = "auto", batch_size: int = 32,
                 max_length: int = 1024, max_prompt_length: int = 512, chat_template: str = "auto"):
        self.model = models.load_model(path, kind="score", dtype=dtype, device=device)
        self.model.eval().requires_grad_(False)
        self.tokenizer = models.load_tokenizer(path)
        self.chat_template = chat_template
        self.device = torch.device(device)
        self.batch_size, self.max_length, self.max_prompt_length = batch_size, max_length, max_prompt_length
        self.__name__ = f"reward_model:{path}"

    def encode(self, prompt, completion: str) -> list[int]:
        chat = data.chat_for(isinstance(prompt, list), self.chat_template, self.tokenizer)
        p, (c,) = data.encode_completions(self.tokenizer, prompt, [completion], chat)
        p = p[-self.max_prompt_length:]
        return (p + c)[:self.max_length]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
        scores: list[float] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(completions), self.batch_size):
            seqs = [self.encode(p, c) for p, c in zip(prompts[start:start + self.batch_size],
                                                       completions[start:start + self.batch_size])]
            ids = batching.pad_right(seqs, pad).to(self.device)
            mask = batching.attention_mask(seqs).to(self.device)
            scores += models.sequence_scores(self.model, ids, mask).float().cpu().tolist()
        return scores


class Rewards:
    """A weighted sum of reward functions, returning the total and each part (for logging).

    Args:
        fns: (name, callable, weight) triples.
    """

    def __init__(self, fns: Sequence[tuple[str, RewardFn, float]]):
        if not fns:
            raise ValueError("at least one reward function (or a reward model) is needed")
        self.fns = list(fns)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], fields: dict[str, list] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns total: (B,) fp32 and {name: (B,) fp32}. A function returning the wrong count raises."""
        fields = dict(fields or {})
        parts: dict[str, torch.Tensor] = {}
        total = torch.zeros(len(completions), dtype=torch.float32)
        for name, fn, weight in self.fns:
            values = fn(list(prompts), list(completions), **fields)
            if len(values) != len(completions):
                raise ValueError(f"reward function {name!r} returned {len(values)} values for "
                                 f"{len(completions)} completions")
            part = torch.tensor([float("nan") if v is None else float(v) for v in values], dtype=torch.float32)
            if not torch.isfinite(part).all():
                raise ValueError(f"reward function {name!r} returned a non-finite value: {values}")
            parts[name] = part
            total += weight * part
        return total, parts


def build_rewards(
    names: Sequence[str] = ("exact_match",),
    weights: Sequence[float] | None = None,
    *,
    reward_model: str | None = None,
    reward_model_weight: float = 1.0,
    device: str | torch.device = "cpu",
    chat_template: str = "auto",
) -> Rewards:
    """Resolve reward-function names (and an optional reward-model directory) into one :class:`Rewards`.
    ``names`` may be empty when a reward model is given."""
    names = reward_function_names(names)
    weights = [1.0] * len(names) if weights is None or len(weights) == 0 else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} reward weights for {len(names)} reward functions {names}")
    fns = [(name, get_reward(name), w) for name, w in zip(names, weights)]
    if reward_model:
        scorer = RewardModelScorer(reward_model, device=device, chat_template=chat_template)
        fns.append(("reward_model", scorer, float(reward_model_weight)))
    return Rewards(fns)
