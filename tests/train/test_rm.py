"""Reward model: the Bradley-Terry loss goes down and preference accuracy goes up on a fixed batch."""
import json

import torch

from fastalign.train import models, rm
from fastalign.train.config import RMConfig


def _cfg(tmp_path, tiny_model_dir, name, **kw):
    base = dict(model=str(tiny_model_dir), output_dir=str(tmp_path / name), max_steps=8, batch_size=8,
                max_samples=8, learning_rate=3e-3, lr_scheduler="constant", max_length=64, progress=False,
                dtype="float32")
    return RMConfig(**{**base, **kw})


def test_rm_learns_preferences_and_reference_path_agrees(tmp_path, tiny_model_dir, tiny_tokenizer):
    out = rm.train(_cfg(tmp_path, tiny_model_dir, "fused"))
    plain = rm.train(_cfg(tmp_path, tiny_model_dir, "plain", fused=False))
    losses = [h["loss"] for h in out["history"]]
    assert losses[-1] < 0.5 * losses[0]
    assert out["history"][-1]["accuracy"] >= 0.75 > out["history"][0]["accuracy"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor([h["loss"] for h in plain["history"]]))
    scorer = models.load_model(out["final_dir"], kind="score", dtype="float32")
    enc = tiny_tokenizer(["What is 1 + 1? 2", "What is 1 + 1? 7"], return_tensors="pt", padding=True)
    assert models.sequence_scores(scorer, enc["input_ids"], enc["attention_mask"]).shape == (2,)


def test_rm_margin_column(tmp_path, tiny_model_dir):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "What is 2 + 2?", "chosen": "4", "rejected": str(r), "gap": 1.0})
                            + "\n" for r in (3, 5, 6, 7)))
    out = rm.train(_cfg(tmp_path, tiny_model_dir, "margin", train_file=str(path), margin_column="gap",
                        batch_size=4, max_steps=3))
    # with a margin of 1 the loss at equal rewards is -log sigmoid(-1) = 1.313
    assert abs(out["history"][0]["loss"] - 1.3133) < 0.05
