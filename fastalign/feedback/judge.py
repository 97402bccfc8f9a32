"""LLM-as-judge: ``fastalign judge answer|pairwise|single``.

``answer``: one model's answers to a prompt set -> ``{"id", "prompt", "completion", "category", "model", ...}``.

``pairwise`` (MT-Bench style, Zheng et al. 2023): for every prompt both models answered, the judge sees the two
answers in both orders and gives A, B or the tie label in each. Per order, the verdict is mapped back to the
models; the prompt's outcome is the verdict both orders agree on, and a tie when they disagree (counted in the
position-bias rate). With log-prob verdicts ``soft_score_a`` also keeps the order-averaged
``P(A wins) + P(tie) / 2``. ``single``: a grade in the rubric's scale for each answer (the expected grade under
the label probabilities when every grade is one token and the backend scores tokens; else the parsed grade).

Both write ``verdicts.jsonl`` (resumable like the CAI stages), ``summary.json`` (:mod:`fastalign.feedback.stats`)
and ``chart.png`` into ``out_dir``. Unparseable verdicts are retried once, then counted, never guessed.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from fastalign.feedback import stats
from fastalign.feedback.config import AnswerConfig, JudgeOptions, PairwiseConfig, SingleConfig
from fastalign.feedback.constitution import DATA_DIR, load_rubric
from fastalign.feedback.engine import TextModel, load_text_model
from fastalign.feedback.io import FeedbackError, Journal, check_text, load_prompts, read_rows, row_id, where, write_json
from fastalign.feedback.prompts import (derive_seed, pairwise_messages, parse_choice, parse_score,
                                        single_messages)
from fastalign.feedback.verdicts import ask, resolve_method

log = logging.getLogger("fastalign.feedback")
EVAL_PROMPTS = DATA_DIR / "eval_prompts.jsonl"  # held out from the shipped prompts of cai revise / label


def _load(cfg, model: TextModel | None) -> TextModel:
    if model is not None:
        return model
    return load_text_model(cfg.model, **cfg.load_options())


def answer(cfg: AnswerConfig, *, model: TextModel | None = None) -> dict:
    """Write (or complete) ``cfg.out`` with one answer per prompt; returns a small summary."""
    rows, duplicates = load_prompts(cfg.prompts or EVAL_PROMPTS, max_rows=cfg.max_rows)
    out = Journal(cfg.out)
    done = out.values("id")
    pending = [r for r in rows if r["id"] not in done]
    if pending:
        model = _load(cfg, model)
    sampling = cfg.sampling()
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        gens = model.answer([r["prompt"] for r in batch], sampling, where=where(cfg.prompts or EVAL_PROMPTS, batch),
                            seed=derive_seed(cfg.seed, "answer", *[r["id"] for r in batch]))
        out.append([{**r, "completion": g.text, "truncated": g.truncated, "model": model.name,
                     "sampling": asdict(sampling), "seed": cfg.seed} for r, g in zip(batch, gens)])
    summary = {"stage": "judge answer", "out": str(cfg.out), "answers": len(out.rows),
               "duplicate_prompts": duplicates, "truncated": sum(r["truncated"] for r in out.rows),
               "model": out.rows[0]["model"] if out.rows else None}
    log.info("judge answer: %d answers in %s", len(out.rows), cfg.out)
    return summary


def load_answers(path: str | Path) -> tuple[dict[str, dict], str | None]:
    """Answers by id (default: the prompt's hash, as ``answer`` assigns them) and the file's model name."""
    answers, model = {}, None
    for where, row in read_rows(path):
        if not isinstance(row, dict):
            raise FeedbackError(f"{where}: expected a JSON object, got {type(row).__name__}")
        prompt = check_text(where, row, "prompt", messages_ok=True)
        completion = check_text(where, row, "completion")
        category = check_text(where, row, "category", optional=True)
        model = model or check_text(where, row, "model", optional=True)
        rid = str(row["id"]) if row.get("id") is not None else row_id(prompt)
        if rid in answers:
            raise FeedbackError(f"{where}: field 'id' {rid!r} is used by an earlier row")
        answers[rid] = {"id": rid, "prompt": prompt, "completion": completion, "category": category, "where": where}
    if not answers:
        raise FeedbackError(f"{path}: no rows")
    return answers, model


def _order(verdict_label: str | None, rubric, first: str) -> str | None:
    """A single-order verdict label -> "a" | "b" | "tie", given which model (``first``) was shown first."""
    if verdict_label is None:
        return None
    if verdict_label == rubric.tie:
        return "tie"
    shown_first = verdict_label == rubric.choices[0]
    return first if shown_first else ("b" if first == "a" else "a")


def pairwise(cfg: PairwiseConfig, *, model: TextModel | None = None) -> dict:
    """Judge answers A against answers B; writes verdicts, summary and chart; returns the summary."""
    rubric = load_rubric(cfg.rubric)
    a, model_a = load_answers(cfg.a)
    b, model_b = load_answers(cfg.b)
    name_a = cfg.name_a or model_a or Path(cfg.a).stem
    name_b = cfg.name_b or model_b or Path(cfg.b).stem
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    shared = [rid for rid in a if rid in b][: cfg.max_rows]
    for rid in shared:
        if a[rid]["prompt"] != b[rid]["prompt"]:
            raise FeedbackError(f"{b[rid]['where']}: id {rid!r} has a different prompt than {a[rid]['where']}")
    out_dir = Path(cfg.out_dir)
    verdicts = Journal(out_dir / "verdicts.jsonl")
    done = verdicts.values("id")
    pending = [rid for rid in shared if rid not in done]
    labels = [*rubric.choices, rubric.tie]
    method = None
    if pending:
        model = _load(cfg, model)
        example = pairwise_messages(rubric, a[pending[0]]["prompt"], "", "")
        method = resolve_method(model, cfg.method, example, labels)
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        convs = []
        for rid in batch:
            pa, pb = a[rid]["completion"], b[rid]["completion"]
            convs += [pairwise_messages(rubric, a[rid]["prompt"], pa, pb),  # A shown first, then B first
                      pairwise_messages(rubric, a[rid]["prompt"], pb, pa)]
        found = ask(model, convs, labels, method=method, parse=lambda t: parse_choice(t, labels),
                    max_new_tokens=cfg.max_new_tokens, retry_temperature=cfg.retry_temperature,
                    seed=derive_seed(cfg.seed, "pairwise", *batch))
        rows = []
        for n, rid in enumerate(batch):
            orders = []
            for first, v in (("a", found[2 * n]), ("b", found[2 * n + 1])):
                probs = None
                if v.probs is not None:  # per model, not per position
                    p_first, p_second, p_tie = v.probs
                    probs = {"a": p_first if first == "a" else p_second, "b": p_second if first == "a" else p_first,
                             "tie": p_tie}
                orders.append({"first": first, "verdict": _order(v.label, rubric, first), "probs": probs,
                               **{k: getattr(v, k) for k in ("raw", "attempts", "mass")}})
            v1, v2 = orders[0]["verdict"], orders[1]["verdict"]
            winner = None if v1 is None or v2 is None else (v1 if v1 == v2 else "tie")
            soft = None
            if method == "logprobs" and all(o["probs"] is not None for o in orders):  # none fell back to text
                soft = sum(o["probs"]["a"] + 0.5 * o["probs"]["tie"] for o in orders) / 2
            rows.append({"id": rid, "prompt": a[rid]["prompt"], "category": a[rid]["category"] or b[rid]["category"],
                         "model_a": name_a, "model_b": name_b, "answer_a": a[rid]["completion"],
                         "answer_b": b[rid]["completion"], "len_a": len(a[rid]["completion"]),
                         "len_b": len(b[rid]["completion"]), "orders": orders, "winner": winner,
                         "score_a": None if winner is None else {"a": 1.0, "tie": 0.5, "b": 0.0}[winner],
                         "consistent": None if winner is None else v1 == v2, "soft_score_a": soft,
                         "judge": model.name, "method": method})
        verdicts.append(rows)
        log.info("judge pairwise: %d/%d prompts", start + len(batch), len(pending))
    summary = {"stage": "judge pairwise", "model_a": name_a, "model_b": name_b, "rubric": rubric.name,
               "judge": verdicts.rows[0]["judge"] if verdicts.rows else None,
               "method": verdicts.rows[0]["method"] if verdicts.rows else None,
               "unmatched_a": sum(rid not in b for rid in a), "unmatched_b": sum(rid not in a for rid in b),
               **stats.pairwise_summary(verdicts.rows, resamples=cfg.bootstrap, confidence=cfg.confidence,
                                        seed=cfg.seed),
               "bootstrap": {"resamples": cfg.bootstrap, "confidence": cfg.confidence, "seed": cfg.seed}}
    return _finish(cfg, summary, "pairwise")


def single(cfg: SingleConfig, *, model: TextModel | None = None) -> dict:
    """Grade every answer of every file in ``cfg.answers``; writes verdicts, summary and chart."""
    rubric = load_rubric(cfg.rubric)
    low, high = rubric.scale
    labels = [str(s) for s in range(low, high + 1)]
    files = []
    for path in cfg.answers:
        answers, name = load_answers(path)
        files.append((name or Path(path).stem, list(answers.values())[: cfg.max_rows]))
    if len({name for name, _ in files}) != len(files):
        files = [(f"{name} ({i})", rows) for i, (name, rows) in enumerate(files)]
    verdicts = Journal(Path(cfg.out_dir) / "verdicts.jsonl")
    done = verdicts.values("key")
    pending = [(name, r) for name, rows in files for r in rows if f"{name}\x1f{r['id']}" not in done]
    method = None
    if pending:
        model = _load(cfg, model)
        method = resolve_method(model, cfg.method, single_messages(rubric, pending[0][1]["prompt"], ""), labels)
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        found = ask(model, [single_messages(rubric, r["prompt"], r["completion"]) for _, r in batch], labels,
                    method=method, parse=lambda text: _grade_label(text, low, high),
                    max_new_tokens=cfg.max_new_tokens, retry_temperature=cfg.retry_temperature,
                    seed=derive_seed(cfg.seed, "single", *[f"{n}\x1f{r['id']}" for n, r in batch]))
        rows = []
        for (name, r), v in zip(batch, found):
            if v.probs is None:
                score = None
            elif method == "logprobs":
                score = sum(int(lab) * p for lab, p in zip(labels, v.probs))
            else:
                score = int(v.label)
            rows.append({"key": f"{name}\x1f{r['id']}", "id": r["id"], "model": name, "prompt": r["prompt"],
                         "category": r["category"], "answer": r["completion"], "score": score,
                         "verdict": v.to_dict(), "judge": model.name, "method": method})
        verdicts.append(rows)
    summary = {"stage": "judge single", "rubric": rubric.name, "scale": [low, high],
               "judge": verdicts.rows[0]["judge"] if verdicts.rows else None,
               "method": verdicts.rows[0]["method"] if verdicts.rows else None,
               "models": stats.single_summary(verdicts.rows, low=low, high=high, resamples=cfg.bootstrap,
                                              confidence=cfg.confidence, seed=cfg.seed),
               "bootstrap": {"resamples": cfg.bootstrap, "confidence": cfg.confidence, "seed": cfg.seed}}
    return _finish(cfg, summary, "single")


def _grade_label(text: str, low: int, high: int) -> str | None:
    grade = parse_score(text, low, high)
    return None if grade is None else str(grade)


def _finish(cfg: JudgeOptions, summary: dict, kind: str) -> dict:
    from fastalign.feedback.chart import pairwise_chart, single_chart

    out_dir = Path(cfg.out_dir)
    write_json(out_dir / "summary.json", summary)
    (pairwise_chart if kind == "pairwise" else single_chart)(summary, out_dir / "chart.png")
    return summary
