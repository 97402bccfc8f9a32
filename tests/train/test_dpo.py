"""DPO: loss falls below log 2 and the implicit reward margin grows; fused equals unfused per step; every
loss type trains; LoRA with adapters disabled as the reference."""
import math

import pytest
import torch

from fastalign.train import dpo
from fastalign.train.config import DPOConfig


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    base = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / name), max_steps=6, batch_size=4,
                max_samples=4, learning_rate=2e-3, lr_scheduler="constant", max_length=64, progress=False,
                dtype="float32", beta=0.5)
    return DPOConfig(**{**base, **kw})


def test_dpo_improves_and_fused_matches_unfused(tmp_path, tiny_model_dir):
    fused = dpo.train(_cfg(tmp_path, tiny_model_dir, "fused"))
    plain = dpo.train(_cfg(tmp_path, tiny_model_dir, "plain", fused=False))
    f_loss = [h["loss"] for h in fused["history"]]
    assert abs(f_loss[0] - math.log(2)) < 1e-5  # the policy starts as its own reference
    assert f_loss[-1] < 0.6 and fused["history"][-1]["rewards/margins"] > 0
    torch.testing.assert_close(torch.tensor(f_loss), torch.tensor([h["loss"] for h in plain["history"]]),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss_type", ["ipo", "hinge", "robust", "simpo", "exo_pair", "apo_zero", "aot", "sft",
                                       "sigmoid,bco_pair,sft"])
def test_dpo_loss_types_train(tmp_path, tiny_model_dir, loss_type):
    kw = dict(label_smoothing={"robust": 0.1, "exo_pair": 1e-3}.get(loss_type, 0.0))
    if "," in loss_type:
        kw["loss_weights"] = [0.8, 0.2, 1.0]  # MPO
    out = dpo.train(_cfg(tmp_path, tiny_model_dir, loss_type.replace(",", "+"), loss_type=loss_type, max_steps=4, **kw))
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    if "," in loss_type:
        assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(out["history"][-1])


def test_dpo_combination_fused_matches_unfused(tmp_path, tiny_model_dir):
    kw = dict(loss_type=["ipo", "sigmoid", "sft", "aot_unpaired"], loss_weights=[0.5, 1.0, 0.2, 0.3], max_steps=3)
    runs = [dpo.train(_cfg(tmp_path, tiny_model_dir, f"mix{fused}", fused=fused, **kw))["history"]
            for fused in (True, False)]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in runs[0]]), torch.tensor([h["loss"] for h in runs[1]]),
                               rtol=1e-4, atol=1e-5)


def test_dpo_lora_reference_is_adapters_off(tmp_path, tiny_model_dir):
    pre = dpo.train(_cfg(tmp_path, tiny_model_dir, "pre", lora_r=8, learning_rate=1e-2, max_steps=4))
    live = dpo.train(_cfg(tmp_path, tiny_model_dir, "live", lora_r=8, learning_rate=1e-2, max_steps=4,
                          precompute_ref=False))
    losses = [h["loss"] for h in pre["history"]]
    assert losses[-1] < losses[0]
    # the reference scored once up front equals the adapters-off policy scored at every step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([h["loss"] for h in live["history"]]),
                               rtol=1e-5, atol=1e-6)
