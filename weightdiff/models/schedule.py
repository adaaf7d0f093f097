"""Noise schedules and the reverse process, built on diffusers schedulers.

Training noise comes from :class:`diffusers.DDPMScheduler`; sampling uses DDIM or DPM-Solver++
built from that scheduler's own configuration with ``from_config``, so an exported
``scheduler/scheduler_config.json`` is all a sampler needs. ``clip_sample=False`` is passed
explicitly: the diffusers default clamps samples to [-1, 1], which silently destroys normalised
weights whose tails lie beyond one standard deviation.

The reverse process (:func:`denoise`) is a plain function over a ``model_fn(x_t, t) -> output``
closure, so the Lightning module, the validation callback and the sampler share it.

The default sampler and its number of steps are defined here, once
(:data:`DEFAULT_SAMPLER`, :data:`DEFAULT_NUM_INFERENCE_STEPS`): the training module's defaults,
the exported ``model_index.json`` and every sampling function read them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

PredictionType = Literal["epsilon", "sample", "v_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
SamplerName = Literal["ddim", "dpm", "x0"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)

#: The sampler a generator is validated and sampled with unless told otherwise.
DEFAULT_SAMPLER: SamplerName = "ddim"
#: Its number of reverse steps (``"x0"`` ignores it: one step from pure noise).
DEFAULT_NUM_INFERENCE_STEPS = 20


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule shared by training and sampling.

    Exported generators store it as the training :class:`~diffusers.DDPMScheduler`'s own
    ``scheduler_config.json`` (:meth:`training_scheduler`); :meth:`from_scheduler_config` reads
    it back and refuses any configuration this class would not have written.
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = "squaredcos_cap_v2"
    prediction_type: PredictionType = "sample"

    def to_dict(self) -> dict:
        return asdict(self)

    def training_scheduler(self) -> DDPMScheduler:
        """The DDPM scheduler of the forward process (``add_noise``, ``get_velocity``)."""
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type=self.prediction_type, clip_sample=False)

    def sampling_scheduler(self, sampler: SamplerName):
        """DDIM (``"ddim"``, ``"x0"``) or DPM-Solver++ (``"dpm"``), from the training scheduler's config."""
        config = self.training_scheduler().config
        if sampler in ("ddim", "x0"):
            # timestep_spacing="trailing" makes the first step start at t = T - 1 (pure noise).
            return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True,
                                             timestep_spacing="trailing")
        if sampler == "dpm":
            # variance_type belongs to DDPM ("fixed_small"); DPM-Solver reads it as a learned-variance switch.
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                           timestep_spacing="trailing", variance_type=None)
        raise ValueError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], source: str = "scheduler config") -> ScheduleConfig:
        """The schedule of a saved DDPM scheduler config; raises ``ValueError`` naming ``source`` and the key
        when the config holds anything :meth:`training_scheduler` would not have written (e.g. ``clip_sample``)."""
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in config]
        if missing:
            raise ValueError(f"{source}: missing key '{missing[0]}'")
        schedule = cls(**{k: config[k] for k in names})
        expected = dict(schedule.training_scheduler().config)
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in expected:
                raise ValueError(f"{source}: unknown key '{key}'")
            if value != expected[key] and not (isinstance(value, list) and tuple(value) == expected[key]):
                raise ValueError(f"{source}: '{key}' is {value!r}, expected {expected[key]!r}")
        return schedule


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


def output_from_x0(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                   prediction_type: PredictionType) -> torch.Tensor:
    """The denoiser output in ``prediction_type`` that corresponds to a clean estimate ``x0``.

    Inverts :func:`predicted_x0`: ε = (x_t - sqrt(ᾱ) x0) / sqrt(1 - ᾱ), v = (sqrt(ᾱ) x_t - x0) / sqrt(1 - ᾱ).
    """
    if prediction_type == "sample":
        return x0
    a = alpha_bar_t.to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
    sigma = (1 - a).sqrt().clamp_min(1e-12)
    if prediction_type == "epsilon":
        return (x_t - a.sqrt() * x0) / sigma
    if prediction_type == "v_prediction":
        return (a.sqrt() * x_t - x0) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def mask_padding(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                 prediction_type: PredictionType, valid: torch.Tensor) -> torch.Tensor:
    """``output`` with the clean estimate set to 0 on padded token entries (``valid`` False).

    Padding is 0 in every training token, so its clean value is known exactly; what the network
    outputs there was never trained (the loss masks it) and must not flow back through the
    sampler. The mask acts on x̂0, then the output is converted back to ``prediction_type``;
    valid entries are returned untouched.

    Args:
        output, x_t: (B, L, D); alpha_bar_t: (B,); valid: (L, D) bool.
    """
    x0 = predicted_x0(output, x_t, alpha_bar_t, prediction_type).masked_fill(~valid, 0.0)
    return torch.where(valid, output, output_from_x0(x0, x_t, alpha_bar_t, prediction_type))


@torch.no_grad()
def denoise(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
            schedule: ScheduleConfig, *, steps: int = DEFAULT_NUM_INFERENCE_STEPS,
            sampler: SamplerName = DEFAULT_SAMPLER,
            generator: torch.Generator | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, noise: torch.Tensor | None = None,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse process from Gaussian noise to clean tokens.

    Args:
        model_fn: ``(x_t (B, L, D), t (B,) long) -> output (B, L, D)``; guidance is applied inside.
        shape: ``(B, L, D)``.
        steps: number of sampler steps (ignored by ``"x0"``, which is one deterministic step:
            the clean estimate from pure noise at t = T - 1).
        generator: CPU generator for the initial noise (reproducible across devices).
        noise: the initial noise x_T itself (B, L, D), e.g. drawn per sample from its own seed so
            a sample does not depend on how samples were batched; overrides ``generator``.
        valid: (L, D) bool, False on padded token entries: their clean estimate is set to 0 at
            every step (:func:`mask_padding`) and they are 0 in the result.

    Returns:
        x0 tokens (B, L, D).
    """
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    x = noise.to(device=device, dtype=dtype)
    alphas_cumprod = schedule.training_scheduler().alphas_cumprod.to(device)
    if valid is not None:
        valid = valid.to(device)
    if sampler == "x0":
        t = torch.full((shape[0],), schedule.num_train_timesteps - 1, dtype=torch.long, device=device)
        x0 = predicted_x0(model_fn(x, t), x, alphas_cumprod[t], schedule.prediction_type)
        return x0 if valid is None else x0.masked_fill(~valid, 0.0)
    for x, _ in reverse_process(model_fn, x, schedule, steps=steps, sampler=sampler, valid=valid):
        pass
    return x


def reverse_process(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                    schedule: ScheduleConfig, *, steps: int, sampler: SamplerName,
                    valid: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The states of a multi-step sampler (``"ddim"`` or ``"dpm"``) from ``noise`` x_T (B, L, D).

    Yields ``(x_t, t (B,))``, the model's input before each of the ``steps`` evaluations (the
    model runs only when the next state is asked for), then ``(x0, None)``: the sample, 0 on
    padding when ``valid`` (L, D) is given (see :func:`denoise`).
    """
    device = noise.device
    alphas_cumprod = schedule.training_scheduler().alphas_cumprod.to(device)
    scheduler = schedule.sampling_scheduler(sampler)
    scheduler.set_timesteps(steps, device=device)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        tt = torch.full((noise.shape[0],), int(t), dtype=torch.long, device=device)
        x_in = scheduler.scale_model_input(x, t)
        yield x_in, tt
        out = model_fn(x_in, tt)
        if valid is not None:
            out = mask_padding(out, x_in, alphas_cumprod[tt], schedule.prediction_type, valid)
        x = scheduler.step(out, t, x).prev_sample
    yield (x if valid is None else x.masked_fill(~valid, 0.0)), None
