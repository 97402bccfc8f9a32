"""SIGKILL at each stage of a checkpoint save and of the final save, in a real `fastalign train` process; the
resume verifies what is on disk, falls back to the newest whole checkpoint, and ends bit for bit where an
uninterrupted run ends. The kill comes from checkpoint.fault_point (FASTALIGN_TEST_KILL_AT=stage@step)."""
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastalign.train import checkpoint, metrics, sft
from fastalign.train.config import SFTConfig

SETTINGS = dict(max_steps=6, batch_size=3, max_samples=7, learning_rate=2e-3, warmup_steps=2, save_steps=2,
                max_length=64, dtype="float32", seed=1, progress=False)


def _flags(settings: dict) -> list[str]:
    out = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        out += [flag] if value is True else [f"--no-{key.replace('_', '-')}"] if value is False else [flag, str(value)]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    result = sft.train(SFTConfig(model=str(tiny_model_dir), output_dir=str(out), **SETTINGS))
    return result, load_file(str(result["final_dir"] / "model.safetensors"))


# (stage, step it is armed for, the step the resume continues from)
KILLS = [("tmp-created", 4, 2), ("state-written", 4, 2), ("manifest-written", 4, 2), ("complete-written", 4, 2),
         ("renamed", 4, 4), ("final-written", "final", 6), ("final-sealed", "final", 6)]


@pytest.mark.parametrize("stage,at,resumed_from", KILLS, ids=[k[0] for k in KILLS])
def test_sigkill_during_a_save_then_resume(tmp_path, tiny_model_dir, uninterrupted, stage, at, resumed_from):
    full, full_weights = uninterrupted
    out = tmp_path / "run"
    env = {**os.environ, checkpoint.KILL_ENV: f"{stage}@{at}", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastalign.cli", "train", "sft", "--model", str(tiny_model_dir),
                           "--output-dir", str(out), *_flags(SETTINGS)], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (out / "final" / "COMPLETE").exists()

    resumed = sft.train(SFTConfig(model=str(tiny_model_dir), output_dir=str(out), resume=True, **SETTINGS))
    steps = list(range(resumed_from + 1, SETTINGS["max_steps"] + 1))
    assert [h["step"] for h in resumed["history"]] == steps
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][resumed_from:]]
    weights = load_file(str(resumed["final_dir"] / "model.safetensors"))
    assert weights.keys() == full_weights.keys() and all(torch.equal(weights[k], full_weights[k]) for k in weights)
    rows = metrics.read_metrics(out)
    assert [r["loss"] for r in rows] == [h["loss"] for h in full["history"]]
    assert not list(out.glob(".tmp-*")) and not list((out / "checkpoints").glob(".tmp-*"))
