"""Configs: defaults < YAML < flags, help for every field, clear errors."""
import dataclasses
import re

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


@pytest.mark.parametrize("cls,field,value,message", [
    (SFTConfig, "learning_rate", -1e-5, "learning_rate must be > 0"),
    (SFTConfig, "learning_rate", float("nan"), "learning_rate must be a finite number"),
    (SFTConfig, "learning_rate", float("inf"), "learning_rate must be a finite number"),
    (SFTConfig, "weight_decay", -0.1, "weight_decay must be >= 0"),
    (SFTConfig, "adam_beta2", 1.0, "adam_beta2 must lie in [0, 1)"),
    (SFTConfig, "max_grad_norm", 0.0, "max_grad_norm must be > 0"),
    (SFTConfig, "warmup_steps", -1, "warmup_steps must be >= 0"),
    (SFTConfig, "save_steps", -2, "save_steps must be >= 0"),
    (SFTConfig, "max_samples", 0, "max_samples must be >= 1"),
    (SFTConfig, "lora_dropout", 1.0, "lora_dropout must lie in [0, 1)"),
    (DPOConfig, "beta", 0.0, "beta must be > 0"),
    (DPOConfig, "label_smoothing", 0.6, "label_smoothing must lie in [0, 0.5]"),
    (RMConfig, "center_rewards_coef", -1.0, "center_rewards_coef must be >= 0"),
])
def test_values_are_range_checked_with_the_field_named(cls, field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        cls(**{field: value})


def test_dpo_option_combinations():
    with pytest.raises(ValueError, match=r"label_smoothing must be 0 for loss_type='ipo'"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\) for loss_type='robust'"):
        DPOConfig(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="simpo_gamma only applies to loss_type='simpo'"):
        DPOConfig(simpo_gamma=0.5)
    assert DPOConfig(loss_type="simpo", simpo_gamma=0.5, label_smoothing=0.5).simpo_gamma == 0.5
    # combinations: eps is fine when some listed type reads it; the loss op's own rules run too
    assert DPOConfig(loss_type="ipo,robust", label_smoothing=0.1).loss_type == ["ipo", "robust"]
    with pytest.raises(ValueError, match=r"label_smoothing must be 0 for loss_type=\['hinge', 'bco_pair'\]"):
        DPOConfig(loss_type="hinge,bco_pair", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"DPOConfig: label_smoothing must lie in \(0, 1\) for loss_type='exo_pair'"):
        DPOConfig(loss_type="exo_pair")
    with pytest.raises(ValueError, match="DPOConfig: loss_type='simpo' is reference-free and cannot be combined"):
        DPOConfig(loss_type="simpo,sigmoid")
    with pytest.raises(ValueError, match="discopop_tau only applies"):
        DPOConfig(discopop_tau=0.2)


def test_resume_and_overwrite_exclude_each_other():
    with pytest.raises(ValueError, match="resume and overwrite"):
        SFTConfig(resume=True, overwrite=True)


def test_flags_run_the_algorithm_checks(tmp_path):
    """Flags and YAML values go through the config's own checks (__post_init__), not only the type checks."""
    from fastalign.train.grpo import GRPOConfig

    with pytest.raises(ValueError, match="GRPOConfig: num_generations must be >= 1, got 0"):
        parse_config(GRPOConfig, ["--num-generations", "0"])
    path = tmp_path / "c.yaml"
    path.write_text("beta: 0\n")
    with pytest.raises(ValueError, match="beta must be > 0"):
        parse_config(DPOConfig, ["--config", str(path)])


def test_broken_or_missing_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("beta: [0.1\nloss_type: ipo\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}: invalid YAML")):
        parse_config(DPOConfig, ["--config", str(path)])
    with pytest.raises(ValueError, match="config file .*nope.yaml.* does not exist"):
        parse_config(DPOConfig, ["--config", str(tmp_path / "nope.yaml")])
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a YAML mapping"):
        parse_config(DPOConfig, ["--config", str(path)])
