"""The ``weightdiff`` command line.

``fit`` and ``validate`` are LightningCLI subcommands driven by ``configs/*.yaml``. Every other
subcommand is a typed function of :mod:`weightdiff.commands`, turned into a jsonargparse
subcommand: its signature is the subcommand's options and their defaults, its docstring's
``Args:`` their help, so ``--help`` shows every default. Parameter ``select_with`` is the option ``--select-with``; a ``bool`` option given
alone means true (``--quick``, or ``--quick false``).

User errors (:class:`~weightdiff.errors.WeightDiffError`) and bad options print one line,
``weightdiff: error: ...``, on stderr and exit with status 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentError, ArgumentParser, DefaultHelpFormatter, Namespace

from weightdiff import __version__
from weightdiff.commands import COMMANDS, POSITIONAL, ZOO_COMMANDS
from weightdiff.errors import ConditionError, WeightDiffError
from weightdiff.runtime import (
    EXIT_SIGTERM,
    log_to_stderr,
    quiet_library_warnings,
    set_threads,
    sigterm_exits,
)

LIGHTNING_COMMANDS = ("fit", "validate")
# The commands that train; the others ignore libraries' warnings about their own internals.
TRAINING_COMMANDS = (*LIGHTNING_COMMANDS, "demo")
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT


# ------------------------------------------------------------------------------------ parser
class _Parser(ArgumentParser):
    """jsonargparse's parser with this CLI's conventions for the options of a function signature
    (see the module docstring); jsonargparse's own options keep their names.

    Parse errors raise :class:`ArgumentError` (``exit_on_error=False``) so that :func:`main`
    prints them as one line.
    """

    _in_signature = False  # inside add_function_arguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultHelpFormatter)
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)

    def add_function_arguments(self, *args: Any, **kwargs: Any) -> list[str]:
        self._in_signature = True
        try:
            return super().add_function_arguments(*args, **kwargs)
        finally:
            self._in_signature = False

    def add_argument(self, *args: Any, **kwargs: Any):
        if not self._in_signature:
            return super().add_argument(*args, **kwargs)
        if args and args[0].startswith("--") and "_" in args[0] and "dest" not in kwargs:
            kwargs["dest"] = args[0][2:].rstrip("+")
            args = tuple(a.replace("_", "-") for a in args)  # `--sgd_ks`, `--sgd_ks+` → `--sgd-ks`, `--sgd-ks+`
        if kwargs.get("type") is bool and "nargs" not in kwargs:
            kwargs.update(nargs="?", const=True)
        return super().add_argument(*args, **kwargs)


def _doc(fn: Callable) -> tuple[str, str]:
    """(one-line help, description): the docstring's first line, and everything before ``Args:``."""
    doc = inspect.getdoc(fn) or ""
    return doc.split("\n", 1)[0], doc.split("\nArgs:", 1)[0].strip()


def _function_parser(fn: Callable) -> _Parser:
    parser = _Parser(description=_doc(fn)[1])
    parser.add_function_arguments(fn, as_group=False, as_positional=fn in POSITIONAL)
    return parser


def _add_global_options(parser: ArgumentParser) -> None:
    """The options given before the subcommand, e.g. ``weightdiff -q --threads 1 sample ...``."""
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads, also of the processes started (OMP_NUM_THREADS); null: "
                             "OMP_NUM_THREADS if set, else one per core. Processes side by side should share "
                             "the cores: --threads 1 each for two on two cores")


def _global_parser() -> _Parser:
    """The parser of the global options alone (they come before the subcommand)."""
    parser = _Parser(prog="weightdiff", add_help=False)
    _add_global_options(parser)
    return parser


def build_parser() -> ArgumentParser:
    """The parser of every subcommand but the LightningCLI ones, which are listed only."""
    parser = _Parser(prog="weightdiff", description="Generate neural-network weights (LoRA adapters, small CNNs) "
                                                    "with a conditional diffusion transformer.")
    parser.add_argument("--version", action="version", version=f"weightdiff {__version__}")
    _add_global_options(parser)
    commands = parser.add_subcommands(dest="command", required=False)
    for name in LIGHTNING_COMMANDS:
        commands.add_subcommand(name, _Parser(add_help=False),
                                help=f"LightningCLI {name}: `weightdiff {name} --config configs/<x>.yaml` "
                                     f"(see `weightdiff {name} --help`)")
    zoo = _Parser(description="Build, verify and inspect checkpoint zoos.")
    commands.add_subcommand("zoo", zoo, help=zoo.description)
    zoo_commands = zoo.add_subcommands(dest="command")
    for name, fn in ZOO_COMMANDS.items():
        zoo_commands.add_subcommand(name, _function_parser(fn), help=_doc(fn)[0])
    for name, fn in COMMANDS.items():
        commands.add_subcommand(name, _function_parser(fn), help=_doc(fn)[0])
    return parser


def _selected(ns: Namespace) -> tuple[Callable[..., None], dict[str, Any]]:
    """The function of the parsed subcommand and its keyword arguments."""
    if ns.command == "zoo":
        return ZOO_COMMANDS[ns.zoo.command], ns.zoo[ns.zoo.command].as_dict()
    return COMMANDS[ns.command], ns[ns.command].as_dict()


def _help_hint(argv: Sequence[str]) -> str:
    """``weightdiff zoo build --help`` for ``zoo build --bad``: where the accepted options are listed."""
    words = ["weightdiff"]
    if argv and argv[0] in (*COMMANDS, *LIGHTNING_COMMANDS):
        words.append(argv[0])
    elif argv and argv[0] == "zoo":
        words += argv[:2] if len(argv) > 1 and argv[1] in ZOO_COMMANDS else argv[:1]
    return " ".join([*words, "--help"])


def _split_global(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the global options, the rest): ``-q --threads 1 sample ...`` → ``-q --threads 1`` and ``sample ...``.

    The global options are the words before the subcommand, up to ``--help`` or ``--version``.
    """
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] not in ("-h", "--help", "--version"):
        i += 2 if argv[i] == "--threads" else 1
    return list(argv[:i]), list(argv[i:])


def _config_files(argv: Sequence[str]) -> list[str]:
    """The files of ``--config``/``-c`` in LightningCLI arguments."""
    files = [b for a, b in zip(argv, argv[1:]) if a in ("--config", "-c")]
    return files + [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]


def _quiet_environment() -> None:
    """Offline defaults: no hub downloads (nor their progress bars), and wandb never blocks on a missing network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bar per model load
    if not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")


def _run(argv: list[str], from_process: bool) -> int:
    """Parse the global options, set up the process and run the subcommand; returns the exit status."""
    options, argv = _split_global(argv)
    hint = []  # a bad global option: `weightdiff --help` lists them
    try:
        opts = _global_parser().parse_args(options)
        hint = argv
        if opts.verbose and opts.quiet:
            raise ConditionError("give at most one of -v/--verbose and -q/--quiet")
        command = argv[0] if argv else None
        trains = command in TRAINING_COMMANDS
        level = logging.DEBUG if opts.verbose else logging.WARNING if opts.quiet else logging.INFO
        with log_to_stderr(level), (contextlib.nullcontext() if trains else quiet_library_warnings()):
            set_threads(opts.threads)
            if command in LIGHTNING_COMMANDS:
                from weightdiff.training.lightning_cli import (
                    run_lightning_cli,  # lightning costs seconds to import
                )

                run_lightning_cli(argv, keep_process_argv=from_process)
                return 0
            parser = build_parser()
            ns = parser.parse_args(argv)
            if ns.command is None:
                parser.print_help()
                return 0
            fn, kwargs = _selected(ns)
            fn(**kwargs)
            return 0
    except ArgumentError as exc:
        message = " ".join(str(exc).split())  # jsonargparse's type errors span several lines
        files = _config_files(argv) if argv and argv[0] in LIGHTNING_COMMANDS else []
        where = f"{argv[0]} --config {', '.join(files)}: " if files else ""
        if "unrecognized arguments" in message and {"-v", "--verbose", "-q", "--quiet", "--threads"} & set(argv):
            message += f"; the global options go before the subcommand: `weightdiff --threads 1 {argv[0]} ...`"
        print(f"weightdiff: error: {where}{message} (see `{_help_hint(hint)}`)", file=sys.stderr)
        return EXIT_USER_ERROR
    except WeightDiffError as exc:
        print(f"weightdiff: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("weightdiff: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (``--help`` and ``--version`` exit 0 themselves).

    SIGTERM stops the command (files being written are removed, not left half-written) and the
    status is :data:`~weightdiff.runtime.EXIT_SIGTERM`, also when a Lightning trainer stopped
    cleanly on it (Lightning itself exits 0).
    """
    from_process = argv is None or list(argv) == sys.argv[1:]  # the console script's own command line
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_environment()
    with sigterm_exits() as sigterms:
        try:
            status = _run(argv, from_process)
        except SystemExit:
            if not sigterms:
                raise
    if sigterms:
        print("weightdiff: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_SIGTERM
    return status


if __name__ == "__main__":
    sys.exit(main())
