#!/usr/bin/env python
"""Do networks stay accurate along the directions a run's own checkpoints span? (a quick probe)

    python scripts/within_run_probe.py --zoo checkpoints_zoo/digits-cnn --gammas 0,0.5,1,2

For a whole-network zoo of independent runs with several late checkpoints each, draws affine
combinations of each run's checkpoints, ``Σ_m w_m W_m`` with ``w = 1/M + γ·g`` (``g`` Gaussian,
centred so that the weights sum to 1; one run's checkpoints share their hidden units, so no
alignment is needed), two per run and γ. γ = 0 is the run's centroid, larger γ extrapolates along
the run's own directions. Prints, per γ, the test accuracy and the median nearest-zoo distance in
within-run spacings, measured as the benchmark measures them: compare with the benchmark's
noise-added rows at equal distance to see whether a run's spread is a direction of working networks.
"""

from __future__ import annotations

import argparse

import torch

from weightdiff.errors import BenchmarkError
from weightdiff.evaluate.rows import ZooState, run_groups


def affine_combinations(checkpoints: dict[str, torch.Tensor], gamma: float, num: int,
                        generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``num`` affine combinations ``{name: (num, *shape)}`` of one run's checkpoints ``{name: (M, *shape)}``."""
    m = next(iter(checkpoints.values())).shape[0]
    g = torch.randn(num, m, generator=generator)
    w = 1.0 / m + gamma * (g - g.mean(1, keepdim=True))  # each row sums to 1
    return {k: torch.einsum("nm,m...->n...", w, v.float()) for k, v in checkpoints.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zoo", required=True)
    p.add_argument("--gammas", default="0,0.5,1,1.5,2,3")
    p.add_argument("--per-run", type=int, default=2, help="combinations per run and γ")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    try:
        z = ZooState.whole_network(args.zoo, num=args.per_run, seed=args.seed)
    except BenchmarkError as exc:
        p.error(f"--zoo: {exc}")
    by_run = run_groups(z, range(len(z.rows)))
    spacing = z.within_run_spacing()
    x, y = z.test_split()
    acc = z.target.accuracy(z.params, x, y)
    print(f"zoo: {len(by_run)} runs, mean {100 * acc.mean():.2f} % (best {100 * acc.max():.2f}); "
          f"within-run spacing {spacing:.3f}")
    g = torch.Generator().manual_seed(args.seed)
    for gamma in (float(v) for v in args.gammas.split(",")):
        parts = [affine_combinations({k: v[ix] for k, v in z.params.items()}, gamma, args.per_run, g)
                 for ix in by_run.values()]
        params = {k: torch.cat([part[k] for part in parts]) for k in z.params}
        acc = z.target.accuracy(params, x, y)
        dist = z.space.nearest_distance(params)
        print(f"γ {gamma:g}: mean {100 * acc.mean():.2f} % (median {100 * acc.median():.2f}, best "
              f"{100 * acc.max():.2f}); median distance {float(dist.median()) / spacing:.2f} within-run spacings",
              flush=True)


if __name__ == "__main__":
    main()
