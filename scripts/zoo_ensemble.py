#!/usr/bin/env python
"""What is the diversity of a zoo's own seeds worth? (a quick probe of a LoRA zoo)

    python scripts/zoo_ensemble.py --zoo checkpoints_zoo/rotdigits-lora-s8 --stride 8
    python scripts/zoo_ensemble.py --zoo ... --tasks-from runs/bench/results.json   # the benchmark's seen tasks

For training tasks of the zoo, compares the mean test accuracy of one adapter with that of the
ensemble of all the task's adapters (mean softmax) and of the best-of-N adapter picked on 10
labelled training examples per class (the benchmark's best-of protocol). This is the most a
generator that reproduced the zoo's seed-to-seed spread could gain from ensembling or picking,
to set beside the generator's own best-of and ensemble rows.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

import torch

from weightdiff.evaluate.rows import ensemble_predictions, pick_best
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo


@torch.no_grad()
def seed_rows(zoo: Zoo, task_names: list[str], per_class: int = 10) -> dict[str, float]:
    """Mean over tasks of one adapter's, the ensemble's and the picked adapter's test accuracy (%)."""
    target = zoo.target()
    ids: dict[str, list[str]] = defaultdict(list)
    for row in zoo.rows("train"):
        ids[row["task"]].append(row["id"])
    missing = [t for t in task_names if t not in ids]
    if missing:
        raise SystemExit(f"zoo {zoo.path}: no training adapters for {missing}")
    single, ensemble, picked = [], [], []
    for name in task_names:
        task = get_task(name)
        states = [zoo.load(i) for i in ids[name]]
        params = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        x, y = task.data().split("test")
        acc = target.accuracy(params, x, y)
        single.append(float(acc.mean()))
        ensemble.append(float((ensemble_predictions(target, task, params) == y).float().mean()))
        picked.append(float(acc[pick_best(target, task, params, per_class, 0)]))
    n = len(task_names)
    return {"tasks": n, "adapters_per_task": min(len(ids[t]) for t in task_names),
            "single": 100 * sum(single) / n, "ensemble": 100 * sum(ensemble) / n, "best_of": 100 * sum(picked) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--stride", type=int, default=8, help="every stride-th training task (sorted by name)")
    p.add_argument("--tasks-from", help="a benchmark's results.json: its seen tasks instead")
    args = p.parse_args()
    zoo = Zoo.open(args.zoo)
    if zoo.kind != "lora":
        p.error(f"--zoo {args.zoo}: a LoRA zoo is needed (this one holds {zoo.kind} checkpoints)")
    if args.tasks_from:
        with open(args.tasks_from) as f:
            names = list(json.load(f)["settings"]["seen_tasks"])
    else:
        names = sorted({r["task"] for r in zoo.rows("train")})[::args.stride]
    r = seed_rows(zoo, names)
    print(f"{r['tasks']} training tasks x {r['adapters_per_task']} adapters: one adapter {r['single']:.2f} %, "
          f"ensemble {r['ensemble']:.2f} %, best-of by 10/class {r['best_of']:.2f} %")


if __name__ == "__main__":
    main()
