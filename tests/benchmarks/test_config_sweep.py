"""benchmarks/config_sweep.py without a GPU: ``--dry-run`` compiles the candidates for sm_90a and writes the
table in the shape a GPU run writes it, which the launchers read; the GPU run itself refuses to start on CPU.

Two keys, two candidates each, to keep the compile cost to seconds; gpu_check.sh runs the full sweep timed."""
import json

import pytest
import torch

from fastalign.benchmarks import config_sweep
from fastalign.kernels import _launch

pytestmark = pytest.mark.compile


@pytest.fixture(scope="module")
def dry_run_table(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("configs")
    assert config_sweep.main(["--dry-run", "--keys", "gae,rl_loss", "--max-candidates", "2",
                              "--out-dir", str(out)]) == 0
    return out / "dry-run.json"


def test_dry_run_writes_the_table_shape(dry_run_table):
    doc = json.loads(dry_run_table.read_text())
    assert doc["format"] == 1 and doc["dry_run"] is True and doc["generated_by"] == "benchmarks/config_sweep.py"
    assert set(doc["machine"]) >= {"device", "versions", "date"}
    winners = doc["devices"][config_sweep.DRY_RUN_DEVICE]
    assert set(winners) == set(doc["candidates"]) == {"gae", "rl_loss"}
    for key, entries in doc["candidates"].items():
        assert len(entries) == 2
        assert [e["config"] for e in entries] == config_sweep.CANDIDATES[key][1][:2]
        for e in entries:
            assert e["ms"] is None  # nothing is timed without a GPU
            assert e["ok"], e  # every candidate compiles clean (no spills, shared memory fits)
            assert e["regs"] > 0 and e["spill_stores"] == 0 and e["smem"] <= 227 * 1024
        assert winners[key] == config_sweep.CANDIDATES[key][1][0]  # a dry run keeps the default


def test_launchers_read_a_sweep_table(dry_run_table, monkeypatch):
    monkeypatch.setenv(_launch.CONFIG_ENV, str(dry_run_table))
    monkeypatch.setattr(_launch, "device_name", lambda device: config_sweep.DRY_RUN_DEVICE)
    doc = json.loads(dry_run_table.read_text())
    winner = doc["devices"][config_sweep.DRY_RUN_DEVICE]["gae"]
    default = dict(BLOCK_B=8, BLOCK_T=64, num_warps=1)
    assert _launch.tuned_config(torch.device("cpu"), "gae", default) == winner


def test_gpu_sweep_needs_a_gpu_and_keys_are_checked():
    with pytest.raises(SystemExit):
        config_sweep.main(["--keys", "nope", "--dry-run"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            config_sweep.main(["--keys", "gae"])


def test_card_slug():
    assert config_sweep.card_slug("NVIDIA H200") == "h200"
    assert config_sweep.card_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
