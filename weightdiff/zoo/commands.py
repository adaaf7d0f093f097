"""``weightdiff zoo build | verify | info``: argparse handlers over :mod:`weightdiff.zoo`.

User errors raise :class:`~weightdiff.errors.WeightDiffError` subclasses; the CLI prints them as
one line and exits 2. ``python -m weightdiff.zoo.commands build --config ...`` runs the zoo
commands without the rest of the CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from weightdiff.errors import ManifestError, WeightDiffError

MAX_TASK_LINES = 20  # `zoo info` lists tasks one per line up to this many (all of them with --json)


def _cmd_build(args: argparse.Namespace) -> int:
    from weightdiff.zoo.build import parse_shard, run_build
    from weightdiff.zoo.recipe import load_recipe

    recipe = load_recipe(args.config)
    report = run_build(recipe, args.root, shard=parse_shard(args.shard), workers=args.workers,
                       progress=not args.no_progress)
    accs = report.test_accs
    acc = (f"; test acc of new entries mean {sum(accs) / len(accs):.4f}, min {min(accs):.4f}, max {max(accs):.4f}"
           if accs else "")
    sys.stdout.write(f"zoo {report.zoo_dir}: shard {args.shard} has {report.shard_runs} of {report.planned_runs} "
                     f"runs; {report.skipped_runs} already built, {report.trained_runs} trained "
                     f"({report.entries_written} entries) in {report.seconds:.1f} s{acc}\n")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from weightdiff.zoo.store import Zoo

    zoo = Zoo.open(args.path)
    problems = zoo.verify()
    for entry_id, why in problems:
        sys.stdout.write(f"{entry_id}: {why}\n")
    if problems:
        raise ManifestError(f"zoo {args.path}: {len(problems)} problem(s) found (listed above)")
    sys.stdout.write(f"zoo {args.path}: {len(zoo.rows())} entries verified\n")
    return 0


def _fmt_acc(stats: dict[str, float | None]) -> str:
    if not stats["n"]:
        return "test acc –"
    return f"test acc mean {stats['mean']:.4f} min {stats['min']:.4f} max {stats['max']:.4f}"


def _cmd_info(args: argparse.Namespace) -> int:
    from weightdiff.zoo.store import Zoo

    info = Zoo.open(args.path).info()
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    lines = [f"zoo {info['name']} ({info['kind']}, family {info['family']}) at {info['path']}",
             f"  {info['entries']} of {info['planned_entries']} planned entries, {info['runs']} runs, "
             f"{info['tasks']} tasks, {info['num_params']} parameters per entry; {_fmt_acc(info['test_acc'])}"]
    if "base" in info and "test_acc" in info["base"]:
        lines.append(f"  base network: test acc {info['base']['test_acc']:.4f}")
    for split, s in info["splits"].items():
        lines.append(f"  split {split}: {s['entries']} entries, {s['tasks']} tasks; {_fmt_acc(s['test_acc'])}")
    for kind, s in info["heldout_kinds"].items():
        lines.append(f"    held-out {kind}: {s['entries']} entries, {s['tasks']} tasks; {_fmt_acc(s['test_acc'])}")
    if len(info["per_task"]) <= MAX_TASK_LINES:
        for task, s in info["per_task"].items():
            lines.append(f"  {task} [{s['split']}]: {s['entries']} entries; {_fmt_acc(s['test_acc'])}")
    else:
        lines.append(f"  ({len(info['per_task'])} tasks: use --json for per-task numbers)")
    if info["temporary_dirs"]:
        lines.append(f"  {info['temporary_dirs']} temporary folder(s) from interrupted builds under entries/")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _add_commands(sub: Any) -> None:
    b = sub.add_parser("build", help="train the checkpoints of a recipe (resumable, shardable)")
    b.add_argument("--config", required=True, help="recipe YAML, e.g. configs/zoo/rotdigits-lora.yaml")
    b.add_argument("--root", default="checkpoints_zoo", help="folder holding zoos (default: checkpoints_zoo)")
    b.add_argument("--shard", default="0/1", help="i/n: build the runs with index i modulo n (default 0/1)")
    b.add_argument("--workers", type=int, default=1, help="training processes, one per core (default 1)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.set_defaults(func=_cmd_build)
    v = sub.add_parser("verify", help="re-hash every entry and check it loads strictly; exit 2 on problems")
    v.add_argument("path", help="zoo folder, e.g. checkpoints_zoo/rotdigits-lora")
    v.set_defaults(func=_cmd_verify)
    i = sub.add_parser("info", help="counts and test accuracy per split, held-out kind and task")
    i.add_argument("path", help="zoo folder")
    i.add_argument("--json", action="store_true", help="print the full numbers as JSON")
    i.set_defaults(func=_cmd_info)


def add_zoo_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``zoo build|verify|info`` on a subparsers object; handlers are set as ``func``."""
    p = subparsers.add_parser("zoo", help="build, verify and inspect checkpoint zoos")
    sub = p.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True)
    _add_commands(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone ``zoo`` command line (``python -m weightdiff.zoo.commands build ...``)."""
    parser = argparse.ArgumentParser(prog="weightdiff zoo", description="build, verify and inspect checkpoint zoos")
    _add_commands(parser.add_subparsers(dest="zoo_command", metavar="ZOO_COMMAND", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except WeightDiffError as exc:
        sys.stderr.write(f"weightdiff zoo: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
