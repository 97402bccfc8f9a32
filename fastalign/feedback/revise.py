"""Constitutional AI, supervised stage (Bai et al. 2022, section 3): critique and revise, then fine-tune on the
revisions. ``fastalign cai revise``.

    prompt -> initial response -> R rounds of (principle drawn, critique, revision) -> final revision

Each prompt becomes one SFT row ``{"id", "prompt", "completion": final revision, "provenance": {...}}`` in
``OUT`` (``fastalign train sft --train-file OUT`` reads it as is), or, when a filter drops it, a row with a
``reason`` in ``OUT.rejected.jsonl``. Filters (``--filters``): ``empty`` final revision, ``truncated`` (hit
max_new_tokens), ``unchanged`` (equal to the initial response up to whitespace and case), ``duplicate`` (equal
to a revision already kept). ``OUT.summary.json`` counts all of it.

Work goes in batches of ``batch_size`` prompts through the generation backend, and each batch is appended and
fsynced before the next starts: a rerun skips every prompt already in either file, so a killed run loses at most
the batch in flight. Draws are seeded by (seed, stage, round, row ids), not by what ran before, so the rows of a
resumed run are those an uninterrupted run writes.
"""
from __future__ import annotations

import logging
from dataclasses import asdict

from fastalign.feedback.config import ReviseConfig
from fastalign.feedback.constitution import DATA_DIR, load_constitution
from fastalign.feedback.engine import TextModel, load_text_model
from fastalign.feedback.io import Journal, load_prompts, normalize, sidecar, where, write_json
from fastalign.feedback.prompts import (critique_messages, derive_seed, revision_messages,
                                        sample_principles)

log = logging.getLogger("fastalign.feedback")
DEFAULT_PROMPTS = DATA_DIR / "prompts.jsonl"
REASONS = ("empty", "truncated", "unchanged", "duplicate")


def revise(cfg: ReviseConfig, *, model: TextModel | None = None) -> dict:
    """Run the stage (resuming whatever ``cfg.out`` already holds); returns the summary it writes."""
    constitution = load_constitution(cfg.constitution).subset(cfg.principles)
    rows, duplicate_prompts = load_prompts(cfg.prompts or DEFAULT_PROMPTS, max_rows=cfg.max_rows)
    out, rejected = Journal(cfg.out), Journal(sidecar(cfg.out, "rejected.jsonl"))
    done = out.values("id") | rejected.values("id")
    pending = [r for r in rows if r["id"] not in done]
    log.info("cai revise: %d prompts (%d duplicates dropped), %d already done, %d to go", len(rows),
             duplicate_prompts, len(rows) - len(pending), len(pending))
    if pending and model is None:
        model = load_text_model(cfg.model, **cfg.load_options())
    kept_texts = {normalize(r["completion"]) for r in out.rows}
    for start in range(0, len(pending), cfg.batch_size):
        batch = pending[start:start + cfg.batch_size]
        keep, drop = [], []
        for row in revise_batch(model, constitution, batch, cfg):
            reason = _reject_reason(row, cfg.filters, kept_texts)
            if reason is None:
                kept_texts.add(normalize(row["completion"]))
                keep.append(row)
            else:
                drop.append({**row, "reason": reason})
        out.append(keep)
        rejected.append(drop)
        log.info("cai revise: %d/%d prompts (%d kept in this batch)", start + len(batch), len(pending), len(keep))
    summary = {
        "stage": "cai revise", "out": str(cfg.out), "prompts": str(cfg.prompts or DEFAULT_PROMPTS),
        "unique_prompts": len(rows), "duplicate_prompts": duplicate_prompts,
        "done_before": len(rows) - len(pending), "processed": len(pending),
        "kept": len(out.rows), "rejected": {r: sum(x["reason"] == r for x in rejected.rows) for r in REASONS},
        "truncated_prompts": model.truncated_prompts if model is not None else 0,
        "torn_bytes_cut": out.torn_bytes + rejected.torn_bytes,
        "model": model.name if model is not None else None, "constitution": constitution.name,
        "rounds": cfg.rounds, "sampling": asdict(cfg.sampling()), "seed": cfg.seed,
    }
    write_json(sidecar(cfg.out, "summary.json"), summary)
    return summary


def revise_batch(model: TextModel, constitution, batch: list[dict], cfg: ReviseConfig) -> list[dict]:
    """The initial responses and R critique-revision rounds of one batch of prompt rows, as output rows."""
    sampling = cfg.sampling()
    ids = [r["id"] for r in batch]
    initial = model.answer([r["prompt"] for r in batch], sampling, where=where(cfg.prompts or DEFAULT_PROMPTS, batch),
                           seed=derive_seed(cfg.seed, "initial", *ids))
    current = [g.text for g in initial]
    truncated = [g.truncated for g in initial]
    rounds: list[list[dict]] = [[] for _ in batch]
    for k in range(cfg.rounds):
        principles = [sample_principles(constitution, 1, cfg.seed, r["id"], k)[0] for r in batch]
        critiques = model.generate(
            [critique_messages(constitution, r["prompt"], cur, p, few_shot=cfg.few_shot)
             for r, cur, p in zip(batch, current, principles)], sampling,
            seed=derive_seed(cfg.seed, "critique", k, *ids))
        revisions = model.generate(
            [revision_messages(constitution, r["prompt"], cur, p, c.text, few_shot=cfg.few_shot)
             for r, cur, p, c in zip(batch, current, principles, critiques)], sampling,
            seed=derive_seed(cfg.seed, "revision", k, *ids))
        for i, (p, c, rev) in enumerate(zip(principles, critiques, revisions)):
            rounds[i].append({"principle": p.id, "critique": c.text, "critique_truncated": c.truncated,
                              "revision": rev.text, "revision_truncated": rev.truncated})
            current[i], truncated[i] = rev.text, rev.truncated
    out = []
    for i, row in enumerate(batch):
        provenance = {"initial": initial[i].text, "initial_truncated": initial[i].truncated, "rounds": rounds[i],
                      "principles": [r["principle"] for r in rounds[i]], "final_truncated": truncated[i],
                      "model": model.name, "constitution": constitution.name, "sampling": asdict(sampling),
                      "seed": cfg.seed, "few_shot": cfg.few_shot}
        extra = {"category": row["category"]} if "category" in row else {}
        out.append({"id": row["id"], "prompt": row["prompt"], "completion": current[i], **extra,
                    "provenance": provenance})
    return out


def _reject_reason(row: dict, filters: list[str], kept_texts: set[str]) -> str | None:
    """The first filter that drops ``row`` (in the order of REASONS), or None."""
    final = row["completion"]
    checks = {
        "empty": not final.strip(),
        "truncated": row["provenance"]["final_truncated"],
        "unchanged": normalize(final) == normalize(row["provenance"]["initial"]),
        "duplicate": normalize(final) in kept_texts,
    }
    for reason in REASONS:
        if reason in filters and checks[reason]:
            return reason
    return None
