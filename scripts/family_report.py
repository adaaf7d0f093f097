"""Measure the ``rotdigits`` adaptation family: does it give weight generation a case?

For a set of rotated/mirrored digit tasks, prints JSON with the frozen base's accuracy without an
adapter, the accuracy and training time of a LoRA adapter trained on the whole training split
(the oracle), and of few-shot LoRA adapters trained on k labelled examples per class.

    python scripts/family_report.py --threads 1 --out report.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

from weightdiff.tasks import get_task
from weightdiff.tasks.rotdigits import DEFAULT_ADAPTER_TRAINING, DEFAULT_LORA_CONFIG
from weightdiff.zoo.training import evaluate_module, train_base, train_lora_adapter

DEFAULT_TASKS = [
    "rotdigits:angle=10", "rotdigits:angle=-30", "rotdigits:angle=45,flip=1", "rotdigits:angle=-60,flip=1",
    "rotdigits:angle=90", "rotdigits:angle=-120", "rotdigits:angle=150,flip=1", "rotdigits:angle=-180",
    "rotdigits:angle=0,flip=1", "rotdigits:angle=75",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 5, 10, 50])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="adapter seeds (few-shot subsets too)")
    parser.add_argument("--base-seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_ADAPTER_TRAINING["steps"])
    parser.add_argument("--lr", type=float, default=DEFAULT_ADAPTER_TRAINING["lr"])
    parser.add_argument("--rank", type=int, default=DEFAULT_LORA_CONFIG["r"])
    parser.add_argument("--alpha", type=float, default=DEFAULT_LORA_CONFIG["lora_alpha"])
    parser.add_argument("--target-modules", nargs="+", default=DEFAULT_LORA_CONFIG["target_modules"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    base = train_base("rotdigits", seed=args.base_seed)
    base_seconds = time.perf_counter() - start
    upright = evaluate_module(base, get_task("digits").data())
    lora = dict(rank=args.rank, alpha=args.alpha, target_modules=args.target_modules, steps=args.steps, lr=args.lr)

    rows = []
    for name in args.tasks:
        task = get_task(name)
        row: dict = {"task": task.name, "base_test_acc": evaluate_module(base, task.data())["test_acc"]}
        for label, k in [("oracle", None)] + [(f"k={k}", k) for k in args.shots]:
            runs = [train_lora_adapter(task, base, seed=s, examples_per_class=k, **lora)[1] for s in args.seeds]
            row[label] = {"test_acc": statistics.mean(m["test_acc"] for m in runs),
                          "seconds": statistics.mean(m["seconds"] for m in runs),
                          "cpu_seconds": statistics.mean(m["cpu_seconds"] for m in runs)}
        logging.info("%s: base %.3f oracle %.3f (%.2f s)", task.name, row["base_test_acc"],
                     row["oracle"]["test_acc"], row["oracle"]["seconds"])
        rows.append(row)

    def mean_of(key: str, field: str = "test_acc") -> float:
        return statistics.mean(r[key][field] for r in rows)

    summary = {"base_test_acc": statistics.mean(r["base_test_acc"] for r in rows),
               "oracle_test_acc": mean_of("oracle"), "oracle_seconds": mean_of("oracle", "seconds"),
               "oracle_cpu_seconds": mean_of("oracle", "cpu_seconds")}
    for k in args.shots:
        summary[f"k={k}_test_acc"] = mean_of(f"k={k}")
        summary[f"k={k}_seconds"] = mean_of(f"k={k}", "seconds")
    report = {
        "setup": {**lora, "base": type(base).__name__, "base_seed": args.base_seed, "seeds": args.seeds,
                  "threads": args.threads, "adapter_params": None},
        "base_upright": upright, "base_train_seconds": base_seconds, "summary": summary, "tasks": rows,
    }
    state, _ = train_lora_adapter(get_task(args.tasks[0]), base, seed=0, **dict(lora, steps=1))
    report["setup"]["adapter_params"] = sum(v.numel() for v in state.values())
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
