"""Probe: latent diffusion over a whole-network zoo (weight autoencoder + small latent denoiser).

Trains, on the training split of a full-network zoo:

1. a weight autoencoder over the normalised, canonicalised flat weights (MLP encoder/decoder,
   latents layer-normalised, noise added to inputs and latents, reconstruction + task loss), then
2. a DDPM over the 240 latents (MLP denoiser, v-prediction), sampled with DDIM,

and reports, beside the zoo: accuracy of decoded samples, nearest-zoo distance in units of the
within-run spacing, and how many of the zoo's runs (basins) the samples fall into.

    python scripts/latent_probe.py --zoo checkpoints_zoo/mnist1d-cnn --out runs/exp/latent-probe
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from weightdiff.evaluate.novelty import ComparisonSpace
from weightdiff.models.autoencoder import mlp_layers
from weightdiff.models.schedule import ScheduleConfig, predicted_x0, reverse_process
from weightdiff.tasks import get_task
from weightdiff.training.datamodule import ZooDataModule


class AE(nn.Module):
    """MLP autoencoder; with ``basis`` (P, k) and ``mean`` (P,) it works in the zoo's principal
    coordinates: x -> (x - mean) basis -> MLP -> z, and z -> MLP -> coefficients -> mean + c basisᵀ."""

    def __init__(self, p: int, latent: int, width: int, basis=None, mean=None):
        super().__init__()
        self.latent = latent
        d = p if basis is None else basis.shape[1]
        self.enc = mlp_layers([d, width, width, latent])
        self.dec = mlp_layers([latent, width, 2 * width, d])
        if basis is not None:
            self.register_buffer("basis", basis)
            self.register_buffer("mean", mean)
            self.register_buffer("scale", torch.ones(()))
        else:
            self.basis = None

    def encode(self, x):
        if self.basis is not None:
            x = (x - self.mean) @ self.basis / self.scale
        return F.layer_norm(self.enc(x), (self.latent,))

    def decode(self, z):
        y = self.dec(z)
        return y if self.basis is None else self.mean + (y * self.scale) @ self.basis.T


class Denoiser(nn.Module):
    def __init__(self, d: int, width: int, depth: int):
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.temb = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(),
                                                   nn.Linear(2 * width, width)) for _ in range(depth)])
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d))

    def forward(self, x, t):
        half = 32
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        arg = t.float()[:, None] * freqs[None]
        h = self.inp(x) + self.temb(torch.cat([arg.sin(), arg.cos()], -1))
        for blk in self.blocks:
            h = h + blk(h)
        return self.out(h)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="checkpoints_zoo/mnist1d-cnn")
    ap.add_argument("--out", default="runs/exp/latent-probe")
    ap.add_argument("--latent", type=int, default=64)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--ae-steps", type=int, default=3000)
    ap.add_argument("--ae-lr", type=float, default=1e-3)
    ap.add_argument("--input-noise", type=float, default=0.001)
    ap.add_argument("--latent-noise", type=float, default=0.1)
    ap.add_argument("--functional", type=float, default=1.0)
    ap.add_argument("--dm-steps", type=int, default=6000)
    ap.add_argument("--dm-width", type=int, default=512)
    ap.add_argument("--dm-depth", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--ddim", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mse-steps", type=int, default=0, help="first autoencoder steps without the task loss")
    ap.add_argument("--pca", type=int, default=0, help="work in the zoo's first k principal coordinates (0: off)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    dm = ZooDataModule(zoo=args.zoo, token_size=128, normalize=True, canonicalize=True, condition="none")
    tok = dm.tokenizer
    rows = dm.train_rows
    tokens = tok.encode_batch([dm.prepared(r) for r in rows])  # (N, L, D)
    valid = tok.layout.valid_mask()
    flat = tokens[:, valid]  # (N, P) normalised
    n, p = flat.shape
    runs = [r["run_id"] for r in rows]
    task = get_task(rows[0]["task"])
    data = task.data()
    target = dm.zoo.target()
    print(f"{n} entries of {p} parameters, {len(set(runs))} runs; {time.time() - t0:.1f}s")

    def to_params(x):  # (B, P) normalised -> params
        t = torch.zeros(x.shape[0], *valid.shape)
        t[:, valid] = x
        return tok.decode_float(t)

    def accuracy(x):
        with torch.no_grad():
            return target.accuracy(to_params(x), data.x_test, data.y_test)

    # ------------------------------------------------------------------ autoencoder
    basis = mean = None
    if args.pca:
        mean = flat.mean(0)
        _, sv, vh = torch.linalg.svd(flat - mean, full_matrices=False)
        basis = vh[: min(args.pca, len(sv))].T.contiguous()  # (P, k)
        print(f"principal basis of {basis.shape[1]} directions; variance kept "
              f"{float((sv[:basis.shape[1]] ** 2).sum() / (sv ** 2).sum()):.4f}")
    ae = AE(p, args.latent, args.width, basis, mean)
    if basis is not None:
        ae.scale.fill_(float(((flat - mean) @ basis).std()))
    opt = torch.optim.AdamW(ae.parameters(), lr=args.ae_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.ae_steps, eta_min=args.ae_lr * 0.05)
    bs, fb = 64, 64
    for step in range(args.ae_steps):
        idx = torch.randint(0, n, (bs,))
        x = flat[idx]
        z = ae.encode(x + args.input_noise * torch.randn_like(x))
        rec = ae.decode(z + args.latent_noise * torch.randn_like(z))
        loss_w = F.mse_loss(rec, x)
        loss = loss_w
        if args.functional > 0 and step >= args.mse_steps:
            j = torch.randint(0, data.x_train.shape[0], (bs, fb))
            logits = target.forward_each(to_params(rec), data.x_train[j])
            loss_f = F.cross_entropy(logits.flatten(0, 1), data.y_train[j].flatten())
            loss = loss + args.functional * loss_f
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 500 == 0 or step == args.ae_steps - 1:
            print(f"ae {step}: mse {loss_w.item():.4f} total {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    ae.eval()
    with torch.no_grad():
        z_train = ae.encode(flat)
        rec = ae.decode(z_train)
    zoo_acc = accuracy(flat)
    rec_acc = accuracy(rec)
    print(f"zoo acc {zoo_acc.mean():.4f}; reconstruction acc {rec_acc.mean():.4f}, mse {F.mse_loss(rec, flat):.4f}")

    # ------------------------------------------------------------------ latent diffusion
    zs = z_train.std(0).mean()
    zn = z_train / zs
    schedule = ScheduleConfig(1000, "squaredcos_cap_v2", "v_prediction")
    ddpm = schedule.training_scheduler()
    ac = ddpm.alphas_cumprod
    net = Denoiser(args.latent, args.dm_width, args.dm_depth)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.dm_steps, eta_min=1e-5)
    for step in range(args.dm_steps):
        idx = torch.randint(0, n, (256,))
        x0 = zn[idx]
        t = torch.randint(0, 1000, (len(idx),))
        eps = torch.randn_like(x0)
        xt = ddpm.add_noise(x0, eps, t)
        v = ddpm.get_velocity(x0, eps, t)
        loss = F.mse_loss(net(xt, t), v)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 1000 == 0 or step == args.dm_steps - 1:
            print(f"dm {step}: {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    net.eval()

    def model_fn(x, t):
        return net(x[:, 0], t)[:, None]

    g = torch.Generator().manual_seed(1000 + args.seed)
    noise = torch.randn(args.samples, 1, args.latent, generator=g)
    results = {}
    with torch.no_grad():
        for x, _ in reverse_process(model_fn, noise, schedule, steps=args.ddim, sampler="ddim"):
            pass
        z_gen = x[:, 0] * zs
        one = predicted_x0(model_fn(noise, torch.full((args.samples,), 999)), noise, ac[torch.full((args.samples,), 999)],
                           "v_prediction")[:, 0] * zs
        variants = {"generated (latent DDIM %d)" % args.ddim: ae.decode(z_gen),
                    "generated one-step": ae.decode(one),
                    "reconstruction": rec}
        for s in (0.1, 0.3, 0.5, 1.0):
            k = torch.randint(0, n, (args.samples,), generator=g)
            variants[f"latent-noise copies {s}"] = ae.decode(z_train[k] + s * torch.randn(args.samples, args.latent, generator=g))
    zoo_params = to_params(flat)
    space = ComparisonSpace(target, {k: v.detach() for k, v in zoo_params.items()}, groups=runs)
    within = space.within_group_spacing(runs)
    zdist = torch.cdist(z_gen, z_train).min(1).values
    zspace = torch.cdist(z_train, z_train).fill_diagonal_(float("inf")).min(1).values.median()
    print(f"within-run spacing {within:.4f}; latent: sample-to-nearest {zdist.median():.3f} vs latent zoo spacing {zspace:.3f}")
    for name, x in variants.items():
        acc = accuracy(x)
        d, idx = space.nearest({k: v.detach() for k, v in to_params(x).items()})
        basins = len({runs[int(i)] for i in idx})
        results[name] = {"mean": float(acc.mean()), "best": float(acc.max()), "std": float(acc.std()),
                         "median_distance_within_run": float(d.median() / within), "basins": basins}
        print(f"{name:32s} acc {acc.mean() * 100:5.1f} (best {acc.max() * 100:5.1f}) "
              f"dist/within-run {d.median() / within:5.2f} basins {basins}", flush=True)
    results["zoo"] = {"mean": float(zoo_acc.mean()), "best": float(zoo_acc.max())}
    results["args"] = vars(args)
    results["within_run_spacing"] = within
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
