#!/usr/bin/env python
"""Does the task loss pull noise-added copies back to working networks, and how far from the zoo? (a probe)

    python scripts/refine_probe.py --zoo checkpoints_zoo/digits-cnn --scales 0.2,0.3,0.5 --steps 0,10,30,100

For a whole-network zoo, takes one checkpoint per run, adds the benchmark's noise (``scale`` × each
tensor's std), then takes full-batch Adam steps of the task's cross-entropy on its training split,
all copies at once. Prints, per scale and step count, the test accuracy and the median nearest-zoo
distance in within-run spacings, measured as the benchmark measures them. This is what task-loss
guidance in a sampler's last steps could at best buy: if copies noised this far and refined this
much stay novel and accurate, a guided sampler has a target; if they fall back onto the zoo, none.
"""

from __future__ import annotations

import argparse

import torch

from weightdiff.evaluate.baselines import noise_added_params, polished_params
from weightdiff.evaluate.rows import ZooState
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo


def last_of_each_run(runs: list[str]) -> list[int]:
    """Index of each run's last listed checkpoint, in the order the runs first appear."""
    last: dict[str, int] = {}
    for i, run in enumerate(runs):
        last[run] = i
    return list(last.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--scales", default="0.2,0.3,0.5")
    p.add_argument("--steps", default="0,10,30,100")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=None, help="only the first N runs (default: all)")
    args = p.parse_args()
    zoo = Zoo.open(args.zoo)
    if zoo.kind != "full":
        p.error(f"--zoo {args.zoo}: a whole-network zoo is needed (this one holds {zoo.kind} checkpoints)")
    z = ZooState(zoo, num=1, seed=args.seed)
    runs = [r["run_id"] for r in z.rows]
    ix = torch.tensor(last_of_each_run(runs)[:args.runs])
    spacing = z.space.within_group_spacing(runs)
    data = get_task(z.rows[0]["task"]).data()
    x_tr, y_tr = data.split("train")
    x_te, y_te = data.split("test")
    base = {k: v[ix].float() for k, v in z.params.items()}
    acc = z.target.accuracy(base, x_te, y_te)
    print(f"zoo: {len(ix)} runs, their last checkpoints {100 * acc.mean():.2f} %; within-run spacing {spacing:.3f}; "
          f"Adam lr {args.lr:g}, full batch of {len(y_tr)}", flush=True)
    steps = [int(v) for v in args.steps.split(",")]
    for scale in (float(v) for v in args.scales.split(",")):
        noised = noise_added_params(base, scale, seed=args.seed)
        for k in steps:
            params = polished_params(z.target, noised, x_tr, y_tr, k, args.lr)
            acc = z.target.accuracy(params, x_te, y_te)
            dist = z.space.nearest_distance(params)
            print(f"scale {scale:g}, {k:4d} steps: mean {100 * acc.mean():.2f} % (best {100 * acc.max():.2f}); "
                  f"median distance {float(dist.median()) / spacing:.2f} within-run spacings", flush=True)


if __name__ == "__main__":
    main()
