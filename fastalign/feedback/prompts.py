"""The conversations the feedback stages send to a model, seeded principle draws, and verdict parsing.

Every prompt is a list of ``{role, content}`` messages; :class:`fastalign.feedback.engine.TextModel` renders it
with the tokenizer's chat template (or as plain ``User:`` / ``Assistant:`` blocks) and asks for the next
assistant turn. Few-shot examples become earlier turns of the same conversation.

Critique and revision (one round; each round sees the prompt and the current response only, so prompts do not
grow with the number of rounds)::

    user: <prompt>   assistant: <response>   user: <principle.critique>                       -> critique
    ... user: <principle.critique>   assistant: <critique>   user: <principle.revision>      -> revision

Comparison (labelling) and judging: one user turn filled from the constitution's / rubric's template; the
verdict is the next assistant token (log-prob scoring) or parsed from generated text (:func:`parse_choice`).
"""
from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence

from fastalign.feedback.constitution import Constitution, Principle, Rubric
from fastalign.feedback.io import prompt_text


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts (seed, stage, row ids): the same work always gets the same draw, whatever
    ran before it, so a resumed run samples what an uninterrupted one would."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_principles(constitution: Constitution, k: int, *parts) -> list[Principle]:
    """``k`` distinct principles drawn uniformly, seeded by ``parts`` (e.g. seed, row id, round)."""
    if not 1 <= k <= len(constitution.principles):
        raise ValueError(f"cannot draw {k} of {len(constitution.principles)} principles")
    return random.Random(derive_seed(*parts)).sample(list(constitution.principles), k)


def as_messages(prompt) -> list[dict]:
    return [dict(m) for m in prompt] if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def _few_shot(constitution: Constitution, count: int | None) -> list[dict]:
    out = []
    for ex in constitution.few_shot[:count]:
        p = constitution.principle(ex["principle"])
        out += _turns(("user", ex["prompt"]), ("assistant", ex["response"]), ("user", p.critique),
                      ("assistant", ex["critique"]), ("user", p.revision), ("assistant", ex["revision"]))
    return out


def critique_messages(constitution: Constitution, prompt, response: str, principle: Principle, *,
                      few_shot: int | None = None) -> list[dict]:
    """Ask for a critique of ``response`` under ``principle``."""
    return (_few_shot(constitution, few_shot) + as_messages(prompt)
            + _turns(("assistant", response), ("user", principle.critique)))


def revision_messages(constitution: Constitution, prompt, response: str, principle: Principle, critique: str, *,
                      few_shot: int | None = None) -> list[dict]:
    """Ask for a revision of ``response`` that answers ``critique``."""
    return (critique_messages(constitution, prompt, response, principle, few_shot=few_shot)
            + _turns(("assistant", critique), ("user", principle.revision)))


def comparison_messages(constitution: Constitution, prompt, response_a: str, response_b: str,
                        principle: Principle, *, few_shot: int | None = None) -> list[dict]:
    """Ask which of two responses better meets ``principle``; the answer is one of ``constitution.choices``."""
    a, b = constitution.choices

    def fill(p, ra, rb, question):
        return constitution.comparison_template.format(prompt=prompt_text(p), response_a=ra, response_b=rb,
                                                       question=question, choice_a=a, choice_b=b)

    out = []
    for ex in constitution.comparison_few_shot[:few_shot]:
        question = constitution.principle(ex["principle"]).comparison
        out += _turns(("user", fill(ex["prompt"], ex["response_a"], ex["response_b"], question)),
                      ("assistant", ex["answer"]))
    return out + _turns(("user", fill(prompt, response_a, response_b, principle.comparison)))


def pairwise_messages(rubric: Rubric, prompt, response_a: str, response_b: str) -> list[dict]:
    """The judge's pairwise question; the verdict is ``rubric.choices[0]``, ``[1]`` or ``rubric.tie``."""
    a, b = rubric.choices
    text = rubric.pairwise_template.format(prompt=prompt_text(prompt), response_a=response_a,
                                           response_b=response_b, criteria=rubric.criteria_text(), choice_a=a,
                                           choice_b=b, tie=rubric.tie)
    return _turns(("user", text))


def single_messages(rubric: Rubric, prompt, response: str) -> list[dict]:
    """The judge's single-answer grading question; the verdict is an integer in ``rubric.scale``."""
    lo, hi = rubric.scale
    text = rubric.single_template.format(prompt=prompt_text(prompt), response=response,
                                         criteria=rubric.criteria_text(), min_score=lo, max_score=hi)
    return _turns(("user", text))


# ------------------------------------------------------------------------------------------------- parsing

_END = r"$|[\s.,;:!?)\]]*(?:$|\n)|[.,;:!?)\]]"  # a bare leading verdict ends its line or is punctuated


def parse_choice(text: str, labels: Sequence[str]) -> str | None:
    """The verdict in a generated judgement, or None (never a guess).

    Verdicts: a label the reply *starts* with, if it ends the line or is followed by punctuation (``"B"``,
    ``"B."``, ``"A) because ..."``, ``"A\\nBecause"``), and every bracketed ``[[label]]``. The reply's verdict
    is the one label they all name; none, or two different ones, is no verdict. ``"A good answer ..."`` starts
    with no verdict.
    """
    stripped = text.strip()
    alternation = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    found = set(re.findall(rf"\[\[\s*({alternation})\s*\]\]", stripped))
    lead = re.match(rf"^(?:\[\[)?({alternation})(?:\]\])?(?={_END})", stripped)
    if lead:
        found.add(lead.group(1))
    return found.pop() if len(found) == 1 else None


def parse_score(text: str, low: int, high: int) -> int | None:
    """An integer grade in ``[low, high]`` from a generated judgement, or None.

    Grades: a leading integer (``"7"``, ``"7/10"``, ``"7. Clear and ..."``) and every bracketed ``[[7]]``; they
    must all agree. Out-of-range numbers are not grades.
    """
    stripped = text.strip()
    values = {int(v) for v in re.findall(r"\[\[\s*(\d+)\s*\]\]", stripped)}
    lead = re.match(rf"^(?:\[\[)?(\d+)(?:\]\])?(?=/|{_END})", stripped)
    if lead:
        values.add(int(lead.group(1)))
    if len(values) != 1:
        return None
    value = values.pop()
    return value if low <= value <= high else None
