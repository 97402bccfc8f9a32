"""Constitutions and judge rubrics as data: YAML (or JSON) files, validated with errors naming file and field.

A constitution (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback") lists principles; each
has a critique request and a revision request (the supervised stage) and a comparison question (AI
preference labels). ``comparison_template`` turns a question and two responses into the labelling prompt;
its verdict is one of ``choices``. Optional few-shot examples are shown before the real turn::

    name: my-constitution
    choices: [A, B]                     # verdict labels; for log-prob scoring each must be a single token
    comparison_template: |              # placeholders: {prompt} {response_a} {response_b} {question}
      ...                               #               {choice_a} {choice_b}; literal braces as {{ }}
    principles:
      - id: honest                      # [a-z0-9_-]+, unique
        critique: "Point out ..."       # asked after the response
        revision: "Rewrite ..."         # asked after the critique
        comparison: "Which reply ...?"  # the {question} of the comparison template
    few_shot:                           # optional: critique/revision demonstrations
      - {prompt: ..., response: ..., principle: honest, critique: ..., revision: ...}
    comparison_few_shot:                # optional: labelling demonstrations
      - {prompt: ..., response_a: ..., response_b: ..., principle: honest, answer: A}

A rubric is the judge's counterpart: ``pairwise_template`` (placeholders {prompt} {response_a} {response_b}
{criteria} {choice_a} {choice_b} {tie}), ``single_template`` ({prompt} {response} {criteria} {min_score}
{max_score}), ``criteria`` (a list of ``{id, description}``), ``scale`` ``[min, max]``, ``choices`` and ``tie``.

The shipped defaults are ``fastalign/data/feedback/constitution.yaml`` and ``rubric.yaml``.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastalign.feedback.io import FeedbackError

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "feedback"
DEFAULT_CONSTITUTION = DATA_DIR / "constitution.yaml"
DEFAULT_RUBRIC = DATA_DIR / "rubric.yaml"
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    comparison: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    comparison_template: str
    choices: tuple[str, str]
    few_shot: tuple[dict, ...] = ()
    comparison_few_shot: tuple[dict, ...] = ()
    path: str = ""

    def principle(self, pid: str) -> Principle:
        for p in self.principles:
            if p.id == pid:
                return p
        raise FeedbackError(f"{self.path}: no principle {pid!r} (has {[p.id for p in self.principles]})")

    def subset(self, ids: list[str]) -> "Constitution":
        """The same constitution restricted to the principles ``ids`` (all when empty)."""
        if not ids:
            return self
        return Constitution(self.name, tuple(self.principle(i) for i in ids), self.comparison_template,
                            self.choices, self.few_shot, self.comparison_few_shot, self.path)


@dataclass(frozen=True)
class Rubric:
    name: str
    pairwise_template: str
    single_template: str
    criteria: tuple[tuple[str, str], ...]  # (id, description)
    scale: tuple[int, int]
    choices: tuple[str, str]
    tie: str
    path: str = ""

    def criteria_text(self) -> str:
        return "\n".join(f"- {cid}: {text}" for cid, text in self.criteria)


# ------------------------------------------------------------------------------------------------ validation

@dataclass
class _Fields:
    """Field access on a mapping with errors that name the file and the dotted field path."""

    data: dict
    path: str
    prefix: str = ""
    used: set = field(default_factory=set)

    def where(self, key: str) -> str:
        return f"{self.path}: field '{self.prefix}{key}'"

    def text(self, key: str, *, optional: bool = False) -> str | None:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in self.data else f"got {type(value).__name__} {value!r}"[:80]
            raise FeedbackError(f"{self.where(key)}: must be a non-empty string ({got})")
        return value

    def items(self, key: str, *, optional: bool = False) -> list:
        self.used.add(key)
        value = self.data.get(key)
        if value is None and optional:
            return []
        if not isinstance(value, list) or (not value and not optional):
            raise FeedbackError(f"{self.where(key)}: must be a non-empty list")
        return value

    def child(self, key: str, index: int) -> "_Fields":
        value = self.data[key][index]
        if not isinstance(value, dict):
            raise FeedbackError(f"{self.where(f'{key}[{index}]')}: must be a mapping, got {type(value).__name__}")
        return _Fields(value, self.path, f"{self.prefix}{key}[{index}].")

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise FeedbackError(f"{self.where(unknown[0])}: unknown field (valid: {sorted(self.used)})")


def _template(fields: _Fields, key: str, allowed: set[str], required: set[str]) -> str:
    text = fields.text(key)
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as exc:
        raise FeedbackError(f"{fields.where(key)}: bad template ({exc}); write literal braces as {{{{ }}}}") from None
    bad = sorted(n for n in names if n not in allowed)
    if bad:
        raise FeedbackError(f"{fields.where(key)}: unknown placeholder {{{bad[0]}}} (allowed: "
                            f"{', '.join('{' + a + '}' for a in sorted(allowed))})")
    missing = sorted(required - names)
    if missing:
        raise FeedbackError(f"{fields.where(key)}: missing placeholder {{{missing[0]}}}")
    return text


def _labels(fields: _Fields, key: str, count: int) -> tuple[str, ...]:
    fields.used.add(key)
    value = fields.data.get(key)
    if (not isinstance(value, list) or len(value) != count or not all(isinstance(v, str) and v.strip()
                                                                       and v == v.strip() for v in value)
            or len(set(value)) != count):
        raise FeedbackError(f"{fields.where(key)}: must be a list of {count} distinct non-empty labels without "
                            f"surrounding spaces, got {value!r}")
    return tuple(value)


def _read_mapping(path: str | Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FeedbackError(f"{path}: no such {what} file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise FeedbackError(f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({exc})"
                            .replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise FeedbackError(f"{path}: a {what} must be a mapping of fields, got {type(data).__name__}")
    return data


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution (``None``: the shipped default)."""
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    f = _Fields(_read_mapping(path, "constitution"), str(path))
    name = f.text("name")
    choices = _labels(f, "choices", 2)
    template = _template(f, "comparison_template", {"prompt", "response_a", "response_b", "question", "choice_a",
                                                    "choice_b"}, {"prompt", "response_a", "response_b", "question"})
    principles, ids = [], set()
    for i in range(len(f.items("principles"))):
        p = f.child("principles", i)
        pid = p.text("id")
        if not _ID.match(pid):
            raise FeedbackError(f"{p.where('id')}: {pid!r} must match [a-z0-9][a-z0-9_-]*")
        if pid in ids:
            raise FeedbackError(f"{p.where('id')}: duplicate principle id {pid!r}")
        ids.add(pid)
        principles.append(Principle(pid, p.text("critique"), p.text("revision"), p.text("comparison")))
        p.done()
    few_shot = []
    for i in range(len(f.items("few_shot", optional=True))):
        e = f.child("few_shot", i)
        ex = {k: e.text(k) for k in ("prompt", "response", "critique", "revision")}
        ex["principle"] = _known(e, "principle", ids)
        e.done()
        few_shot.append(ex)
    comparison_few_shot = []
    for i in range(len(f.items("comparison_few_shot", optional=True))):
        e = f.child("comparison_few_shot", i)
        ex = {k: e.text(k) for k in ("prompt", "response_a", "response_b")}
        ex["principle"] = _known(e, "principle", ids)
        ex["answer"] = e.text("answer")
        if ex["answer"] not in choices:
            raise FeedbackError(f"{e.where('answer')}: must be one of the choices {list(choices)}, "
                                f"got {ex['answer']!r}")
        e.done()
        comparison_few_shot.append(ex)
    f.text("description", optional=True)
    f.done()
    return Constitution(name, tuple(principles), template, choices, tuple(few_shot), tuple(comparison_few_shot),
                        str(path))


def _known(fields: _Fields, key: str, ids: set[str]) -> str:
    value = fields.text(key)
    if value not in ids:
        raise FeedbackError(f"{fields.where(key)}: unknown principle {value!r} (defined: {sorted(ids)})")
    return value


def load_rubric(path: str | Path | None = None) -> Rubric:
    """Read and validate a judge rubric (``None``: the shipped default)."""
    path = Path(path) if path is not None else DEFAULT_RUBRIC
    f = _Fields(_read_mapping(path, "rubric"), str(path))
    name = f.text("name")
    choices = _labels(f, "choices", 2)
    tie = f.text("tie")
    if tie in choices or tie != tie.strip():
        raise FeedbackError(f"{f.where('tie')}: must be a label distinct from the choices {list(choices)}")
    pairwise = _template(f, "pairwise_template", {"prompt", "response_a", "response_b", "criteria", "choice_a",
                                                  "choice_b", "tie"}, {"prompt", "response_a", "response_b"})
    single = _template(f, "single_template", {"prompt", "response", "criteria", "min_score", "max_score"},
                       {"prompt", "response"})
    criteria = []
    for i in range(len(f.items("criteria"))):
        c = f.child("criteria", i)
        criteria.append((c.text("id"), c.text("description")))
        c.done()
    f.used.add("scale")
    scale = f.data.get("scale")
    if (not isinstance(scale, list) or len(scale) != 2 or not all(isinstance(s, int) and not isinstance(s, bool)
                                                                  for s in scale) or not 0 <= scale[0] < scale[1]):
        raise FeedbackError(f"{f.where('scale')}: must be [min, max] integers with 0 <= min < max, got {scale!r}")
    f.text("description", optional=True)
    f.done()
    return Rubric(name, pairwise, single, tuple(criteria), (scale[0], scale[1]), choices, tie, str(path))
