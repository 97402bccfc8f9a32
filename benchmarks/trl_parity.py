"""Whole training steps, fastalign's trainer vs TRL 1.16's SFTTrainer / DPOTrainer, on CPU: the same tiny model, the
same data, the same hyper-parameters; step time, peak memory, and the per-step losses and DPO stats side by side.

    python -m benchmarks.trl_parity                       # SFT and DPO, 3 runs each, on the embedded tiny model
    python -m benchmarks.trl_parity --hidden-size 256 --layers 4 --steps 40 --repeats 3 --json out.json

Each run is a fresh process (``--worker``), so peak memory is that run's alone. The model is the embedded tiny
Llama (``fastalign.train.tiny``) saved to a temporary directory that both trainers load (TRL's DPOTrainer on CPU
needs a saved path). The data are the first ``--rows`` rows of the shipped addition task (``fastalign/data/demo``:
plain-string prompt-completion and preference rows, tokenized as plain text by both); one batch holds every row, so
every step sees the same batch in both trainers whatever their shuffling, and their losses are comparable step by
step. Settings: fp32, AdamW (lr 1e-4 SFT, 1e-5 DPO, betas 0.9/0.999, no weight decay), constant schedule, no
warmup, gradient clipping at 1.0, max_length 64, DPO sigmoid with beta 0.1 and the reference log-probs precomputed
(TRL's ``precompute_ref_log_probs=True``, fastalign's default), no checkpoints, logging every step.

Both processes run torch with ``--threads`` threads (default 1: steadier on a shared machine). Step time: the
median (and 20th percentile) interval between consecutive optimizer-step ends after ``--warmup`` steps (everything
a step costs: batch, forward, backward, update, logging; TRL's first steps also recompile its torch.compile'd
helpers), the median over ``--repeats`` runs of each, run alternately. Peak memory: the highest resident set size
sampled every 2 ms while the steps run, and that peak minus the resident size just before the first step (what
training adds on top of the loaded model and data). Not a test: numbers depend on the machine and its load; the
report prints both.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
MiB = 2 ** 20


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


class PeakRSS:
    """Samples the process's resident set size in a thread between start() and stop()."""

    def __init__(self, every_s: float = 0.002):
        self.every_s, self.peak, self.before = every_s, 0, 0
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> None:
        self.before = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------------------------- workers

def _rows(algo: str, n: int) -> list[dict]:
    from fastalign.train import data

    path = data.demo_files()["sft" if algo == "sft" else "preference"]
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    return [json.loads(line) for line in lines]


def run_fastalign(args, model_dir: str, out: str) -> dict:
    from fastalign.train import dpo, sft
    from fastalign.train.config import DPOConfig, SFTConfig
    from fastalign.train.loop import TrainLoop

    rows = _rows(args.algo, args.rows)
    data_file = Path(out) / "data.jsonl"
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ends, mem = [], PeakRSS()
    step = TrainLoop.step

    def timed_step(self, *a, **k):  # the trainer's own step, timed from outside
        if not ends:
            mem.start()
            ends.append(time.perf_counter())
        result = step(self, *a, **k)
        ends.append(time.perf_counter())
        return result

    TrainLoop.step = timed_step
    common = dict(model=model_dir, train_file=str(data_file), output_dir=str(Path(out) / "run"), dtype="float32",
                  max_steps=args.steps, batch_size=len(rows), max_length=64, max_prompt_length=64,
                  lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                  progress=False, device="cpu")
    if args.algo == "sft":
        result = sft.train(SFTConfig(learning_rate=1e-4, **common))
    else:
        result = dpo.train(DPOConfig(learning_rate=1e-5, beta=0.1, loss_type="sigmoid", precompute_ref=True, **common))
    mem.stop()
    keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    history = [{k: h[k] for k in keys if k in h} for h in result["history"]]
    return {"ends": ends[1:], "start": ends[0], "peak": mem.peak, "before": mem.before, "history": history}


def run_trl(args, model_dir: str, out: str) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    rows = _rows(args.algo, args.rows)
    ends, history, mem = [], [], PeakRSS()

    class Timer(TrainerCallback):
        def on_train_begin(self, *_, **__):
            pass

        def on_step_begin(self, *_, **__):
            if not ends:
                mem.start()
                ends.append(time.perf_counter())

        def on_step_end(self, *_, **__):
            ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **__):
            if logs and "loss" in logs:
                history.append({k: logs[k] for k in ("loss", "rewards/accuracies", "rewards/margins",
                                                     "logps/chosen") if k in logs})

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    common = dict(output_dir=str(Path(out) / "trl"), per_device_train_batch_size=len(rows), max_steps=args.steps,
                  lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, seed=0,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, fp16=False,
                  gradient_checkpointing=False,  # TRL's configs default to True (and to bf16), fastalign's to off
                  max_length=64, disable_tqdm=True, dataloader_num_workers=0,
                  model_init_kwargs={"dtype": "float32"})
    if args.algo == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model_dir, args=SFTConfig(learning_rate=1e-4, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()])
    else:
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model_dir, args=DPOConfig(learning_rate=1e-5, beta=0.1, loss_type=["sigmoid"],
                                                            precompute_ref_log_probs=True, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tokenizer, callbacks=[Timer()])
    trainer.train()
    mem.stop()
    return {"ends": ends[1:], "start": ends[0], "peak": mem.peak, "before": mem.before, "history": history}


def worker(args) -> None:
    import logging
    import warnings

    import torch

    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="fa-trl-parity-") as out:
        fn = run_fastalign if args.worker == "fastalign" else run_trl
        result = fn(args, args.model_dir, out)
    result["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------------- driver

def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_start": os.getloadavg()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "trl": trl_version, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d")}


def launch(which: str, algo: str, args, model_dir: str) -> dict:
    cmd = [sys.executable, "-m", __spec__.name if __spec__ else "benchmarks.trl_parity", "--worker", which,
           "--algo", algo, "--model-dir", model_dir, "--steps", str(args.steps), "--rows", str(args.rows),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{which} {algo} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def summarize(run: dict, warmup: int) -> dict:
    ends = [run["start"], *run["ends"]]
    intervals = [b - a for a, b in zip(ends, ends[1:])][warmup:]
    p20 = sorted(intervals)[len(intervals) // 5]
    return {"step_ms": 1e3 * statistics.median(intervals), "step_ms_p20": 1e3 * p20, "peak_mib": run["peak"] / MiB,
            "added_mib": (run["peak"] - run["before"]) / MiB, "history": run["history"], "threads": run["threads"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.trl_parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="sft,dpo", help="comma-separated: sft, dpo")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the step time (TRL's compiled "
                                                          "functions recompile over the first few shapes)")
    p.add_argument("--rows", type=int, default=32, help="data rows = the batch size (one batch per step)")
    p.add_argument("--repeats", type=int, default=3, help="runs per trainer, alternating; medians are reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads in both trainers' processes")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--json", default=None,
                   help="write the full results here (e.g. benchmarks/results/trl_parity/cpu-h64.json)")
    p.add_argument("--worker", choices=("fastalign", "trl"), help=argparse.SUPPRESS)
    p.add_argument("--algo", choices=("sft", "dpo"), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    from fastalign.train import tiny

    info = machine()
    report: dict = {"machine": info, "settings": vars(args), "results": {}}
    with tempfile.TemporaryDirectory(prefix="fa-trl-parity-model-") as tmp:
        model_dir = str(tiny.build_tiny_model_and_tokenizer(Path(tmp) / "model", hidden_size=args.hidden_size,
                                                              num_layers=args.layers,
                                                              intermediate_size=2 * args.hidden_size))
        for algo in args.algos.split(","):
            runs = {"fastalign": [], "trl": []}
            for _ in range(args.repeats):
                for which in ("fastalign", "trl"):
                    runs[which].append(summarize(launch(which, algo, args, model_dir), args.warmup))
            report["results"][algo] = runs
    info["load_avg_end"] = os.getloadavg()[0]

    print(f"# fastalign vs TRL {info['trl']} on {info['cpu']} ({info['cores']} cores, load {info['load_avg_start']:.1f}"
          f" -> {info['load_avg_end']:.1f}), torch {info['torch']} ({args.threads} threads), tiny Llama hidden "
          f"{args.hidden_size}, "
          f"{args.layers} layers, {args.rows} rows per step, {args.steps} steps, {args.repeats} runs each")
    print("| algorithm | trainer | step ms, median (p20) | peak RSS MiB | added by training MiB | step-1 loss |")
    print("|---|---|---|---|---|---|")
    for algo, runs in report["results"].items():
        med = {}
        for which, rs in runs.items():
            med[which] = {k: statistics.median(r[k] for r in rs)
                          for k in ("step_ms", "step_ms_p20", "peak_mib", "added_mib")}
            first = rs[0]["history"][0]
            print(f"| {algo} | {which} | {med[which]['step_ms']:.1f} ({med[which]['step_ms_p20']:.1f}) | "
                  f"{med[which]['peak_mib']:.0f} | "
                  f"{med[which]['added_mib']:.1f} | {first['loss']:.6f} |")
        print(f"| {algo} | TRL / fastalign | {med['trl']['step_ms'] / med['fastalign']['step_ms']:.2f}x "
              f"({med['trl']['step_ms_p20'] / med['fastalign']['step_ms_p20']:.2f}x) | "
              f"{med['trl']['peak_mib'] / med['fastalign']['peak_mib']:.2f}x | | |")
        fa_h, trl_h = runs["fastalign"][0]["history"], runs["trl"][0]["history"]
        diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(fa_h, trl_h)]
        print(f"  {algo}: max |loss difference| over {len(diffs)} steps: {max(diffs):.2e}")
        if algo == "dpo":
            keys = ("rewards/accuracies", "rewards/margins", "logps/chosen")
            print("  dpo step 1: " + ", ".join(f"{k} fastalign {fa_h[0][k]:.6g} / TRL {trl_h[0][k]:.6g}"
                                                for k in keys))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
