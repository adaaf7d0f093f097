#!/usr/bin/env python
"""Would a spread over nearby angles help held-out rotdigits tasks? (a quick probe)

    python scripts/angle_jitter_probe.py --model runs/demo/generator \
        --zoo checkpoints_zoo/rotdigits-lora --offsets=-10,-5,0,5,10

For a generator with a conditional mean over the numbers of a text condition
(``mean_input: numeric``), each held-out task's paraphrase is read as usual and the parsed angle
is then moved by each offset (degrees) before μ(c) is computed. Prints the test accuracy of μ at
every offset per held-out task, the mean per offset and kind, and "pick": the offset chosen per
task by accuracy on 10 labelled training examples per class (the benchmark's best-of protocol).
If picking beat offset 0, conditioning noise on the angle would be a way to make sampled
diversity pay.
"""

from __future__ import annotations

import argparse
import math

import torch

from weightdiff.evaluate.benchmark import heldout_description
from weightdiff.evaluate.rows import pick_best
from weightdiff.models.generator import mean_tokens
from weightdiff.sampling import WeightDiffusionPipeline, make_condition
from weightdiff.tasks import get_task
from weightdiff.tasks.numeric import NUMERIC_DIM, NUMERIC_FIELDS
from weightdiff.zoo import Zoo

COS, SIN = NUMERIC_FIELDS.index("cos A") - NUMERIC_DIM, NUMERIC_FIELDS.index("sin A") - NUMERIC_DIM


def rotated(raw: torch.Tensor, offsets: list[float]) -> torch.Tensor:
    """One text condition ``(1, C)`` → ``(len(offsets), C)``, its parsed angle moved by each offset."""
    angle = math.atan2(float(raw[0, SIN]), float(raw[0, COS]))
    out = raw.repeat(len(offsets), 1)
    for i, offset in enumerate(offsets):
        out[i, COS], out[i, SIN] = math.cos(angle + math.radians(offset)), math.sin(angle + math.radians(offset))
    return out


def mean_by_kind(pairs: list[tuple[str, float]]) -> dict[str, float]:
    kinds = sorted({k for k, _ in pairs})
    out = {"all": sum(a for _, a in pairs) / len(pairs)}
    out.update({k: sum(a for kk, a in pairs if kk == k) / sum(kk == k for kk, _ in pairs) for k in kinds})
    return {k: round(100 * v, 1) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--zoo", required=True)
    p.add_argument("--offsets", default="-10,-5,-2.5,0,2.5,5,10", help="angle offsets in degrees")
    p.add_argument("--per-class", type=int, default=10, help="labelled examples per class that pick an offset")
    args = p.parse_args()
    offsets = [float(o) for o in args.offsets.split(",")]
    gen = WeightDiffusionPipeline.from_pretrained(args.model)
    if gen.generator.config.mean_input != "numeric":
        p.error(f"--model {args.model}: the probe needs a conditional mean over parsed numbers (mean_input numeric)")
    kinds = {r["task"]: r.get("heldout_kind") or "unseen" for r in Zoo.open(args.zoo).rows("heldout")}
    at_offset: dict[float, list[tuple[str, float]]] = {o: [] for o in offsets}
    picked: list[tuple[str, float]] = []
    for name in sorted(kinds):
        task = get_task(name)
        raw = make_condition(gen, description=heldout_description(task)).raw
        params = gen.tokenizer.decode_float(mean_tokens(gen.generator, rotated(raw, offsets)))
        target = gen.target(task)
        acc = target.accuracy(params, *task.data().split("test"))
        best = pick_best(target, task, params, args.per_class, 0)
        for o, a in zip(offsets, acc.tolist()):
            at_offset[o].append((kinds[name], a))
        picked.append((kinds[name], float(acc[best])))
        print(f"{name} ({kinds[name]}):", " ".join(f"{100 * a:.1f}" for a in acc.tolist()), f"pick {offsets[best]:+g}",
              flush=True)
    for o in offsets:
        print(f"offset {o:+g}:", mean_by_kind(at_offset[o]))
    print(f"picked by {args.per_class}/class:", mean_by_kind(picked))


if __name__ == "__main__":
    main()
