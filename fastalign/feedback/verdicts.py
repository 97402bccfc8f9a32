"""Asking a feedback / judge model for a verdict among a few labels, from log-probs or from generated text.

``method="logprobs"``: the probability of each label as the model's next token, renormalized over the labels
(:meth:`TextModel.choice_probs`). ``method="text"``: a greedy generation, parsed; an unparseable one is retried
once, sampled at ``retry_temperature``, and if that fails too the verdict is None: counted by the caller, never
guessed.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from fastalign.feedback.engine import SamplingParams, TextModel
from fastalign.feedback.io import FeedbackError
from fastalign.feedback.prompts import derive_seed

log = logging.getLogger("fastalign.feedback")


@dataclass
class Verdict:
    label: str | None  # the verdict: the most probable label (log-probs) or the parsed one (text); None: none
    probs: list[float] | None  # per label: renormalized probabilities, or one-hot for a parsed text verdict
    raw: str | None = None  # the generated text of the last attempt (text)
    attempts: int = 0  # generations made (text: 1, or 2 after a retry)
    mass: float | None = None  # probability the model put on the labels, of its whole vocabulary (log-probs)

    def to_dict(self) -> dict:
        return asdict(self)


def resolve_method(model: TextModel, method: str, example: list[dict], labels: Sequence[str]) -> str:
    """"logprobs" or "text". ``auto`` takes log-probs when the backend can score tokens and every label is one
    token after the rendered ``example`` prompt; otherwise text, with one logged line saying why."""
    if method == "text":
        return "text"
    reason = None
    if model.scorer is None:
        reason = f"the backend of {model.name} cannot score tokens"
    else:
        try:
            model.choice_token_ids(model.render(example), labels)
        except FeedbackError as exc:
            reason = str(exc)
    if reason is None:
        return "logprobs"
    if method == "logprobs":
        raise FeedbackError(f"method logprobs: {reason}")
    log.info("verdicts from parsed text: %s", reason)
    return "text"


def ask(model: TextModel, conversations: Sequence[list[dict]], labels: Sequence[str], *, method: str,
        parse: Callable[[str], str | None], max_new_tokens: int = 16, retry_temperature: float = 1.0,
        seed: int = 0) -> list[Verdict]:
    """One :class:`Verdict` per conversation (``method`` already resolved: "logprobs" or "text"). Under
    "logprobs", a conversation whose labels the scorer could not all see (a server lists only its top next
    tokens) gets a text verdict instead, as under "text" (logged; its ``mass`` stays None)."""
    if method not in ("logprobs", "text"):
        raise ValueError(f"method must be 'logprobs' or 'text', got {method!r}")
    out = [Verdict(None, None) for _ in conversations]
    pending = list(range(len(conversations)))
    if method == "logprobs":
        scored = model.choice_probs(conversations, labels)
        pending = []
        for i, (probs, mass) in enumerate(zip(scored.probs.tolist(), scored.mass.tolist())):
            if any(math.isnan(p) for p in probs):
                pending.append(i)
                continue
            best = max(range(len(labels)), key=lambda k: probs[k])
            out[i] = Verdict(labels[best], probs, mass=mass)
        if pending:
            log.info("verdicts: %d of %d from parsed text: a label was outside the scorer's top log-probs "
                     "(--top-logprobs)", len(pending), len(conversations))
    attempts = [SamplingParams(max_new_tokens=max_new_tokens, greedy=True),
                SamplingParams(max_new_tokens=max_new_tokens, temperature=retry_temperature)]
    for attempt, sampling in enumerate(attempts):
        if not pending:
            break
        texts = model.generate([conversations[i] for i in pending], sampling, seed=derive_seed(seed, attempt))
        failed = []
        for i, gen in zip(pending, texts):
            label = parse(gen.text)
            out[i] = Verdict(label, None if label is None else [float(lab == label) for lab in labels],
                             raw=gen.text, attempts=attempt + 1)
            if label is None:
                failed.append(i)
        pending = failed
    return out
