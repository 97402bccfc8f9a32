"""Configs: defaults < YAML < flags, help for every field, clear errors."""
import dataclasses

import pytest

from fastalign.train.config import DPOConfig, RMConfig, SFTConfig, TrainConfig
from fastalign.train.config_parsing import from_dict, parse_config, save_yaml


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig, RMConfig, DPOConfig])
def test_every_field_has_help(cls):
    for f in dataclasses.fields(cls):
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0.2\nlearning_rate: 3.0e-6\nloss_type: ipo\nlora_target_modules: [q_proj]\n")
    cfg = parse_config(DPOConfig, ["--config", str(path), "--beta", "0.05", "--no-fused", "--max-steps", "7"])
    assert cfg.beta == 0.05 and cfg.learning_rate == 3e-6 and cfg.loss_type == ["ipo"]
    assert cfg.fused is False and cfg.max_steps == 7 and cfg.lora_target_modules == ["q_proj"]
    assert cfg.label_smoothing == 0.0  # untouched default
    cfg = parse_config(DPOConfig, ["--max_grad_norm", "none", "--lora-target-modules", "q_proj,v_proj"])
    assert cfg.max_grad_norm is None and cfg.lora_target_modules == ["q_proj", "v_proj"]


def test_loss_type_lists(tmp_path):
    # TRL's list loss_type with loss_weights: comma-separated flags, YAML lists, Python lists; a name alone is a list
    cfg = parse_config(DPOConfig, ["--loss-type", "sigmoid,bco_pair,sft", "--loss-weights", "0.8,0.2,1"])
    assert cfg.loss_type == ["sigmoid", "bco_pair", "sft"] and cfg.loss_weights == [0.8, 0.2, 1.0]
    path = tmp_path / "c.yaml"
    path.write_text("loss_type: [apo_zero, sft]\nloss_weights: [1, 0.5]\n")
    assert parse_config(DPOConfig, ["--config", str(path)]).loss_type == ["apo_zero", "sft"]
    assert DPOConfig(loss_type="discopop").loss_type == ["discopop"]


def test_round_trip(tmp_path):
    cfg = SFTConfig(packing=True, max_steps=3)
    save_yaml(cfg, tmp_path / "c.yaml")
    assert parse_config(SFTConfig, ["--config", str(tmp_path / "c.yaml")]) == cfg


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown field.*betta"):
        from_dict(DPOConfig, {"betta": 1.0})
    with pytest.raises(ValueError, match="loss_type must be one of"):
        parse_config(DPOConfig, ["--loss-type", "nope"])
    with pytest.raises(ValueError, match="loss_weights has 1 values for 2 loss types"):
        parse_config(DPOConfig, ["--loss-type", "sigmoid,sft", "--loss-weights", "0.5"])
    with pytest.raises(ValueError, match="beta must be float"):
        parse_config(DPOConfig, ["--beta", "abc"])
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        SFTConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_steps must be int"):
        from_dict(SFTConfig, {"max_steps": 1.5})
    with pytest.raises(SystemExit):  # argparse rejects unknown flags
        parse_config(SFTConfig, ["--beta", "0.1"])
