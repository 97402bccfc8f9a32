"""Training configs: one dataclass per algorithm on a shared base, loadable from YAML, overridable from flags.

Every field carries its help text in ``metadata["help"]`` (and allowed values in ``metadata["choices"]``), so
``fastalign train <algo> --help`` documents every field. Precedence: dataclass default < YAML < command line::

    cfg = parse_config(DPOConfig, ["--config", "c.yaml", "--beta", "0.05"])

An RL algorithm adds its own config in its own module: ``@dataclass class GRPOConfig(TrainConfig): ...`` with
:func:`option` fields; everything here (YAML, flags, help, validation) works on it unchanged.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kwargs):
    """A dataclass field with help text (and allowed values) for the CLI and the docs."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


@dataclass
class TrainConfig:
    """Fields every algorithm shares."""

    # model
    model: str | None = option(None, "local checkpoint directory (transformers, safetensors); none: the "
                                     "embedded tiny Llama built on the fly")
    dtype: str = option("auto", "weights dtype; auto = bf16 on a GPU with bf16, else fp32",
                        choices=("auto", "float32", "bfloat16", "float16"))
    attn_implementation: str = option("auto", "attention kernel; auto = flash_attention_2 if installed on a GPU, "
                                              "else sdpa", choices=("auto", "sdpa", "eager", "flash_attention_2"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    lora_r: int = option(0, "LoRA rank (peft); 0 trains all weights")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.0, "LoRA dropout")
    lora_target_modules: list[str] = option(["q_proj", "k_proj", "v_proj", "o_proj"], "modules LoRA adapts")
    fused: bool = option(True, "compute log-probs/losses from hidden states with fastalign's fused ops (no "
                               "[B, T, V] logits); --no-fused runs the plain-logits reference path")
    backend: str = option("auto", "fastalign op backend", choices=("auto", "torch", "triton", "cuda", "cpp"))
    # data
    train_file: str | None = option(None, "local .jsonl/.json/.parquet training data; none: the shipped tiny "
                                          "data set for this algorithm")
    max_samples: int | None = option(None, "use at most this many training rows")
    max_length: int = option(512, "max tokens per sequence (prompt + completion); longer rows are truncated "
                                  "(counted in the log)")
    max_prompt_length: int = option(256, "max prompt tokens (prompts are truncated from the left)")
    chat_template: str = option("auto", "wrap prompts in the tokenizer's chat template: auto = when it has one",
                                choices=("auto", "on", "off"))
    # optimisation
    seed: int = option(0, "seed for init, data order and sampling")
    max_steps: int = option(100, "optimizer steps")
    batch_size: int = option(8, "sequences (or pairs, or prompts) per micro-batch, per process")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-5, "peak learning rate (AdamW)")
    lr_scheduler: str = option("cosine", "learning-rate schedule after warmup",
                               choices=("cosine", "linear", "constant"))
    warmup_steps: int = option(0, "linear warmup steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this; none: no clipping")
    max_bad_steps: int = option(10, "abort after this many steps skipped for a NaN/inf loss or gradient")
    # runtime, checkpoints, logging
    device: str = option("auto", "auto = cuda when available (the local rank's GPU under torchrun), else cpu")
    parallelism: str = option("auto", "under torchrun: auto = FSDP2 on GPUs, DDP on CPU; or force fsdp / ddp",
                              choices=("auto", "fsdp", "ddp"))
    output_dir: str = option("runs/run", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    save_steps: int = option(0, "save a checkpoint every N steps (0: only at the end)")
    save_total_limit: int = option(2, "keep at most this many step checkpoints (0: keep all)")
    resume: bool = option(False, "continue from the newest checkpoint in output_dir/checkpoints, bit-for-bit")
    progress: bool = option(True, "show a progress bar")
    # monitors: a warning is logged when a value crosses its threshold (none: never)
    warn_kl: float | None = option(10.0, "warn when KL to the reference (nats per sequence) exceeds this")
    warn_entropy: float | None = option(0.05, "warn when mean token entropy falls below this (collapse)")
    warn_clip_frac: float | None = option(0.3, "warn when the PPO/GRPO clip fraction exceeds this")
    warn_reward_length_corr: float | None = option(0.8, "warn when |corr(reward, response length)| exceeds this")

    def __post_init__(self):
        validate(self)


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: token-level NLL on completions (or whole conversations)."""

    output_dir: str = option("runs/sft", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    learning_rate: float = option(2e-5, "peak learning rate (AdamW)")
    packing: bool = option(False, "pack several examples into each max_length row (attention stays causal "
                                  "across the packed examples, as TRL's default packing does)")
    completion_only_loss: bool = option(True, "train only on completion/assistant tokens; off: on every token")


@dataclass
class RMConfig(TrainConfig):
    """Reward model: Bradley-Terry on a scalar head over chosen/rejected pairs."""

    output_dir: str = option("runs/rm", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    margin_column: str | None = option(None, "data column with a per-pair margin for the loss")
    center_rewards_coef: float = option(0.0, "add coef * mean((r_chosen + r_rejected)^2) to keep rewards centred")


@dataclass
class DPOConfig(TrainConfig):
    """Direct preference optimisation against a frozen reference model."""

    output_dir: str = option("runs/dpo", "run directory: config.yaml, metrics.jsonl, checkpoints/, final/")
    learning_rate: float = option(1e-6, "peak learning rate (AdamW)")
    beta: float = option(0.1, "DPO temperature beta (strength of the KL constraint)")
    loss_type: str = option("sigmoid", "preference loss (fa.dpo_loss): sigmoid = DPO, robust = rDPO, hinge = SLiC, "
                                       "ipo = IPO, simpo = SimPO (reference-free)",
                            choices=("sigmoid", "robust", "hinge", "ipo", "simpo"))
    label_smoothing: float = option(0.0, "label smoothing eps (sigmoid: cDPO, robust, simpo)")
    simpo_gamma: float = option(0.0, "SimPO target reward margin gamma (simpo only)")
    ref_model: str | None = option(None, "reference checkpoint; none: the initial policy (with LoRA: adapters "
                                         "disabled)")
    precompute_ref: bool = option(True, "score the reference once in a no-grad pass before training (the "
                                         "reference is then freed); off: score it every step")


# --------------------------------------------------------------------------------------------- type handling

def _unwrap_optional(tp) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, tp, value, where: str):
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"{where}: {name} may not be null")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return value.lower() in ("true", "1", "yes", "on")
            raise ValueError(value)
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(value)
            return str(value)
        if typing.get_origin(base) is list:
            (item,) = typing.get_args(base)
            items = value.split(",") if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            return [_coerce(name, item, v, where) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {name} must be {_type_name(tp)}, got {value!r}") from None
    raise TypeError(f"unsupported config field type {tp} for {name}")


def _type_name(tp) -> str:
    base, optional = _unwrap_optional(tp)
    name = getattr(base, "__name__", str(base))
    if typing.get_origin(base) is list:
        name = f"a comma-separated list of {typing.get_args(base)[0].__name__}"
    return name + (" or none" if optional else "")


def validate(cfg) -> None:
    """Check types and allowed values of every field; errors name the field."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = _coerce(f.name, hints[f.name], getattr(cfg, f.name), type(cfg).__name__)
        setattr(cfg, f.name, value)
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ValueError(f"{type(cfg).__name__}: {f.name} must be one of {choices}, got {value!r}")
    for name in ("max_steps", "batch_size", "grad_accum", "max_length"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            raise ValueError(f"{type(cfg).__name__}: {name} must be >= 1, got {getattr(cfg, name)}")


# ---------------------------------------------------------------------------------------------- YAML, flags

def from_dict(cls, data: dict, where: str = "config"):
    """Build ``cls`` from a mapping; unknown keys are an error that lists the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of field: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown} for {cls.__name__}; valid: {sorted(names)}")
    hints = _hints(cls)
    return cls(**{k: _coerce(k, hints[k], v, where) for k, v in data.items()})


def load_yaml(path: str | Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping of field: value")
    return data


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field (``--learning-rate`` and ``--learning_rate``), defaults suppressed so only flags
    given on the command line override the YAML."""
    parser.add_argument("--config", metavar="YAML", help="YAML file of field: value (flags override it)")
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"}, key=len, reverse=True)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        base, _ = _unwrap_optional(hints[f.name])
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(*flags, dest=f.name, default=argparse.SUPPRESS, metavar=_metavar(f, hints),
                                help=help_text)


def _metavar(f, hints) -> str:
    if f.metadata.get("choices"):
        return "{" + ",".join(f.metadata["choices"]) + "}"
    base, optional = _unwrap_optional(hints[f.name])
    name = "LIST" if typing.get_origin(base) is list else getattr(base, "__name__", "X").upper()
    return name


def config_from_namespace(cls, ns: argparse.Namespace):
    """Defaults < ``ns.config`` YAML < the flags present in ``ns``."""
    data = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    flags = {k: v for k, v in vars(ns).items() if k in {f.name for f in dataclasses.fields(cls)}}
    cfg = from_dict(cls, data, where=str(ns.config) if getattr(ns, "config", None) else "config")
    hints = _hints(cls)
    for k, v in flags.items():
        setattr(cfg, k, _coerce(k, hints[k], v, f"--{k.replace('_', '-')}"))
    validate(cfg)
    return cfg


def parse_config(cls, argv: list[str] | None = None, prog: str | None = None):
    """Parse ``argv`` (``--config c.yaml --beta 0.05 ...``) into ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    return config_from_namespace(cls, parser.parse_args(argv))
