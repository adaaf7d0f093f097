#!/usr/bin/env python
"""Sampler settings of one whole-network generator against accuracy and novelty (a quick probe).

    python scripts/novelty_probe.py --model runs/gen/generator --zoo checkpoints_zoo/mnist1d-cnn \
        --setting sampler=ddim --setting sampler=ddpm --setting sampler=ddpm,latent_noise=0.3

Each setting is ``key=value[,key=value]`` over SamplerSettings fields (steps, sampler, seed,
temperature, latent_noise); what is left out is the generator's own. For ``--num`` samples of the
zoo's task, prints the mean (best, 10th percentile) test accuracy, the nearest-zoo distance as the
benchmark measures it (aligned, z-scored) in within-run spacings — median, mean and the 10th / 90th
percentiles, since copies and novel samples can mix — and how many of the zoo's runs the samples'
nearest checkpoints come from. Choose settings here; `weightdiff benchmark` is the number to report.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from weightdiff.errors import BenchmarkError
from weightdiff.evaluate.rows import ZooState
from weightdiff.sampling import (
    SamplerSettings,
    WeightDiffusionPipeline,
    generate_tokens,
    make_condition,
    parse_sampler_setting,
)


def summarize(accuracy: torch.Tensor, distance: torch.Tensor, runs: list[str], spacing: float) -> dict[str, float]:
    """Accuracy (%), distances in within-run spacings and basins of one setting's samples.

    ``runs``: the run of each sample's nearest zoo checkpoint; ``distance``: each sample's nearest-zoo
    distance (NaN where unknown, left out)."""
    d = distance[~torch.isnan(distance)].double() / spacing
    q = d.quantile(torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    a = 100 * accuracy.double()
    return {"mean": float(a.mean()), "best": float(a.max()), "p10": float(a.quantile(0.1)),
            "distance_median": q[1], "distance_mean": float(d.mean()), "distance_p10": q[0], "distance_p90": q[2],
            "basins": len(set(runs))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported whole-network generator")
    p.add_argument("--zoo", required=True, help="the zoo it was trained on")
    p.add_argument("--num", type=int, default=240, help="samples per setting")
    p.add_argument("--setting", type=parse_sampler_setting, action="append", required=True,
                   help="key=value[,key=value] over SamplerSettings fields; repeat for more")
    args = p.parse_args()
    try:
        z = ZooState.whole_network(args.zoo)
    except BenchmarkError as exc:
        p.error(f"--zoo: {exc}")
    gen = WeightDiffusionPipeline.from_pretrained(args.model)
    zoo_runs, spacing, task = z.run_ids, z.within_run_spacing(), z.rows[0]["task"]
    x_te, y_te = z.test_split()
    cond = make_condition(gen, task=task)
    print(f"zoo: {len(set(zoo_runs))} runs, within-run spacing {spacing:.3f}; {args.num} samples per setting", flush=True)
    for kwargs in args.setting:
        settings: SamplerSettings = replace(gen.settings(), **kwargs)
        t0 = time.perf_counter()
        tokens, _ = generate_tokens(gen, cond, args.num, settings, use_cache=False, progress=False)
        params = {k: v.float() for k, v in gen.tokenizer.decode_float(tokens).items()}
        accuracy = z.target.accuracy(params, x_te, y_te)
        distance, nearest = z.space.nearest(params)
        s = summarize(accuracy, distance, [zoo_runs[int(i)] for i in nearest if int(i) >= 0], spacing)
        print(f"{settings}: mean {s['mean']:.2f} % (best {s['best']:.2f}, p10 {s['p10']:.2f}); distance median "
              f"{s['distance_median']:.2f} within-run spacings (mean {s['distance_mean']:.2f}, p10/p90 "
              f"{s['distance_p10']:.2f}/{s['distance_p90']:.2f}); {s['basins']} basins; "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
