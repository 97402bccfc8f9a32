"""The ``fastalign`` command: ``train <algo>``, ``demo``, ``plot``, ``env``, ``ext``, ``bench``, ``cai``, ``judge``.

    fastalign train sft                                   # embedded tiny model + shipped tiny data
    fastalign train dpo --config c.yaml --beta 0.05       # YAML, then flags override it
    torchrun --nproc_per_node 2 -m fastalign.cli train sft --model DIR --train-file data.jsonl
    fastalign plot runs/sft                               # PNG curves from metrics.jsonl

A failure caused by the input (a bad flag, config value, YAML or data file, run directory) prints one line,
``fastalign: error: ...`` naming the file, field or flag, and exits 2; a run that cannot go on (no checkpoint passes
verification, too many NaN steps, NaN weights) prints one line and exits 1. ``--debug`` (anywhere on the command
line) or ``FASTALIGN_DEBUG=1`` shows the traceback instead.

Algorithms register in :data:`ALGORITHMS` (name -> (module, config class, train function)) and are imported
only when used, so ``fastalign --help`` stays fast and a missing optional module only disables its command.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

# name -> (module, config class name, train function name); the train function takes the config
ALGORITHMS: dict[str, tuple[str, str, str]] = {
    "sft": ("fastalign.train.sft", "SFTConfig", "train"),
    "rm": ("fastalign.train.rm", "RMConfig", "train"),
    "dpo": ("fastalign.train.dpo", "DPOConfig", "train"),
    "grpo": ("fastalign.train.grpo", "GRPOConfig", "train"),
    "ppo": ("fastalign.train.ppo", "PPOConfig", "train"),
}


# exceptions a run raises when it cannot go on, by name (their modules load torch: not imported for --help)
RUN_FAILURES = ("CheckpointError", "NonFiniteWeights", "TooManyBadSteps")


class Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other input error."""

    hint: str | None = None  # the command whose --help to point at, when not this parser's own

    def error(self, message: str):
        self.exit(2, f"fastalign: error: {message} (see `{self.hint or self.prog} --help`)\n")


def register_algorithm(name: str, module: str, config: str, train: str = "train") -> None:
    """Make ``fastalign train NAME`` run ``module.train(module.config(...))``."""
    ALGORITHMS[name] = (module, config, train)


def load_algorithm(name: str):
    """(config class, train function) of a registered algorithm; a clear error if it cannot be imported."""
    if name not in ALGORITHMS:
        raise SystemExit(f"fastalign train: unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    module_name, config_name, train_name = ALGORITHMS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"fastalign train {name}: {module_name} is not available ({exc})") from None
    return getattr(module, config_name), getattr(module, train_name)


def _available() -> dict[str, tuple]:
    found = {}
    for name in ALGORITHMS:
        try:
            found[name] = load_algorithm(name)
        except SystemExit:
            continue
    return found


def _fields_help(available: dict) -> str:
    """Every config field of every algorithm, for ``fastalign train --help``."""
    from fastalign.train.config import TrainConfig

    base = {f.name for f in dataclasses.fields(TrainConfig)}
    lines = ["shared fields (every algorithm; flag --name or --name-with-dashes, or a YAML key):"]
    lines += [_field_line(f) for f in dataclasses.fields(TrainConfig)]
    for name, (cls, _) in available.items():
        own = [f for f in dataclasses.fields(cls)
               if f.name not in base or _default(cls, f.name) != _default(TrainConfig, f.name)]
        if own:
            lines.append(f"\n{name} ({cls.__name__}; `fastalign train {name} --help` for its full list):")
            lines += [_field_line(f) for f in own]
    return "\n".join(lines)


def _default(cls, name):
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _field_line(f) -> str:
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    choices = f.metadata.get("choices")
    extra = f" {{{','.join(choices)}}}" if choices else ""
    return f"  {f.name}{extra} = {default!r}: {f.metadata.get('help', '')}"


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for ``argv`` (without the program name): algorithm modules are imported only when ``argv``
    names one (or asks for ``train --help``)."""
    from fastalign import __version__
    from fastalign.train.config_parsing import add_arguments

    parser = Parser(prog="fastalign", description="Fused ops and a minimal alignment trainer.")
    parser.add_argument("--version", action="version", version=f"fastalign {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the traceback (or FASTALIGN_DEBUG=1); "
                                                           "accepted anywhere on the command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    available = _available() if argv[:1] == ["train"] and argv[1:2] in (["-h"], ["--help"]) else {}
    train = sub.add_parser(
        "train", help="train a model: " + ", ".join(ALGORITHMS), formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with one algorithm. With no --model, the embedded tiny model is built and used; with no "
                    "--train-file, the shipped tiny data set.",
        epilog=_fields_help(available) if available else None,
    )
    algos = train.add_subparsers(dest="algorithm", metavar="ALGORITHM")
    for name in ALGORITHMS:
        cls = available.get(name, (None,))[0] if available else None
        if cls is None and argv[:2] == ["train", name]:
            try:
                cls = load_algorithm(name)[0]
            except SystemExit as exc:
                print(exc, file=sys.stderr)
        p = algos.add_parser(name, help=f"{name} (see --help)", description=(cls.__doc__ or "").strip() if cls else None)
        if cls is not None:
            add_arguments(p, cls)
        else:  # parsed lazily after import, so unrelated commands stay fast
            p.add_argument("rest", nargs=argparse.REMAINDER)
    demo = sub.add_parser("demo", help="SFT -> DPO -> GRPO on the embedded tiny model and task", add_help=False)
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    plot = sub.add_parser("plot", help="write PNG curves of RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    sub.add_parser("env", help="print the backends present, and why the others are not")
    ext = sub.add_parser("ext", help="build the optional compiled extension fastalign._C, or show its status",
                         add_help=False)
    ext.add_argument("rest", nargs=argparse.REMAINDER)
    bench = sub.add_parser("bench", help="run the benchmarks (fastalign.benchmarks)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    from fastalign.feedback import cli as feedback_cli  # `cai` and `judge`

    feedback_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FASTALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        return _main(argv)
    except Exception as exc:
        code = _exit_code(exc)
        if debug or code is None:  # asked for, or a bug: the traceback
            raise
        print(f"fastalign: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return code


def _exit_code(exc: Exception) -> int | None:
    """2 for an error in the user's input, 1 for a run that cannot go on, None for anything else (a bug)."""
    import yaml

    if isinstance(exc, (ValueError, OSError, yaml.YAMLError)):
        return 2
    if any(cls.__name__ in RUN_FAILURES for cls in type(exc).__mro__):
        return 1
    return None


def _main(argv: list[str]) -> int:
    if argv[:1] in (["demo"], ["bench"], ["ext"]):  # they parse their own flags (argparse's REMAINDER drops a leading -x)
        return _delegate(argv[0], argv[1:])
    parser = build_parser(argv)
    if argv[:1] == ["train"] and argv[1:2] and argv[1] in ALGORITHMS:  # leftover flags are reported at the top
        parser.hint = f"fastalign train {argv[1]}"
    args = parser.parse_args(argv)
    if args.command == "train":
        if not args.algorithm:
            parser.parse_args(["train", "--help"])
            return 2
        from fastalign.train.config_parsing import add_arguments, config_from_namespace

        cls, train_fn = load_algorithm(args.algorithm)
        sub = parser
        if hasattr(args, "rest"):  # the algorithm was imported lazily: parse its flags now
            sub = Parser(prog=f"fastalign train {args.algorithm}")
            add_arguments(sub, cls)
            args = sub.parse_args(args.rest)
        train_fn(config_from_namespace(cls, args))  # a bad value or file: ValueError, one line from main
        return 0
    if args.command == "plot":
        from fastalign.train.metrics import setup_logging
        from fastalign.train.plot import plot_run

        setup_logging(is_main=True)  # a skipped torn line is reported like the trainers' warnings
        for path in plot_run(args.run_dir, args.out):
            print(path)
        return 0
    if args.command == "env":
        from fastalign.env import env_report

        print(env_report())
        return 0
    if args.command in ("cai", "judge"):
        from fastalign.feedback import cli as feedback_cli

        return feedback_cli.run(args)
    parser.print_help()
    return 0


def _delegate(command: str, rest: list[str]) -> int:
    """``demo`` / ``bench`` / ``ext`` -> the ``main(rest)`` of fastalign.train.demo, fastalign.benchmarks.__main__,
    fastalign.ext."""
    module = {"demo": "fastalign.train.demo", "bench": "fastalign.benchmarks.__main__", "ext": "fastalign.ext"}[command]
    try:
        target = importlib.import_module(module)
    except ImportError as exc:
        raise SystemExit(f"fastalign {command}: {module} is not available ({exc})") from None
    return target.main(rest) or 0


if __name__ == "__main__":
    sys.exit(main())
