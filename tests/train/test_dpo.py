"""DPO: loss falls below log 2 and the implicit reward margin grows; fused equals unfused per step; every
loss type trains; LoRA with adapters disabled as the reference."""
import json
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


def test_first_steps_match_trl_dpo_trainer(tmp_path, tiny_model_dir):
    # TRL 1.16's DPOTrainer and ours on the same saved model and data (plain-string rows: plain text in both), one
    # batch of every row, reference log-probs precomputed: the same loss and stats at each step. At step 1 the policy
    # is its reference: TRL's margins are exactly 0 and its accuracy 0; ours differ from 0 by rounding (the fused
    # policy pass vs the reference pass) and must count as ties too.
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from fastalign.train import data

    rows = [json.loads(line) for line in data.SHIPPED["preference"].read_text().splitlines()[:12]]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = []

    class Keep(TrainerCallback):
        def on_log(self, args, state, control, **kw):
            if "loss" in (kw.get("logs") or {}):
                logs.append(kw["logs"])

    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows), max_steps=3,
                         learning_rate=1e-3, lr_scheduler_type="constant", beta=0.1, precompute_ref_log_probs=True,
                         logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_length=64,
                         bf16=False, gradient_checkpointing=False,  # TRL's defaults: bf16 autocast, checkpointing
                         disable_tqdm=True, model_init_kwargs={"dtype": "float32"})
    trl.DPOTrainer(model=str(tiny_model_dir), args=args, train_dataset=Dataset.from_list(rows),
                   processing_class=AutoTokenizer.from_pretrained(tiny_model_dir), callbacks=[Keep()]).train()
    ours = dpo.train(_cfg(tmp_path, tiny_model_dir, "ours", train_file=str(path), max_samples=None,
                          batch_size=len(rows), max_steps=3, learning_rate=1e-3, beta=0.1, max_grad_norm=1.0))
    assert len(logs) == 3
    assert logs[0]["rewards/accuracies"] == 0.0 and ours["history"][0]["rewards/accuracies"] == 0.0
    for theirs, mine in zip(logs, ours["history"]):
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-5)
        for key in ("rewards/margins", "rewards/chosen", "logps/chosen", "logps/rejected"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-4), key
        assert mine["rewards/accuracies"] == theirs["rewards/accuracies"]
