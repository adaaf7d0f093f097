#!/usr/bin/env python
"""Where a latent whole-network generator puts its samples, relative to the zoo's runs.

    python scripts/latent_geometry.py --model runs/gen/generator --zoo checkpoints_zoo/mnist1d-cnn

Reports, in one run (distances as the benchmark measures them, in within-run spacings):

* **the zoo through the autoencoder**: each training checkpoint, prepared as in training
  (canonicalised, runs aligned as the generator's data settings say), encoded and decoded —
  accuracy, distance to the nearest zoo checkpoint, and how often that nearest checkpoint is the
  input itself (the autoencoder keeps a run's checkpoints apart) or a run-mate;
* **the run averages**: each run's checkpoints averaged in weight space (what a generator that
  collapses a run to one point would give; ``scripts/within_run_probe.py`` goes along and past a
  run's own span);
* **the latent space**: the median distance between latents of one run against that to the
  nearest latent of another run, and, for ``--num`` samples, each sampled latent's distance to the
  nearest training latent and to the nearest run's latent centroid, as fractions of the latent
  within-run spacing — a ratio below one on the centroid side means the sampler lands between a
  run's checkpoints rather than on or beyond them.
"""

from __future__ import annotations

import argparse

import torch

from weightdiff.errors import BenchmarkError
from weightdiff.evaluate.diagnose import ZooEntries, diffusion_space
from weightdiff.evaluate.rows import ZooState, run_average_params, run_groups
from weightdiff.sampling import WeightDiffusionPipeline, generate_tokens, make_condition


def within_and_between(latents: torch.Tensor, runs: list[str]) -> tuple[float, float]:
    """Median distance between two latents of one run, and median distance of a latent to the nearest
    latent of another run."""
    d = torch.cdist(latents, latents)
    same = torch.tensor([[a == b for b in runs] for a in runs])
    eye = torch.eye(len(runs), dtype=torch.bool)
    within = d[same & ~eye].median()
    between = d.masked_fill(same, float("inf")).min(1).values.median()
    return float(within), float(between)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="exported latent whole-network generator")
    p.add_argument("--zoo", required=True, help="the zoo it was trained on")
    p.add_argument("--num", type=int, default=240, help="samples")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = WeightDiffusionPipeline.from_pretrained(args.model)
    net = gen.generator
    if net.autoencoder is None:
        p.error(f"--model {args.model}: not a latent generator (it has no weight autoencoder)")
    try:
        z = ZooState.whole_network(args.zoo)
    except BenchmarkError as exc:
        p.error(f"--zoo: {exc}")
    runs, spacing, task = z.run_ids, z.within_run_spacing(), z.rows[0]["task"]
    x_te, y_te = z.test_split()

    def report(name: str, params: dict[str, torch.Tensor], own: list[int] | None = None) -> None:
        acc = 100 * z.target.accuracy(params, x_te, y_te).double()
        dist, near = z.space.nearest(params)
        d = dist.double() / spacing
        line = (f"{name}: mean {acc.mean():.2f} % (best {acc.max():.2f}); nearest-zoo distance median "
                f"{d.median():.2f} (p10 / p90 {d.quantile(0.1):.2f} / {d.quantile(0.9):.2f}) within-run spacings")
        if own is not None:
            itself = sum(int(n) == i for n, i in zip(near, own)) / len(own)
            mate = sum(runs[int(n)] == runs[i] for n, i in zip(near, own)) / len(own)
            line += f"; nearest is itself {100 * itself:.0f} %, its own run {100 * mate:.0f} %"
        print(line, flush=True)

    into, back = diffusion_space(gen)
    encoded = ZooEntries(gen, z.zoo, "train", into).tokens  # as in training: canonicalised, runs aligned if so
    latents = encoded.flatten(1)
    with torch.no_grad():
        recon = {k: v.float() for k, v in gen.tokenizer.decode_float(back(encoded)).items()}
    print(f"zoo: {len(set(runs))} runs, {len(runs)} checkpoints, within-run spacing {spacing:.4f}", flush=True)
    report("zoo checkpoints through the autoencoder", recon, own=list(range(len(runs))))
    by_run = run_groups(z, range(len(runs)))
    report("run averages (weight space)", run_average_params(z, by_run))
    within, between = within_and_between(latents, runs)
    print(f"latents: within-run median distance {within:.3f}, nearest other run {between:.3f} "
          f"(ratio {between / within:.2f})", flush=True)

    captured: list[torch.Tensor] = []
    to_tokens = net.to_tokens

    def capture(sample: torch.Tensor, *a, **kw) -> torch.Tensor:
        captured.append(sample.detach().flatten(1).cpu())
        return to_tokens(sample, *a, **kw)

    net.to_tokens = capture
    try:
        out, _ = generate_tokens(gen, make_condition(gen, task=task), args.num, gen.settings(), use_cache=False,
                                 progress=False)
    finally:
        del net.to_tokens
    sampled = torch.cat(captured)[-args.num:]
    report(f"generated ({gen.settings().sampler} {gen.settings().steps})",
           {k: v.float() for k, v in gen.tokenizer.decode_float(out).items()})
    centroids = torch.stack([latents[ix].mean(0) for ix in by_run.values()])
    to_member = torch.cdist(sampled, latents).min(1).values / within
    to_centroid = torch.cdist(sampled, centroids).min(1).values / within
    member_to_centroid = torch.cat([(latents[ix] - latents[ix].mean(0)).norm(dim=1) for ix in by_run.values()]) / within
    print(f"sampled latents, in latent within-run spacings: to the nearest training latent median "
          f"{to_member.median():.2f}, to the nearest run centroid {to_centroid.median():.2f} "
          f"(a training latent to its own run's centroid: {member_to_centroid.median():.2f})", flush=True)


if __name__ == "__main__":
    main()
