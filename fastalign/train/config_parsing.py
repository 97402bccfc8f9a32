"""Trainer configs as typed dataclasses: the :func:`option` field, type coercion and validation, YAML files and
command-line flags. Works on any dataclass of :func:`option` fields (``fastalign.train.config`` holds them).

Every field carries its help text in ``metadata["help"]`` (and allowed values in ``metadata["choices"]``), so
``fastalign train <algo> --help`` documents every field. Precedence: dataclass default < YAML < command line::

    cfg = parse_config(DPOConfig, ["--config", "c.yaml", "--beta", "0.05"])
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def option(default: Any = dataclasses.MISSING, help: str = "", choices: tuple | None = None, **kwargs):
    """A dataclass field with help text (and allowed values) for the CLI and the docs."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kwargs)
    return dataclasses.field(default=default, metadata=meta, **kwargs)


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
    cfg.__post_init__()  # validate() plus the config's own cross-field checks, now with the flags applied
    return cfg


def parse_config(cls, argv: list[str] | None = None, prog: str | None = None):
    """Parse ``argv`` (``--config c.yaml --beta 0.05 ...``) into ``cls``."""
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip())
    add_arguments(parser, cls)
    return config_from_namespace(cls, parser.parse_args(argv))
