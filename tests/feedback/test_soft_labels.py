"""Soft preference labels in the trainers: per-pair cDPO and the soft Bradley-Terry loss against float64 hand
computations, and the `label` field wired through `train dpo` / `train rm` (fused equals unfused; label 1 equals
the plain losses)."""
import json
import math

import pytest
import torch

import fastalign as fa
from fastalign.train import data, dpo, rm
from fastalign.train.config import DPOConfig, RMConfig


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def test_soft_dpo_loss_hand_computation_and_gradient():
    g = torch.Generator().manual_seed(0)
    B, beta = 7, 0.3
    pc, pr, rc, rr = (-torch.rand(B, generator=g, dtype=torch.float64) * 20 for _ in range(4))
    label = torch.rand(B, generator=g, dtype=torch.float64)
    pc.requires_grad_()
    loss = dpo.soft_dpo_loss(pc, pr, rc, rr, label, beta=beta)
    # by hand, per pair: u = beta * ((pc - rc) - (pr - rr)), l = -p log sig(u) - (1 - p) log sig(-u)
    expected, grad = 0.0, []
    for b in range(B):
        u = beta * ((pc[b].item() - rc[b].item()) - (pr[b].item() - rr[b].item()))
        p = label[b].item()
        expected += (-p * _log_sigmoid(u) - (1 - p) * _log_sigmoid(-u)) / B
        grad.append(beta * (1 / (1 + math.exp(-u)) - p) / B)  # dl/du = sig(u) - p, du/dpc = beta
    assert loss.item() == pytest.approx(expected, rel=1e-13, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(pc.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)


def test_soft_dpo_loss_with_a_constant_label_is_cdpo():
    g = torch.Generator().manual_seed(1)
    args = [-torch.rand(5, generator=g, dtype=torch.float64) * 10 for _ in range(4)]
    for eps in (0.0, 0.1, 0.35):
        want, _ = fa.dpo_loss(*args, beta=0.5, loss_type="sigmoid", label_smoothing=eps)
        got = dpo.soft_dpo_loss(*args, torch.full((5,), 1 - eps, dtype=torch.float64), beta=0.5)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-15)


def test_soft_reward_loss_hand_computation():
    g = torch.Generator().manual_seed(2)
    chosen, rejected = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(2))
    label = torch.tensor([1.0, 0.9, 0.75, 0.6, 0.5, 0.2], dtype=torch.float64)
    got = rm.soft_reward_loss(chosen, rejected, label, center_rewards_coef=0.01)
    expected = sum(-p * _log_sigmoid(d) - (1 - p) * _log_sigmoid(-d)
                   for p, d in zip(label.tolist(), (chosen - rejected).tolist())) / 6
    expected += 0.01 * ((chosen + rejected) ** 2).mean().item()
    assert got.item() == pytest.approx(expected, rel=1e-13)
    plain, _ = fa.reward_loss(chosen, rejected)
    torch.testing.assert_close(rm.soft_reward_loss(chosen, rejected, torch.ones(6, dtype=torch.float64)), plain)


def _prefs(tmp_path, name, labels):
    rows = [json.loads(x) for x in data.SHIPPED["preference"].read_text().splitlines()[:8]]
    path = tmp_path / name
    with open(path, "w") as fh:
        for row, label in zip(rows, labels):
            fh.write(json.dumps({**row, **({"label": label} if label is not None else {})}) + "\n")
    return str(path)


def _dpo(tmp_path, tiny_model_dir, name, train_file, **kw):
    cfg = DPOConfig(model=str(tiny_model_dir), train_file=train_file, output_dir=str(tmp_path / name), max_steps=3,
                    batch_size=4, learning_rate=2e-3, lr_scheduler="constant", max_length=48, progress=False,
                    dtype="float32", beta=0.5, **kw)
    return [h["loss"] for h in dpo.train(cfg)["history"]]


def test_dpo_trains_on_soft_labels(tmp_path, tiny_model_dir):
    plain = _dpo(tmp_path, tiny_model_dir, "plain", _prefs(tmp_path, "plain.jsonl", [None] * 8))
    ones = _dpo(tmp_path, tiny_model_dir, "ones", _prefs(tmp_path, "ones.jsonl", [1.0] * 8))
    torch.testing.assert_close(torch.tensor(ones), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    soft = _prefs(tmp_path, "soft.jsonl", [0.9, 0.6, None, 0.75, 1.0, 0.55, 0.8, 0.7])  # a missing one counts as 1
    fused = _dpo(tmp_path, tiny_model_dir, "fused", soft)
    unfused = _dpo(tmp_path, tiny_model_dir, "unfused", soft, fused=False)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(unfused), rtol=1e-4, atol=1e-5)
    assert abs(fused[0] - math.log(2)) < 1e-5 and fused != plain  # u = 0 at the start; then the labels matter
    with pytest.raises(data.DataError, match="need loss_type sigmoid and label_smoothing 0"):
        _dpo(tmp_path, tiny_model_dir, "ipo", soft, loss_type="ipo")
    with pytest.raises(data.DataError, match="need loss_type sigmoid and label_smoothing 0"):
        _dpo(tmp_path, tiny_model_dir, "eps", soft, label_smoothing=0.1)


def test_rm_trains_on_soft_labels(tmp_path, tiny_model_dir):
    def run(name, train_file, **kw):
        cfg = RMConfig(model=str(tiny_model_dir), train_file=train_file, output_dir=str(tmp_path / name),
                       max_steps=3, batch_size=4, learning_rate=2e-3, lr_scheduler="constant", max_length=48,
                       progress=False, dtype="float32", **kw)
        return [h["loss"] for h in rm.train(cfg)["history"]]

    plain = run("plain", _prefs(tmp_path, "plain.jsonl", [None] * 8))
    ones = run("ones", _prefs(tmp_path, "ones.jsonl", [1.0] * 8))
    torch.testing.assert_close(torch.tensor(ones), torch.tensor(plain), rtol=1e-5, atol=1e-6)
    soft = run("soft", _prefs(tmp_path, "soft.jsonl", [0.9, 0.6, 0.7, 0.75, 1.0, 0.55, 0.8, 0.7]))
    assert all(math.isfinite(x) for x in soft) and soft != plain
    with pytest.raises(data.DataError, match="margin_column does not combine"):
        run("margin", _prefs(tmp_path, "soft.jsonl", [0.9] * 8), margin_column="label")
