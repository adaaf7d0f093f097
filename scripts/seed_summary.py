"""Mean ± std over generator seeds of every row of several benchmark runs (one run per seed).

Each ``results.json`` is one ``weightdiff benchmark`` run of the same suite and settings with a
generator of a different training seed; the baselines that do not depend on the generator come
out the same in each (their std shows it). Prints a Markdown table per section (seen, unseen
and each held-out kind): the row's mean score over the runs ± its sample std, and the values of
each run; with ``--json``, the same numbers as JSON.

    python scripts/seed_summary.py runs/bench-s0 runs/bench-s1 runs/bench-s2 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def load_results(folder: str | Path) -> dict[str, Any]:
    """``results.json`` of a benchmark folder (or the file itself)."""
    path = Path(folder)
    path = path / "results.json" if path.is_dir() else path
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: {path} not found (a benchmark folder or its results.json)") from None
    except json.JSONDecodeError as exc:
        raise SystemExit(f"error: {path} is not valid JSON: {exc}") from None


def sections(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{section name: {row: stats}}``: seen, unseen and ``unseen: <kind>`` for each held-out kind."""
    out = {"seen": results.get("seen") or {}, "unseen": results.get("unseen") or {}}
    for kind, rows in (results.get("unseen_by_kind") or {}).items():
        out[f"unseen: {kind}"] = rows
    return {k: v for k, v in out.items() if v}


def summarise(runs: list[dict[str, Any]], stat: str = "mean") -> dict[str, dict[str, dict[str, Any]]]:
    """``{section: {row: {"mean", "std", "values"}}}`` over the runs that have the row (std: None for one)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for run in runs:
        for section, rows in sections(run).items():
            for row, s in rows.items():
                out.setdefault(section, {}).setdefault(row, {"values": []})["values"].append(s.get(stat))
    for rows in out.values():
        for entry in rows.values():
            vals = [v for v in entry["values"] if v is not None]
            entry["mean"] = statistics.fmean(vals) if vals else None
            entry["std"] = statistics.stdev(vals) if len(vals) > 1 else None
    return out


def markdown(summary: dict[str, dict[str, dict[str, Any]]], scale: float = 100.0) -> str:
    """One table per section: ``| row | mean ± std | per run |`` (scores × ``scale``)."""
    lines = []
    for section, rows in summary.items():
        lines += [f"### {section}", "", "| row | mean ± std | per run |", "|---|---:|---|"]
        for row, e in rows.items():
            fmt = (lambda v: "–" if v is None else f"{scale * v:.1f}")
            spread = f"{fmt(e['mean'])} ± {fmt(e['std'])}" if e["std"] is not None else fmt(e["mean"])
            lines.append(f"| {row} | {spread} | {' / '.join(fmt(v) for v in e['values'])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="benchmark folders (or results.json files), one per generator seed")
    parser.add_argument("--stat", default="mean", choices=["mean", "best", "median"], help="per-task statistic")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    args = parser.parse_args(argv)
    runs = [load_results(r) for r in args.runs]
    suites = {r.get("suite") for r in runs}
    if len(suites) != 1:
        print(f"error: the runs are of different suites {sorted(map(str, suites))}", file=sys.stderr)
        return 2
    summary = summarise(runs, args.stat)
    print(markdown(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
