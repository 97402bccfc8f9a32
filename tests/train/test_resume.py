"""An interrupted and resumed run equals an uninterrupted one bit for bit (weights, losses, data order)."""
import pytest
import torch
from safetensors.torch import load_file

from fastalign.train import dpo, metrics, sft
from fastalign.train.config import DPOConfig, SFTConfig


class Interrupt(Exception):
    pass


def _interrupt_at(monkeypatch, step):
    original = metrics.MetricsLogger.log

    def log(self, s, values):
        if s == step:
            raise Interrupt(f"killed at step {s}")
        original(self, s, values)

    monkeypatch.setattr(metrics.MetricsLogger, "log", log)


def _weights(run):
    final = run["final_dir"]
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(str(final / name))


@pytest.mark.parametrize("algo,cls,lora_r", [(sft, SFTConfig, 0), (dpo, DPOConfig, 0), (sft, SFTConfig, 4)])
def test_resume_is_bit_for_bit(tmp_path, tiny_model_dir, monkeypatch, algo, cls, lora_r):
    # shuffled data over several epochs, a warmup + cosine schedule, Adam moments: everything must be restored
    kw = dict(model=str(tiny_model_dir), max_steps=6, batch_size=3, max_samples=7, learning_rate=2e-3,
              warmup_steps=2, save_steps=2, max_length=64, progress=False, dtype="float32", seed=1, lora_r=lora_r)
    full = algo.train(cls(output_dir=str(tmp_path / "full"), **kw))
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)  # dies after the step-4 checkpoint, in the middle of step 5's bookkeeping
        with pytest.raises(Interrupt):
            algo.train(cls(output_dir=str(tmp_path / "cut"), **kw))
    resumed = algo.train(cls(output_dir=str(tmp_path / "cut"), resume=True, **kw))
    assert [h["step"] for h in resumed["history"]] == [5, 6]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"][4:]]
    a, b = _weights(full), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = metrics.read_metrics(tmp_path / "cut")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows] == [r["loss"] for r in metrics.read_metrics(tmp_path / "full")]
