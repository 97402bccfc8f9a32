"""torchrun with 2 gloo processes (DDP, and FSDP2 which also runs on CPU) == one process on the same global
batch: per-step losses and the saved (for FSDP2: gathered) weights."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastalign import cli
from fastalign.train import metrics


def _train(tmp_path, tiny_model_dir, name, procs, batch_size, parallelism="auto"):
    """Run SFT for 3 steps (grad_accum 2) in this process (procs=1) or under torchrun; returns the run dir."""
    args = ["train", "sft", "--parallelism", parallelism, "--model", str(tiny_model_dir), "--output-dir", str(tmp_path / name),
            "--max-steps", "3", "--batch-size", str(batch_size), "--grad-accum", "2", "--max-samples", "12",
            "--learning-rate", "3e-3", "--max-length", "64", "--dtype", "float32", "--device", "cpu", "--no-progress"]
    if procs == 1:  # in this process, through the same CLI entry point
        assert cli.main(args) == 0
        return tmp_path / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "fastalign.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / name


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_model_dir):
    return _train(tmp_path_factory.mktemp("single"), tiny_model_dir, "one", 1, batch_size=4)


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, tiny_model_dir, one_process, parallelism):
    one = one_process
    two = _train(tmp_path, tiny_model_dir, "two", 2, batch_size=2, parallelism=parallelism)
    loss_one = [r["loss"] for r in metrics.read_metrics(one)]
    loss_two = [r["loss"] for r in metrics.read_metrics(two)]
    assert len(loss_one) == 3
    torch.testing.assert_close(torch.tensor(loss_two), torch.tensor(loss_one), rtol=1e-5, atol=1e-6)
    w_one = load_file(str(one / "final" / "model.safetensors"))
    w_two = load_file(str(two / "final" / "model.safetensors"))
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    assert w_one.keys() == w_two.keys()
    assert any(not torch.equal(w_one[k], init[k]) for k in w_one)  # training changed the weights
    for k in w_one:
        # Adam divides by sqrt(v): summation-order noise in near-zero gradients shows up at ~lr * 1e-3
        torch.testing.assert_close(w_two[k], w_one[k], rtol=1e-4, atol=2e-5)
