"""``fastalign demo``: SFT -> DPO -> GRPO on the embedded tiny model and the shipped addition task, offline.

    fastalign demo                 # the full demo (a few minutes on 2 CPU cores)
    fastalign demo --quick         # a smoke run of every stage (seconds): what the tests run

Builds a tiny Llama-style model from a config and the tiny tokenizer (``tiny.build_tiny_model_and_tokenizer``,
no download), then trains it with the library's own trainers on ``fastalign/data/demo/`` (``task.py``):
SFT on ``sft.jsonl``, DPO on ``preference.jsonl`` (correct vs plausible wrong sums), GRPO on ``rl.jsonl`` with the
exact-match reward. Held-out accuracy (greedy decoding, exact match on ``heldout.jsonl``, problems no stage
trains on) is printed before and after each stage. SFT is deliberately short, so that the preference and RL
stages have something left to fix.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fastalign.train import data, dpo, grpo, models, sft, task, tiny
from fastalign.train.config import DPOConfig, SFTConfig


ANSWER_TOKENS = 6  # completion budget: a sum up to 198 is at most 3 digit tokens + EOS
SEQUENCE_LIMITS = dict(max_length=64, max_prompt_length=48)  # tokens; a chat-templated task row is under 20
# the task's rows are plain strings; the demo trains and evaluates them as chat turns of the tiny template
CHAT_TEMPLATE = "on"
SFT_WARMUP_STEPS = 30  # at most a quarter of the SFT steps


@dataclass(frozen=True)
class DemoPlan:
    """Model size and the budget of each stage."""

    hidden_size: int = 64
    num_layers: int = 2
    intermediate_size: int = 256
    sft_steps: int = 800
    sft_batch: int = 64
    sft_lr: float = 3e-3
    dpo_steps: int = 40
    dpo_batch: int = 32
    dpo_pairs: int = 1280
    dpo_lr: float = 1e-4
    dpo_beta: float = 0.1
    grpo_steps: int = 100
    grpo_prompts: int = 16
    grpo_group: int = 8
    grpo_lr: float = 1e-4
    heldout: int = 500


FULL = DemoPlan()
QUICK = DemoPlan(hidden_size=32, intermediate_size=64, sft_steps=6, sft_batch=16, dpo_steps=2, dpo_batch=8,
                 dpo_pairs=32, grpo_steps=2, grpo_prompts=4, grpo_group=4, heldout=32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="fastalign demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke test, no accuracy gain)")
    p.add_argument("--output-dir", "--output_dir", default=None,
                   help="where the stage runs go (default: a temporary directory, removed at the end)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model init, data order and sampling")
    p.add_argument("--overwrite", action="store_true",
                   help="stage runs already in --output-dir are moved aside (without it they are refused)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return p.parse_args(argv)


def _accuracy(path: Path, rows: list[dict]) -> float:
    tokenizer = models.load_tokenizer(path)
    model = models.load_model(path, dtype="float32")
    return task.evaluate_accuracy(model, tokenizer, rows, max_new_tokens=ANSWER_TOKENS, chat_template=CHAT_TEMPLATE)


def run(plan: DemoPlan, out: Path, *, seed: int = 0, progress: bool = True, overwrite: bool = False,
        echo=print) -> list[dict]:
    """Build, evaluate, SFT, DPO, GRPO, evaluating after each stage. Returns one row per stage:
    ``{"stage", "accuracy", "seconds", "model"}`` (the first row is the untrained model)."""
    files = data.demo_files()
    heldout = list(data.load_rows(files["heldout"], "rl", max_samples=plan.heldout))
    common = dict(seed=seed, progress=progress, dtype="float32", overwrite=overwrite, chat_template=CHAT_TEMPLATE,
                  **SEQUENCE_LIMITS)
    results: list[dict] = []

    def record(stage: str, path: Path, started: float) -> None:
        seconds = time.perf_counter() - started
        acc = _accuracy(path, heldout)
        before = results[-1]["accuracy"] if results else None
        results.append({"stage": stage, "accuracy": acc, "seconds": seconds, "model": str(path)})
        change = f" (was {before:.1%}, {acc - before:+.1%})" if before is not None else ""
        echo(f"[demo] {stage:<5} held-out accuracy {acc:6.1%}{change}  [{seconds:.1f}s]")

    t = time.perf_counter()
    base = tiny.build_tiny_model_and_tokenizer(out / "base", hidden_size=plan.hidden_size,
                                                 num_layers=plan.num_layers,
                                                 intermediate_size=plan.intermediate_size, seed=seed)
    record("init", base, t)

    t = time.perf_counter()
    run_sft = sft.train(SFTConfig(model=str(base), train_file=str(files["sft"]), output_dir=str(out / "sft"),
                                  max_steps=plan.sft_steps, batch_size=plan.sft_batch, learning_rate=plan.sft_lr,
                                  warmup_steps=min(SFT_WARMUP_STEPS, plan.sft_steps // 4), lr_scheduler="constant",
                                  **common))
    record("sft", run_sft["final_dir"], t)

    t = time.perf_counter()
    run_dpo = dpo.train(DPOConfig(model=str(run_sft["final_dir"]), train_file=str(files["preference"]),
                                  output_dir=str(out / "dpo"), max_steps=plan.dpo_steps, batch_size=plan.dpo_batch,
                                  max_samples=plan.dpo_pairs, learning_rate=plan.dpo_lr, beta=plan.dpo_beta,
                                  lr_scheduler="constant", **common))
    record("dpo", run_dpo["final_dir"], t)

    t = time.perf_counter()
    run_grpo = grpo.train(grpo.GRPOConfig(
        model=str(run_dpo["final_dir"]), train_file=str(files["rl"]), output_dir=str(out / "grpo"),
        max_steps=plan.grpo_steps, batch_size=plan.grpo_prompts, num_generations=plan.grpo_group,
        max_new_tokens=ANSWER_TOKENS, learning_rate=plan.grpo_lr, lr_scheduler="constant",
        reward_funcs=["exact_match"], **common))
    record("grpo", run_grpo["final_dir"], t)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # save_pretrained's per-shard bars would drown the stage lines
    started = time.perf_counter()
    print(f"[demo] tiny Llama (hidden {plan.hidden_size}, {plan.num_layers} layers) on {data.DEMO_DATA_DIR}: "
          f"SFT {plan.sft_steps} steps -> DPO {plan.dpo_steps} -> GRPO {plan.grpo_steps}; held-out accuracy = "
          f"greedy exact match on {plan.heldout} unseen problems", flush=True)
    with tempfile.TemporaryDirectory(prefix="fastalign-demo-") as tmp:
        out = Path(args.output_dir) if args.output_dir else Path(tmp)
        results = run(plan, out, seed=args.seed, progress=args.progress, overwrite=args.overwrite)
    first, last = results[0]["accuracy"], results[-1]["accuracy"]
    print("[demo] stage  held-out accuracy   seconds")
    for r in results:
        print(f"[demo] {r['stage']:<5}  {r['accuracy']:>16.1%}   {r['seconds']:7.1f}")
    print(f"[demo] {first:.1%} -> {last:.1%} in {time.perf_counter() - started:.0f}s total", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
