"""Training objectives over noise levels: loss weighting, timestep sampling, on-path states.

- :func:`loss_weight`: per-sample weight of the denoising MSE as a function of the noise level.
  ``"min_snr"`` is Min-SNR-γ (Hang et al. 2023, eq. 13): the x0-space weight min(SNR_t, γ),
  expressed in the parameterisation being regressed (÷ SNR for ε, ÷ (SNR + 1) for v, × σ² for the
  flow velocity), so no noise level dominates the gradient. ``"none"`` weights every sample by 1.
- :func:`sample_timesteps`: t ~ U{0..T-1} after a shift of the continuous level u ∈ (0, 1),
  u' = s·u / (1 + (s − 1)·u) (the resolution shift of Esser et al. 2024, eq. 23): s > 1 spends
  more of the budget at high noise, s < 1 at low noise, s = 1 is uniform. :func:`sample_sigmas`
  is the continuous level itself, the σ of flow matching.
- :func:`sampler_states`: the states a multi-step sampler visits from pure noise, for an
  *on-path* functional loss: the network's clean estimate on the inputs it meets when sampling
  (its own earlier estimates, noised) is trained to work in the target network, not only its
  estimate on noised zoo entries. This is what makes the last step of a K-step sampler — whose
  output is the sample — a trained quantity.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import islice
from typing import Literal

import torch

from weightdiff.models.schedule import PredictionType, SamplerName, ScheduleConfig, reverse_process

LossWeighting = Literal["none", "min_snr"]


def loss_weight(alpha_bar: torch.Tensor, scheme: LossWeighting, prediction_type: PredictionType,
                gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight (B,) of the denoising loss at signal shares ``alpha_bar`` (B,).

    ``alpha_bar`` is a_t² / (a_t² + s_t²) (:attr:`~weightdiff.models.schedule.NoiseLevel.share`):
    ᾱ_t under DDPM, so SNR_t = ᾱ / (1 - ᾱ) under either objective.
    """
    if scheme == "none":
        return torch.ones_like(alpha_bar)
    if scheme != "min_snr":
        raise ValueError(f"loss weighting must be 'none' or 'min_snr', got {scheme!r}")
    snr = alpha_bar / (1 - alpha_bar).clamp_min(1e-12)  # SNR_t = ᾱ / (1 - ᾱ)
    w = snr.clamp(max=gamma)  # x0-space weight
    if prediction_type == "epsilon":
        return w / snr.clamp_min(1e-12)
    if prediction_type == "v_prediction":
        return w / (snr + 1)
    if prediction_type == "flow_prediction":  # x̂0 = x_t - σ v, and on the flow path σ = 1 / (1 + sqrt(SNR))
        return w / (1 + snr.sqrt()).square()
    return w


def sample_sigmas(batch: int, shift: float = 1.0, *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Continuous noise levels (batch,) in [0, 1): u ~ U[0, 1) after the shift u' = s·u / (1 + (s − 1)·u)."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    u = torch.rand(batch, device=device, generator=generator)
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


def sample_timesteps(batch: int, num_train_timesteps: int, shift: float = 1.0, *,
                     device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> torch.Tensor:
    """Integer timesteps (batch,) in [0, T); uniform for ``shift`` = 1."""
    if shift == 1.0:
        return torch.randint(0, num_train_timesteps, (batch,), device=device, generator=generator)
    u = sample_sigmas(batch, shift, device=device, generator=generator)
    return (u * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)


@torch.no_grad()
def sampler_states(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                   schedule: ScheduleConfig, *, steps: int, stop: int, sampler: SamplerName = "ddim",
                   valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``stop`` steps of a ``steps``-step sampler from ``noise``; return the state and its timestep.

    Args:
        model_fn: ``(x_t (B, L, D), t (B,)) -> output`` (no gradient is taken here).
        noise: x_T (B, L, D).
        stop: how many sampler steps to take first, in [0, steps): 0 returns x_T at pure noise.
        valid: (L, D) padding mask, applied as in :func:`weightdiff.models.schedule.denoise`.
    Returns:
        ``(x_t (B, L, D), t (B,))``: the input of the sampler's step number ``stop`` (``t`` long
        for DDPM, σ · T for flow matching).
    """
    if not 0 <= stop < steps:
        raise ValueError(f"stop must be in [0, {steps}), got {stop}")
    # The model is evaluated only for the states before ``stop``: the process is lazy.
    return next(islice(reverse_process(model_fn, noise, schedule, steps=steps, sampler=sampler, valid=valid),
                       stop, None))
