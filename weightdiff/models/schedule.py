"""Noise schedules and the reverse process, built on diffusers schedulers.

Training noise comes from :class:`diffusers.DDPMScheduler`; sampling uses DDIM or DPM-Solver++
built from the same configuration. ``clip_sample=False`` is passed explicitly everywhere: the
diffusers default clamps samples to [-1, 1], which silently destroys normalised weights whose
tails lie beyond one standard deviation.

The reverse process (:func:`denoise`) is a plain function over a ``model_fn(x_t, t) -> output``
closure, so the Lightning module, the validation callback and the sampler share it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

PredictionType = Literal["epsilon", "sample", "v_prediction"]
SamplerName = Literal["ddim", "dpm", "x0"]


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule shared by training and sampling (saved with every exported model)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: PredictionType = "sample"

    def to_dict(self) -> dict:
        return asdict(self)

    def training_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type=self.prediction_type, clip_sample=False)

    def sampling_scheduler(self, sampler: SamplerName):
        common = dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                      prediction_type=self.prediction_type)
        if sampler in ("ddim", "x0"):
            # timestep_spacing="trailing" makes the first step start at t = T - 1 (pure noise).
            return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
        if sampler == "dpm":
            return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                               timestep_spacing="trailing")
        raise ValueError(f"sampler must be one of 'ddim', 'dpm', 'x0'; got {sampler!r}")


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                 prediction_type: PredictionType) -> torch.Tensor:
    """Clean-sample estimate x̂0 from a denoiser output (DDPM eq. 15; v-param. of Salimans & Ho 2022).

    Args:
        output: denoiser output (B, L, D) in the parameterisation ``prediction_type``.
        x_t: noisy input (B, L, D).
        alpha_bar_t: cumulative alpha ᾱ_t per sample (B,).
    """
    a = alpha_bar_t.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
    if prediction_type == "sample":
        return output
    if prediction_type == "epsilon":  # x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ)
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    if prediction_type == "v_prediction":  # x0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v
        return a.sqrt() * x_t - (1 - a).sqrt() * output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


@torch.no_grad()
def denoise(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
            schedule: ScheduleConfig, *, steps: int = 25, sampler: SamplerName = "ddim",
            generator: torch.Generator | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse process from Gaussian noise to clean tokens.

    Args:
        model_fn: ``(x_t (B, L, D), t (B,) long) -> output (B, L, D)``; guidance is applied inside.
        shape: ``(B, L, D)``.
        steps: number of sampler steps (ignored by ``"x0"``, which is one deterministic step:
            the clean estimate from pure noise at t = T - 1).
        generator: CPU generator for the initial noise (reproducible across devices).
        noise: the initial noise x_T itself (B, L, D), e.g. drawn per sample from its own seed so
            a sample does not depend on how samples were batched; overrides ``generator``.

    Returns:
        x0 tokens (B, L, D).
    """
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    x = noise.to(device=device, dtype=dtype)
    if sampler == "x0":
        t = torch.full((shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long, device=device)
        ddpm = schedule.training_scheduler()
        alpha_bar = ddpm.alphas_cumprod.to(device)[t]
        return predicted_x0(model_fn(x, t), x, alpha_bar, schedule.prediction_type)
    scheduler = schedule.sampling_scheduler(sampler)
    scheduler.set_timesteps(steps, device=device)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
        out = model_fn(scheduler.scale_model_input(x, t), tt)
        x = scheduler.step(out, t, x).prev_sample
    return x
