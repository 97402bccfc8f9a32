"""AI preference labels (RLAIF; Bai et al. 2022 section 4, Lee et al. 2023): ``fastalign cai label``.

For each prompt the policy samples ``num_responses`` responses; every pair of distinct ones is shown to the
feedback model with ``principles_per_pair`` principles drawn for it (the ensemble), each in both orders. Per
principle k, with P_k(first) the verdict probability of the response shown first:

    p_fwd_k = P_k(first | i shown first)          p_bwd_k = 1 - P_k(first | j shown first)
    p_k = (p_fwd_k + p_bwd_k) / 2                 p(i > j) = mean_k p_k      (order-averaged, then ensembled)

The chosen response is the one with p > 1/2 and ``label`` = p(chosen) in (1/2, 1]; ``label_parts`` holds every
principle's p_k and its two orders. A pair is *consistent* when the two orders, each averaged over the ensemble,
prefer the same response; ``--inconsistent mark`` keeps the others with ``consistent: false``, ``drop`` moves
them to ``OUT.rejected.jsonl``. P_k comes from the log-probs of the choice tokens (``label_method logprobs``) or
from parsed generated text (one-hot; unparseable twice = a failed vote, left out of the mean; a pair with no
vote left is rejected as ``unparseable``). Exact ties (p = 1/2) are rejected as ``tie``.

Output rows are what ``fastalign train dpo|rm`` read: ``prompt``, ``chosen``, ``rejected``, and ``label``, which
the trainers use as a soft label. Resuming, batching and seeding work as in :mod:`fastalign.feedback.revise`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from itertools import combinations

from fastalign.feedback.config import LabelConfig
from fastalign.feedback.constitution import Constitution, load_constitution
from fastalign.feedback.engine import TextModel, load_text_model
from fastalign.feedback.io import FeedbackError, Journal, load_prompts, normalize, sidecar, where, write_json
from fastalign.feedback.prompts import comparison_messages, derive_seed, parse_choice, sample_principles
from fastalign.feedback.revise import DEFAULT_PROMPTS
from fastalign.feedback.verdicts import ask, resolve_method

log = logging.getLogger("fastalign.feedback")
REASONS = ("identical_responses", "unparseable", "tie", "inconsistent", "low_label")


@dataclass
class Vote:
    """One principle's verdict on a pair (i, j), from both orders; None where no verdict could be read."""

    principle: str
    p_forward: float | None  # P(i better), i shown first
    p_backward: float | None  # P(i better), i shown second


def _side(p: float) -> int:
    return (p > 0.5) - (p < 0.5)


def aggregate(votes: list[Vote]) -> dict | None:
    """The order-averaged ensemble label of a pair (formulas in the module docstring), or None without a
    complete vote. Returns ``{"p": p(i > j), "consistent": bool, "votes": [...]}``."""
    valid = [v for v in votes if v.p_forward is not None and v.p_backward is not None]
    if not valid:
        return None
    forward = sum(v.p_forward for v in valid) / len(valid)
    backward = sum(v.p_backward for v in valid) / len(valid)
    return {"p": (forward + backward) / 2, "consistent": _side(forward) == _side(backward), "votes": votes}


def _parts(votes: list[Vote], i_is_chosen: bool) -> list[dict]:
    """Per-principle parts as probabilities of the chosen response."""
    out = []
    for v in votes:
        if v.p_forward is None or v.p_backward is None:
            out.append({"principle": v.principle, "p": None, "p_chosen_first": None, "p_chosen_second": None,
                        "consistent": None})
            continue
        first, second = (v.p_forward, v.p_backward) if i_is_chosen else (1 - v.p_backward, 1 - v.p_forward)
        out.append({"principle": v.principle, "p": (first + second) / 2, "p_chosen_first": first,
                    "p_chosen_second": second, "consistent": _side(first) == _side(second)})
    return out


def label(cfg: LabelConfig, *, feedback: TextModel | None = None, policy: TextModel | None = None) -> dict:
    """Run the stage (resuming whatever ``cfg.out`` already holds); returns the summary it writes."""
    constitution = load_constitution(cfg.constitution).subset(cfg.principles)
    if cfg.principles_per_pair > len(constitution.principles):
        raise FeedbackError(f"principles_per_pair {cfg.principles_per_pair} is more than the "
                            f"{len(constitution.principles)} principles of {constitution.path}")
    rows, duplicate_prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS, max_rows=cfg.max_rows)
    out, rejected = Journal(cfg.out), Journal(sidecar(cfg.out, "rejected.jsonl"))
    done = out.values("prompt_id") | rejected.values("prompt_id")
    pending = [r for r in rows if r["id"] not in done]
    log.info("cai label: %d prompts (%d duplicates dropped), %d already done, %d to go", len(rows),
             duplicate_prompts, len(rows) - len(pending), len(pending))
    method = None
    if pending:
        feedback = feedback or load_text_model(cfg.model, **cfg.load_options())
        if policy is None:
            policy = feedback if cfg.policy in (None, cfg.model) and cfg.policy_base_url is None else \
                load_text_model(cfg.policy or cfg.model, **cfg.load_options(policy=True))
        example = comparison_messages(constitution, pending[0]["prompt"], "", "", constitution.principles[0],
                                      few_shot=cfg.few_shot)
        method = resolve_method(feedback, cfg.label_method, example, constitution.choices)
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        keep, drop = [], []
        for record, reason in label_batch(policy, feedback, constitution, batch, cfg, method):
            (keep if reason is None else drop).append(record if reason is None else {**record, "reason": reason})
        out.append(keep)  # the training rows first: a kill between the two appends loses bookkeeping only
        rejected.append(drop)
        log.info("cai label: %d/%d prompts (%d pairs kept in this batch)", start + len(batch), len(pending),
                 len(keep))
    labels = [r["label"] for r in out.rows]
    summary = {
        "stage": "cai label", "out": str(cfg.out), "prompts": str(cfg.prompts or DEFAULT_PROMPTS),
        "unique_prompts": len(rows), "duplicate_prompts": duplicate_prompts,
        "done_before": len(rows) - len(pending), "processed": len(pending), "kept_pairs": len(out.rows),
        "kept_inconsistent": sum(not r["consistent"] for r in out.rows),
        "rejected": {r: sum(x["reason"] == r for x in rejected.rows) for r in REASONS},
        "failed_votes": sum(p["p"] is None for r in out.rows + rejected.rows for p in r.get("label_parts", [])),
        "label_mean": sum(labels) / len(labels) if labels else None,
        "label_method": method, "truncated_prompts": (feedback.truncated_prompts if feedback is not None else 0),
        "torn_bytes_cut": out.torn_bytes + rejected.torn_bytes,
        "policy": policy.name if policy is not None else None,
        "feedback_model": feedback.name if feedback is not None else None, "constitution": constitution.name,
        "num_responses": cfg.num_responses, "principles_per_pair": cfg.principles_per_pair,
        "sampling": asdict(cfg.sampling()), "seed": cfg.seed,
    }
    write_json(sidecar(cfg.out, "summary.json"), summary)
    return summary


def label_batch(policy: TextModel, feedback: TextModel, constitution: Constitution, batch: list[dict],
                cfg: LabelConfig, method: str) -> list[tuple[dict, str | None]]:
    """(record, rejection reason or None) for every pair judged in one batch of prompt rows."""
    n, k = cfg.num_responses, cfg.principles_per_pair
    ids = [r["id"] for r in batch]
    sampling = cfg.sampling()
    gens = policy.answer([r["prompt"] for r in batch for _ in range(n)], sampling,
                         where=[w for w in where(cfg.prompts or DEFAULT_PROMPTS, batch) for _ in range(n)],
                         seed=derive_seed(cfg.seed, "responses", *ids))
    meta = {"policy": policy.name, "feedback_model": feedback.name, "constitution": constitution.name,
            "label_method": method, "sampling": asdict(sampling), "seed": cfg.seed}
    results, jobs, queries = [], [], []  # jobs: (row, responses, pairs, principles per pair)
    for b, row in enumerate(batch):
        responses = gens[b * n:(b + 1) * n]
        unique, seen = [], set()  # the first of each distinct response
        for i, g in enumerate(responses):
            if normalize(g.text) not in seen:
                seen.add(normalize(g.text))
                unique.append(i)
        if len(unique) < 2:
            results.append(({"prompt_id": row["id"], "prompt": row["prompt"],
                             "responses": [g.text for g in responses], **meta}, "identical_responses"))
            continue
        pairs = list(combinations(unique, 2))
        drawn = [sample_principles(constitution, k, cfg.seed, row["id"], i, j) for i, j in pairs]
        jobs.append((row, responses, pairs, drawn))
        for (i, j), principles in zip(pairs, drawn):
            for p in principles:  # forward (i first), then backward (j first)
                queries.append(comparison_messages(constitution, row["prompt"], responses[i].text,
                                                   responses[j].text, p, few_shot=cfg.few_shot))
                queries.append(comparison_messages(constitution, row["prompt"], responses[j].text,
                                                   responses[i].text, p, few_shot=cfg.few_shot))
    labels = constitution.choices
    verdicts = ask(feedback, queries, labels, method=method, parse=lambda t: parse_choice(t, labels),
                   max_new_tokens=cfg.verdict_max_new_tokens, retry_temperature=cfg.retry_temperature,
                   seed=derive_seed(cfg.seed, "verdicts", *ids))
    cursor = 0
    for row, responses, pairs, drawn in jobs:
        judged = []
        for (i, j), principles in zip(pairs, drawn):
            votes = []
            for p in principles:
                fwd, bwd = verdicts[cursor], verdicts[cursor + 1]
                cursor += 2
                votes.append(Vote(p.id, fwd.probs[0] if fwd.probs else None,
                                  1 - bwd.probs[0] if bwd.probs else None))
            judged.append(((i, j), votes, aggregate(votes)))
        if cfg.pairing == "extremes" and len(judged) > 1:
            judged = [_extremes(judged, len(responses))]
        for (i, j), votes, agg in judged:
            results.append(_record(row, responses, i, j, votes, agg, cfg, meta))
    return results


def _extremes(judged: list, n: int):
    """The judged pair of the response with the highest mean win probability and the one with the lowest."""
    wins: dict[int, list[float]] = {}
    for (i, j), _, agg in judged:
        if agg is not None:
            wins.setdefault(i, []).append(agg["p"])
            wins.setdefault(j, []).append(1 - agg["p"])
    if len(wins) < 2:
        return judged[0]
    mean = {r: sum(v) / len(v) for r, v in wins.items()}
    best = max(sorted(mean), key=lambda r: mean[r])
    worst = min(sorted(mean), key=lambda r: mean[r])
    pair = (min(best, worst), max(best, worst))
    return next(item for item in judged if item[0] == pair)


def _record(row, responses, i, j, votes, agg, cfg: LabelConfig, meta: dict) -> tuple[dict, str | None]:
    base = {"id": f"{row['id']}:{i}-{j}", "prompt_id": row["id"], "prompt": row["prompt"]}
    extra = {"category": row["category"]} if "category" in row else {}
    if agg is None:
        return {**base, "responses": [responses[i].text, responses[j].text], **extra,
                "label_parts": _parts(votes, True), **meta}, "unparseable"
    i_chosen = agg["p"] >= 0.5
    c, r = (i, j) if i_chosen else (j, i)
    record = {**base, "chosen": responses[c].text, "rejected": responses[r].text,
              "label": agg["p"] if i_chosen else 1 - agg["p"], "consistent": agg["consistent"], **extra,
              "label_parts": _parts(votes, i_chosen), "chosen_index": c, "rejected_index": r,
              "truncated": {"chosen": responses[c].truncated, "rejected": responses[r].truncated}, **meta}
    if agg["p"] == 0.5:
        return record, "tie"
    if not agg["consistent"] and cfg.inconsistent == "drop":
        return record, "inconsistent"
    if record["label"] < cfg.min_label:
        return record, "low_label"
    return record, None
