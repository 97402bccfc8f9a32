"""The ``fastalign cai ...`` and ``fastalign judge ...`` verbs.

    fastalign cai revise  --prompts p.jsonl --out cai/sft.jsonl --rounds 2            # -> fastalign train sft
    fastalign cai label   --prompts p.jsonl --policy runs/sft/final --out cai/prefs.jsonl   # -> train dpo|rm
    fastalign judge answer   --model runs/dpo/final --prompts eval.jsonl --out judge/dpo.jsonl
    fastalign judge pairwise --a judge/dpo.jsonl --b judge/sft.jsonl --out-dir judge/dpo-vs-sft
    fastalign judge single   --answers judge/dpo.jsonl,judge/sft.jsonl --out-dir judge/grades
    fastalign judge pairwise ... --generation-backend openai --base-url http://127.0.0.1:8000/v1 --model TOKENIZER_DIR

``fastalign/cli.py`` calls :func:`add_commands` when building its parser and :func:`run` for these commands.
Bad input (a missing file, a bad row or constitution field) is one line ``fastalign: error: ...`` and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys

import yaml

from fastalign.feedback import config as cfgs
from fastalign.train.config_parsing import add_arguments

# (group, verb) -> (config class, module, function)
VERBS = {
    ("cai", "revise"): (cfgs.ReviseConfig, "fastalign.feedback.revise", "revise"),
    ("cai", "label"): (cfgs.LabelConfig, "fastalign.feedback.label", "label"),
    ("judge", "answer"): (cfgs.AnswerConfig, "fastalign.feedback.judge", "answer"),
    ("judge", "pairwise"): (cfgs.PairwiseConfig, "fastalign.feedback.judge", "pairwise"),
    ("judge", "single"): (cfgs.SingleConfig, "fastalign.feedback.judge", "single"),
}
GROUPS = {
    "cai": "Constitutional AI: critique-and-revise SFT data (revise), AI preference labels (label)",
    "judge": "LLM-as-judge: answers, pairwise win rates, single-answer grades",
}


def add_commands(subparsers) -> None:
    """Register ``cai`` and ``judge`` (with their verbs and every option as a flag) on ``subparsers``."""
    for group, text in GROUPS.items():
        parser = subparsers.add_parser(group, help=text, description=text)
        verbs = parser.add_subparsers(dest="verb", metavar="VERB")
        parser.set_defaults(feedback_parser=parser)
        for (g, verb), (cls, _, _) in VERBS.items():
            if g == group:
                doc = (cls.__doc__ or "").strip()
                sub = verbs.add_parser(verb, help=doc.splitlines()[0] if doc else verb, description=doc)
                add_arguments(sub, cls)


def _error(exc) -> int:
    print(f"fastalign: error: {exc}", file=sys.stderr)
    return 2


def _setup_logging() -> None:
    log = logging.getLogger("fastalign.feedback")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[fastalign] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)


def run(args: argparse.Namespace) -> int:
    """Run the verb parsed into ``args``; prints the stage's summary as JSON. Returns the exit code."""
    from fastalign.feedback.io import FeedbackError
    from fastalign.train.data import DataError
    from fastalign.train.generation_http import ServerUnavailable

    if not getattr(args, "verb", None):
        args.feedback_parser.print_help()
        return 2
    cls, module, function = VERBS[(args.command, args.verb)]
    try:
        cfg = cfgs.from_namespace(cls, args)
    except (ValueError, OSError, yaml.YAMLError) as exc:  # a bad value, or a missing or malformed YAML file
        return _error(str(exc).replace("\n", " "))
    _setup_logging()
    try:
        summary = getattr(importlib.import_module(module), function)(cfg)
    except (FeedbackError, DataError, FileNotFoundError, ServerUnavailable) as exc:
        return _error(str(exc).replace("\n", " "))
    except ImportError as exc:  # --generation-backend vllm without vLLM installed
        if "--generation-backend vllm" not in str(exc):
            raise
        return _error(exc)
    print(json.dumps(summary, indent=2, ensure_ascii=False))
    return 0
