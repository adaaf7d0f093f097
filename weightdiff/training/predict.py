"""Sampling at scale: the plain-torch sampling core inside Lightning's predict loop.

:func:`predict_tokens` spreads the sample indices of one request over ``devices`` (Lightning
picks the strategy: DDP for several devices) and runs, per batch of indices, exactly what
:func:`weightdiff.sampling.generate_tokens` runs on one device: noise drawn from each sample's own
seed (``seed + i``), then :func:`~weightdiff.models.generator.sample_tokens`. Each step's tokens are
gathered from every rank, so every process returns all ``num`` samples, in index order (DDP
started by a script or the CLI: strategies that spawn or fork return no predictions). They equal the single-device samples up to float rounding (the
batches hold other samples).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from weightdiff.models.generator import sample_tokens, seeded_latent_noise, seeded_noise, seeded_step_noise
from weightdiff.runtime import quiet_library_chatter


class TokenPredictor(L.LightningModule):
    """Predict-loop wrapper: each batch is a tensor of sample indices; returns (indices, tokens).

    Every rank gets the same number of indices (rank r takes r, r + world, ...; the last index
    fills up a short rank), so every step gathers equal-sized tensors from all ranks.

    Args:
        gen: a loaded generator (``generator``, ``schedule``).
        raw: the raw condition batch (one row).
        settings: :class:`weightdiff.sampling.SamplerSettings` (steps, sampler, guidance, seed, temperature,
            latent_noise).
        num, batch_size: samples in all and per step and rank.
    """

    def __init__(self, gen: Any, raw: Any, settings: Any, num: int, batch_size: int):
        super().__init__()
        self.net = gen.generator
        self.schedule, self.raw, self.settings = gen.schedule, raw, settings
        self.num, self.batch_size = num, batch_size

    def predict_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        indices = [min(i, self.num - 1) for i in range(rank, world * -(-self.num // world), world)]
        return DataLoader(indices, batch_size=self.batch_size, shuffle=False, collate_fn=torch.tensor)

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.settings
        noise = seeded_noise([s.seed + int(i) for i in batch], self.net.sample_shape, s.temperature,
                             self.net.config.window)
        raw = tuple(r.to(self.device) for r in self.raw) if isinstance(self.raw, tuple) else self.raw.to(self.device)
        seeds = [s.seed + int(i) for i in batch]
        latent = seeded_latent_noise(seeds, self.net.sample_shape, s.latent_noise) if s.latent_noise > 0 else None
        steps = seeded_step_noise(seeds, self.net.sample_shape, s.steps) if s.sampler == "ddpm" else None
        tokens = sample_tokens(self.net, raw, len(batch), self.schedule, steps=s.steps, sampler=s.sampler,
                               guidance=s.guidance, noise=noise.to(self.device), latent_noise=latent,
                               step_noise=steps)
        batch = batch.to(self.device)
        if self.trainer.world_size > 1:
            batch, tokens = self.all_gather(batch).flatten(0, 1), self.all_gather(tokens).flatten(0, 1)
        return batch.cpu(), tokens.cpu()


def predict_tokens(gen: Any, cond: Any, num: int, settings: Any, *, devices: int, batch_size: int = 64,
                   progress: bool = True, trainer_kwargs: dict | None = None) -> torch.Tensor:
    """Tokens (num, L, D) for one condition, sampled over ``devices`` through the predict loop.

    Args:
        gen: a loaded generator; cond: a :class:`weightdiff.sampling.Condition`.
        trainer_kwargs: more ``lightning.Trainer`` arguments (``accelerator``, ``strategy``, ...).
    """
    kwargs = dict(accelerator="auto", devices=devices, logger=False, enable_checkpointing=False,
                  enable_progress_bar=progress, enable_model_summary=False, use_distributed_sampler=False)
    with quiet_library_chatter():  # no device banner, tips or deprecation notes for a sampling run
        trainer = L.Trainer(**{**kwargs, **(trainer_kwargs or {})})
        outs = trainer.predict(TokenPredictor(gen, cond.raw, settings, num, batch_size))
    if outs is None:
        raise ValueError(f"predict_tokens: the strategy {type(trainer.strategy).__name__} does not return "
                         "predictions (spawn / fork launchers); use DDP started by a script or the CLI")
    index = torch.cat([i for i, _ in outs])
    tokens = torch.cat([t for _, t in outs])
    # Filled-up ranks repeat the last index: keep one copy of each, in index order.
    order = torch.argsort(index, stable=True)
    keep = torch.ones(len(order), dtype=torch.bool)
    keep[1:] = index[order][1:] != index[order][:-1]
    return tokens[order[keep]]
