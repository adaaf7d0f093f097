"""The ``weightdiff`` command line.

``fit`` / ``validate`` / ``test`` are LightningCLI subcommands driven by ``configs/*.yaml``;
``zoo``, ``export``, ``sample``, ``evaluate`` and ``demo`` are plain subcommands. User errors
(:class:`~weightdiff.errors.WeightDiffError`) print one line on stderr and exit with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from weightdiff import __version__
from weightdiff.errors import WeightDiffError

LIGHTNING_COMMANDS = ("fit", "validate", "test")
EXIT_USER_ERROR = 2


def _quiet_environment() -> None:
    """Offline defaults: no hub downloads, and wandb never blocks on a missing network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def _cmd_export(args: argparse.Namespace) -> int:
    from weightdiff.training.export import export_checkpoint

    out = export_checkpoint(args.ckpt, args.out)
    print(f"exported generator to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightdiff",
        description="Generate neural-network weights (LoRA adapters, small CNNs) with a conditional diffusion "
                    "transformer.")
    parser.add_argument("--version", action="version", version=f"weightdiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name}: `weightdiff {name} --config configs/<x>.yaml` "
                                  f"(see `weightdiff {name} --help`)", add_help=False)

    from weightdiff.zoo.commands import add_zoo_parser

    add_zoo_parser(sub)

    p = sub.add_parser("export", help="export EMA weights + layout + config from a Lightning checkpoint")
    p.add_argument("--ckpt", required=True, help="Lightning checkpoint written by `weightdiff fit`")
    p.add_argument("--out", required=True, help="output directory (the artefact `sample` loads)")
    p.set_defaults(func=_cmd_export)

    from weightdiff.commands import add_pipeline_parsers

    add_pipeline_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_environment()
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            from weightdiff.training.lightning_cli import run_lightning_cli  # lightning costs seconds to import

            run_lightning_cli(argv if argv != sys.argv[1:] else None)
            return 0
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0
        return int(args.func(args) or 0)
    except WeightDiffError as exc:
        print(f"weightdiff: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("weightdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
