#!/usr/bin/env python
"""Run the honest benchmark of one suite: a generator beside every baseline, in one run.

    python scripts/benchmark.py --suite adapt-lora --model runs/demo/generator \
        --zoo checkpoints_zoo/rotdigits-lora --out runs/bench/adapt-lora --from-description

Writes ``results.json``, ``results.md``, ``predictions/*.npz`` and PNG plots under ``--out``
(see :func:`weightdiff.evaluate.benchmark.run_benchmark`).
"""

from __future__ import annotations

import argparse
import logging
import sys

from weightdiff.errors import WeightDiffError
from weightdiff.evaluate.benchmark import SUITES, run_benchmark
from weightdiff.evaluate.fewshot import DEFAULT_KS


def _ks(text: str) -> list[int | str]:
    return [k if k == "all" else int(k) for k in text.split(",") if k]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, choices=sorted(SUITES))
    p.add_argument("--model", default=None, help="exported generator directory (omit: baselines only)")
    p.add_argument("--zoo", required=True, help="zoo directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, default=32, help="samples per task")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpm", "x0"])
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--from-description", action="store_true",
                   help="condition the generator on a held-out free-text paraphrase of each task")
    p.add_argument("--max-seen-tasks", type=int, default=8)
    p.add_argument("--max-unseen-tasks", type=int, default=None)
    p.add_argument("--sgd-tasks", type=int, default=None,
                   help="unseen tasks (seen for full suites) that get few-shot SGD (default: all; 0: skip)")
    p.add_argument("--sgd-ks", type=_ks, default=list(DEFAULT_KS), help="comma-separated, e.g. 1,5,10,50,all")
    p.add_argument("--hypernet-steps", type=int, default=None,
                   help="MLP hypernetwork steps (default: as many as the generator's, at least 2000)")
    p.add_argument("--functional-loss-weight", type=float, default=None,
                   help="MLP hypernetwork functional loss weight (default: the generator's own)")
    p.add_argument("--batch-size", type=int, default=64, help="generator batch size")
    p.add_argument("--select-per-class", type=int, default=10,
                   help="labelled examples per class for the 'generated best-of-N' row (0: no such row)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run_benchmark(args.suite, args.model, args.zoo, args.out, num=args.num, steps=args.steps,
                      sampler=args.sampler, guidance=args.guidance, seed=args.seed,
                      from_description=args.from_description, max_seen_tasks=args.max_seen_tasks,
                      max_unseen_tasks=args.max_unseen_tasks, sgd_tasks=args.sgd_tasks, sgd_ks=args.sgd_ks,
                      hypernet_steps=args.hypernet_steps, functional_loss_weight=args.functional_loss_weight,
                      batch_size=args.batch_size, select_per_class=args.select_per_class)
    except WeightDiffError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/results.json and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
