"""Noise schedules and the reverse process, built on diffusers schedulers.

Two forward processes (``objective``), both of the form x_t = a_t x0 + s_t ε (:class:`NoiseLevel`):

- ``"ddpm"`` (Ho et al. 2020, eq. 4): a_t = sqrt(ᾱ_t), s_t = sqrt(1 - ᾱ_t), from a
  :class:`diffusers.DDPMScheduler`; sampled with DDIM or DPM-Solver++ built from that scheduler's
  own configuration with ``from_config``. ``clip_sample=False`` is passed explicitly: the
  diffusers default clamps samples to [-1, 1], which silently destroys normalised weights whose
  tails lie beyond one standard deviation.
- ``"flow_matching"`` (rectified flow: Liu et al. 2023; Esser et al. 2024): a = 1 - σ,
  s = σ for σ ∈ [0, 1]; the path's velocity is v = dx_σ/dσ = ε - x0 (``flow_prediction``), and
  samples are Euler steps of dx/dσ = v from σ = 1 to 0 with a
  :class:`diffusers.FlowMatchEulerDiscreteScheduler`. The denoiser's timestep is σ · T.

An exported ``scheduler/scheduler_config.json`` (the scheduler's own config) is all a sampler needs.
:func:`predicted_x0`, :func:`output_from_x0` and :func:`mask_padding` are written once over
(a_t, s_t). The reverse process (:func:`denoise`) is a plain function over a
``model_fn(x_t, t) -> output`` closure, so the Lightning module, the validation callback and the
sampler share it.

The default sampler of each objective and the number of steps are defined here, once
(:data:`DEFAULT_SAMPLERS`, :data:`DEFAULT_NUM_INFERENCE_STEPS`): the training module's defaults,
the exported ``model_index.json`` and every sampling function read them from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any, Literal, get_args

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from weightdiff.errors import ConditionError

Objective = Literal["ddpm", "flow_matching"]
OBJECTIVES: tuple[str, ...] = get_args(Objective)
PredictionType = Literal["epsilon", "sample", "v_prediction", "flow_prediction"]
BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
SamplerName = Literal["ddim", "ddpm", "dpm", "euler", "x0"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)

#: The diffusers scheduler class each objective is exported as (``scheduler/``, ``model_index.json``).
SCHEDULER_CLASSES: dict[str, type[SchedulerMixin]] = {"ddpm": DDPMScheduler,
                                                      "flow_matching": FlowMatchEulerDiscreteScheduler}
#: What the denoiser may output under each objective. Flow matching regresses its own velocity
#: ε - x0 (``flow_prediction``) or x0: from ε, x̂0 = (x_t - σ ε) / (1 - σ) is undefined at σ = 1,
#: where its sampler starts, and DDPM's v assumes a² + s² = 1.
PREDICTION_TYPES: dict[str, tuple[str, ...]] = {"ddpm": ("epsilon", "sample", "v_prediction"),
                                                "flow_matching": ("flow_prediction", "sample")}
#: The samplers of each objective (``"x0"``: the one-step clean estimate from pure noise; ``"ddpm"``:
#: ancestral sampling, DDIM's step with η = 1, fresh noise at every step).
OBJECTIVE_SAMPLERS: dict[str, tuple[str, ...]] = {"ddpm": ("ddim", "ddpm", "dpm", "x0"),
                                                  "flow_matching": ("euler", "x0")}
#: The sampler a generator is validated and sampled with unless told otherwise, per objective.
DEFAULT_SAMPLERS: dict[str, SamplerName] = {"ddpm": "ddim", "flow_matching": "euler"}
DEFAULT_SAMPLER: SamplerName = DEFAULT_SAMPLERS["ddpm"]
#: The number of reverse steps (``"x0"`` ignores it: one step from pure noise).
DEFAULT_NUM_INFERENCE_STEPS = 20

_DEFAULT_BETA_SCHEDULE: BetaSchedule = "squaredcos_cap_v2"
#: The fields each objective's scheduler config records (the rest keep their defaults).
_SAVED_FIELDS = {"ddpm": ("num_train_timesteps", "beta_schedule", "prediction_type"),
                 "flow_matching": ("num_train_timesteps", "shift", "prediction_type")}


@dataclass(frozen=True)
class NoiseLevel:
    """The forward process x_t = a_t x0 + s_t ε at a batch of noise levels.

    Each field is a (B,) tensor, or a float for one level.

    Attributes:
        signal: a_t (DDPM: sqrt(ᾱ_t); flow: 1 - σ).
        variance: s_t² (DDPM: 1 - ᾱ_t; flow: σ²).
        share: the signal's share a_t² / (a_t² + s_t²), so SNR = share / (1 - share) (DDPM: ᾱ_t
            itself, kept rather than recomputed so that weights by ᾱ_t round as they always did).
    """

    signal: torch.Tensor | float
    variance: torch.Tensor | float
    share: torch.Tensor | float

    @classmethod
    def from_alpha_bar(cls, alpha_bar: torch.Tensor | float) -> NoiseLevel:
        """DDPM at cumulative alphas ᾱ_t."""
        root = alpha_bar.sqrt() if isinstance(alpha_bar, torch.Tensor) else math.sqrt(alpha_bar)
        return cls(root, 1 - alpha_bar, alpha_bar)

    @classmethod
    def from_sigma(cls, sigma: torch.Tensor | float) -> NoiseLevel:
        """Rectified flow at σ ∈ [0, 1]."""
        a, v = 1 - sigma, sigma * sigma
        return cls(a, v, a * a / (a * a + v))

    @property
    def noise(self) -> torch.Tensor | float:
        """s_t."""
        return self.variance.sqrt() if isinstance(self.variance, torch.Tensor) else math.sqrt(self.variance)


def as_noise_level(level: NoiseLevel | torch.Tensor | float) -> NoiseLevel:
    """``level`` itself, or the DDPM level of a bare ᾱ_t (tensor (B,) or float)."""
    return level if isinstance(level, NoiseLevel) else NoiseLevel.from_alpha_bar(level)


@dataclass(frozen=True)
class ScheduleConfig:
    """The noise schedule shared by training and sampling.

    Exported generators store it as the training scheduler's own ``scheduler_config.json``
    (:meth:`training_scheduler`); :meth:`from_scheduler_config` reads it back and refuses any
    configuration this class would not have written.

    Args:
        num_train_timesteps: T; the denoiser's timesteps lie in [0, T) (DDPM) or are σ · T (flow).
        beta_schedule: (ddpm) the diffusers beta schedule; flow matching keeps the default.
        prediction_type: the denoiser's output, one of :data:`PREDICTION_TYPES` of the objective.
        objective: the forward process, ``"ddpm"`` or ``"flow_matching"``.
        shift: (flow_matching) the Euler sampler's σ shift σ' = s·σ / (1 + (s - 1)·σ)
            (FlowMatchEulerDiscreteScheduler's ``shift``); 1 for ddpm.
    """

    num_train_timesteps: int = 1000
    beta_schedule: BetaSchedule = _DEFAULT_BETA_SCHEDULE
    prediction_type: PredictionType = "sample"
    objective: Objective = "ddpm"
    shift: float = 1.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        allowed = PREDICTION_TYPES[self.objective]
        if self.prediction_type not in allowed:
            raise ValueError(f"prediction_type {self.prediction_type!r} does not apply to objective "
                             f"{self.objective!r}; it takes one of {allowed}")
        if self.objective == "flow_matching" and self.beta_schedule != _DEFAULT_BETA_SCHEDULE:
            raise ValueError(f"beta_schedule {self.beta_schedule!r} does not apply to objective 'flow_matching' "
                             "(its path is x_t = (1 - σ) x0 + σ ε); leave it at its default")
        if self.objective == "ddpm" and self.shift != 1.0:
            raise ValueError(f"shift {self.shift!r} applies to objective 'flow_matching' only; ddpm needs 1.0")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {self.shift!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def training_scheduler(self) -> SchedulerMixin:
        """The scheduler of the training objective, saved as ``scheduler/``.

        DDPM: the scheduler of the forward process (``add_noise``, ``get_velocity``). Flow matching:
        the Euler scheduler, with ``prediction_type`` added to its config (the scheduler itself
        steps with velocities; the sampler converts other outputs).
        """
        if self.objective == "flow_matching":
            scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)
            scheduler.register_to_config(prediction_type=self.prediction_type)
            return scheduler
        return DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule,
                             prediction_type=self.prediction_type, clip_sample=False)

    @cached_property
    def _alphas_cumprod(self) -> torch.Tensor:
        return self.training_scheduler().alphas_cumprod

    def default_sampler(self, sampler: SamplerName | None = None) -> SamplerName:
        """``sampler`` once checked (:meth:`check_sampler`); None: the objective's default."""
        sampler = DEFAULT_SAMPLERS[self.objective] if sampler is None else sampler
        self.check_sampler(sampler)
        return sampler

    def check_sampler(self, sampler: str) -> None:
        """Raise :class:`~weightdiff.errors.ConditionError` unless ``sampler`` samples this objective."""
        if sampler not in SAMPLERS:
            raise ConditionError(f"sampler must be one of {SAMPLERS}; got {sampler!r}")
        if sampler not in OBJECTIVE_SAMPLERS[self.objective]:
            raise ConditionError(f"sampler {sampler!r} does not sample a generator of objective {self.objective!r}; "
                                 f"its samplers are {OBJECTIVE_SAMPLERS[self.objective]}")

    def sampling_scheduler(self, sampler: SamplerName):
        """DDIM (``"ddim"``, ``"ddpm"``: its step with η = 1, ``"x0"``), DPM-Solver++ (``"dpm"``) or flow Euler (``"euler"``), from the
        training scheduler's config."""
        self.check_sampler(sampler)
        config = self.training_scheduler().config
        if self.objective == "flow_matching":  # "euler" or "x0"
            return FlowMatchEulerDiscreteScheduler.from_config({k: v for k, v in config.items()
                                                                if k != "prediction_type"})
        if sampler in ("ddim", "ddpm", "x0"):
            # timestep_spacing="trailing" makes the first step start at t = T - 1 (pure noise).
            return DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True,
                                             timestep_spacing="trailing")
        # variance_type belongs to DDPM ("fixed_small"); DPM-Solver reads it as a learned-variance switch.
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing", variance_type=None)

    def noise_level(self, t: torch.Tensor | float, alphas_cumprod: torch.Tensor | None = None) -> NoiseLevel:
        """(a_t, s_t²) at denoiser timesteps ``t``: a (B,) tensor, or one number (then floats).

        DDPM: ``t`` indexes ᾱ (``alphas_cumprod``: that table on ``t``'s device, when the caller
        keeps one). Flow matching: σ = t / T.
        """
        if self.objective == "flow_matching":
            return NoiseLevel.from_sigma(t.float() / self.num_train_timesteps if isinstance(t, torch.Tensor)
                                         else t / self.num_train_timesteps)
        table = self._alphas_cumprod if alphas_cumprod is None else alphas_cumprod
        if isinstance(t, torch.Tensor):
            return NoiseLevel.from_alpha_bar(table.to(t.device)[t.long()])
        return NoiseLevel.from_alpha_bar(float(table[int(t)]))

    def pure_noise(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, NoiseLevel]:
        """The denoiser timesteps (B,) of pure noise and their level: t = T - 1 (DDPM), σ = 1 (flow)."""
        if self.objective == "flow_matching":
            t = torch.full((batch,), float(self.num_train_timesteps), device=device)
            return t, NoiseLevel.from_sigma(torch.ones(batch, device=device))
        t = torch.full((batch,), self.num_train_timesteps - 1, dtype=torch.long, device=device)
        return t, self.noise_level(t)

    @classmethod
    def from_scheduler(cls, scheduler: SchedulerMixin, source: str = "scheduler") -> ScheduleConfig:
        """The schedule of a scheduler object (its class names the objective); see :meth:`from_scheduler_config`."""
        objective = next((o for o, c in SCHEDULER_CLASSES.items() if type(scheduler) is c), None)
        if objective is None:
            raise ValueError(f"{source}: a {type(scheduler).__name__}, expected one of "
                             f"{[c.__name__ for c in SCHEDULER_CLASSES.values()]}")
        return cls.from_scheduler_config(scheduler.config, source, objective)

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any], source: str = "scheduler config",
                              objective: Objective | None = None) -> ScheduleConfig:
        """The schedule of a saved scheduler config; raises ``ValueError`` naming ``source`` and the key
        when the config holds anything :meth:`training_scheduler` would not have written (e.g. ``clip_sample``).

        Args:
            objective: the forward process the config belongs to; None: the one whose scheduler
                class the config's ``_class_name`` names (a config without one is DDPM's).
        """
        if objective is None:
            name = config.get("_class_name", DDPMScheduler.__name__)
            objective = next((o for o, c in SCHEDULER_CLASSES.items() if c.__name__ == name), None)
            if objective is None:
                raise ValueError(f"{source}: '_class_name' is {name!r}, expected one of "
                                 f"{[c.__name__ for c in SCHEDULER_CLASSES.values()]}")
        names = _SAVED_FIELDS[objective]
        missing = [k for k in names if k not in config]
        if missing:
            raise ValueError(f"{source}: missing key '{missing[0]}'")
        try:
            schedule = cls(**{k: config[k] for k in names}, objective=objective)
        except ValueError as exc:
            raise ValueError(f"{source}: {exc}") from None
        expected = dict(schedule.training_scheduler().config)
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key not in expected:
                raise ValueError(f"{source}: unknown key '{key}'")
            if value != expected[key] and not (isinstance(value, list) and tuple(value) == expected[key]):
                raise ValueError(f"{source}: '{key}' is {value!r}, expected {expected[key]!r}")
        return schedule


def _per_sample(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    """A (B,) coefficient viewed to broadcast over x (B, ...) in its dtype; a float as it is."""
    if isinstance(value, torch.Tensor):
        return value.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return value


def _coefficients(level: NoiseLevel | torch.Tensor | float, x_t: torch.Tensor):
    """(a_t, s_t) broadcastable over ``x_t``; a bare ᾱ_t is taken in x_t's dtype first."""
    if not isinstance(level, NoiseLevel):
        level = NoiseLevel.from_alpha_bar(_per_sample(level, x_t))
    return _per_sample(level.signal, x_t), _per_sample(level.noise, x_t)


def predicted_x0(output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel | torch.Tensor | float,
                 prediction_type: PredictionType) -> torch.Tensor:
    """Clean-sample estimate x̂0 from a denoiser output (DDPM eq. 15; v-param. of Salimans & Ho 2022;
    the flow velocity v = ε - x0).

    Args:
        output: denoiser output (B, L, D) in the parameterisation ``prediction_type``.
        x_t: noisy input (B, L, D).
        level: the noise level of each sample (:class:`NoiseLevel`), or the DDPM ᾱ_t (B,).
    """
    if prediction_type == "sample":
        return output
    a, s = _coefficients(level, x_t)
    if prediction_type == "epsilon":  # x0 = (x_t - s ε) / a
        return (x_t - s * output) / a
    if prediction_type == "v_prediction":  # x0 = a x_t - s v  (a² + s² = 1)
        return a * x_t - s * output
    if prediction_type == "flow_prediction":  # x0 = x_t - σ v  (a = 1 - σ, s = σ)
        return x_t - s * output
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def output_from_x0(x0: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel | torch.Tensor | float,
                   prediction_type: PredictionType) -> torch.Tensor:
    """The denoiser output in ``prediction_type`` that corresponds to a clean estimate ``x0``.

    Inverts :func:`predicted_x0`: ε = (x_t - a x0) / s, v = (a x_t - x0) / s, flow v = (x_t - x0) / σ.
    """
    if prediction_type == "sample":
        return x0
    a, s = _coefficients(level, x_t)
    sigma = s.clamp_min(1e-12) if isinstance(s, torch.Tensor) else max(s, 1e-12)
    if prediction_type == "epsilon":
        return (x_t - a * x0) / sigma
    if prediction_type == "v_prediction":
        return (a * x_t - x0) / sigma
    if prediction_type == "flow_prediction":
        return (x_t - x0) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def mask_padding(output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel | torch.Tensor | float,
                 prediction_type: PredictionType, valid: torch.Tensor) -> torch.Tensor:
    """``output`` with the clean estimate set to 0 on padded token entries (``valid`` False).

    Padding is 0 in every training token, so its clean value is known exactly; what the network
    outputs there was never trained (the loss masks it) and must not flow back through the
    sampler. The mask acts on x̂0, then the output is converted back to ``prediction_type``;
    valid entries are returned untouched.

    Args:
        output, x_t: (B, L, D); level: :class:`NoiseLevel` or ᾱ_t (B,); valid: (L, D) bool.
    """
    x0 = predicted_x0(output, x_t, level, prediction_type).masked_fill(~valid, 0.0)
    return torch.where(valid, output, output_from_x0(x0, x_t, level, prediction_type))


@torch.no_grad()
def denoise(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple[int, ...],
            schedule: ScheduleConfig, *, steps: int = DEFAULT_NUM_INFERENCE_STEPS,
            sampler: SamplerName = DEFAULT_SAMPLER,
            generator: torch.Generator | None = None, device: torch.device | str = "cpu",
            dtype: torch.dtype = torch.float32, noise: torch.Tensor | None = None,
            valid: torch.Tensor | None = None, step_noise: torch.Tensor | None = None) -> torch.Tensor:
    """Run the reverse process from Gaussian noise to clean tokens.

    Args:
        model_fn: ``(x_t (B, L, D), t (B,)) -> output (B, L, D)``; guidance is applied inside. ``t``
            is long for DDPM, σ · T (float) for flow matching.
        shape: ``(B, L, D)``.
        steps: number of sampler steps (ignored by ``"x0"``, which is one deterministic step:
            the clean estimate from pure noise, at t = T - 1 or σ = 1).
        sampler: one of the objective's samplers (:data:`OBJECTIVE_SAMPLERS`).
        generator: CPU generator for the initial noise (reproducible across devices).
        noise: the initial noise x_T itself (B, L, D), e.g. drawn per sample from its own seed so
            a sample does not depend on how samples were batched; overrides ``generator``.
        valid: (L, D) bool, False on padded token entries: their clean estimate is set to 0 at
            every step (:func:`mask_padding`) and they are 0 in the result.
        step_noise: (``"ddpm"``) the fresh noise of every step (steps, B, L, D), e.g. drawn per
            sample from its own seed (:func:`weightdiff.models.generator.seeded_step_noise`);
            otherwise drawn from ``generator`` after x_T (or from torch's global generator).

    Returns:
        x0 tokens (B, L, D).
    """
    schedule.check_sampler(sampler)
    if noise is None:
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if sampler == "ddpm" and step_noise is None and generator is not None:
        step_noise = torch.randn((steps, *shape), generator=generator, dtype=torch.float32)
    x = noise.to(device=device, dtype=dtype)
    if valid is not None:
        valid = valid.to(device)
    if sampler == "x0":
        t, level = schedule.pure_noise(shape[0], device)
        x0 = predicted_x0(model_fn(x, t), x, level, schedule.prediction_type)
        return x0 if valid is None else x0.masked_fill(~valid, 0.0)
    if step_noise is not None:
        step_noise = step_noise.to(device=device, dtype=dtype)
    for x, _ in reverse_process(model_fn, x, schedule, steps=steps, sampler=sampler, valid=valid,
                                step_noise=step_noise):
        pass
    return x


def reverse_process(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                    schedule: ScheduleConfig, *, steps: int, sampler: SamplerName,
                    valid: torch.Tensor | None = None,
                    step_noise: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """The states of a multi-step sampler (``"ddim"``, ``"ddpm"``, ``"dpm"`` or ``"euler"``) from
    ``noise`` x_T (B, L, D).

    Yields ``(x_t, t (B,))``, the model's input before each of the ``steps`` evaluations (the
    model runs only when the next state is asked for), then ``(x0, None)``: the sample, 0 on
    padding when ``valid`` (L, D) is given (see :func:`denoise`). ``"ddpm"`` adds fresh noise at
    each step: ``step_noise[i]`` (steps, B, L, D) at step i, else a draw of torch's global generator.
    """
    if schedule.objective == "flow_matching":
        yield from _euler_process(model_fn, noise, schedule, steps=steps, sampler=sampler, valid=valid)
        return
    device = noise.device
    alphas_cumprod = schedule.training_scheduler().alphas_cumprod.to(device)
    scheduler = schedule.sampling_scheduler(sampler)
    scheduler.set_timesteps(steps, device=device)
    if step_noise is not None and (sampler != "ddpm" or tuple(step_noise.shape) != (steps, *noise.shape)):
        raise ValueError(f"step_noise is the ddpm sampler's, of shape {(steps, *noise.shape)}; got "
                         f"{tuple(step_noise.shape)} for sampler {sampler!r}")
    ancestral = {}
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((noise.shape[0],), int(t), dtype=torch.long, device=device)
        x_in = scheduler.scale_model_input(x, t)
        yield x_in, tt
        out = model_fn(x_in, tt)
        if valid is not None:
            out = mask_padding(out, x_in, NoiseLevel.from_alpha_bar(alphas_cumprod[tt]), schedule.prediction_type,
                               valid)
        if sampler == "ddpm":
            ancestral = {"eta": 1.0, "variance_noise": step_noise[i] if step_noise is not None else torch.randn_like(x)}
        x = scheduler.step(out, t, x, **ancestral).prev_sample
    yield (x if valid is None else x.masked_fill(~valid, 0.0)), None


def _euler_process(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                   schedule: ScheduleConfig, *, steps: int, sampler: SamplerName,
                   valid: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """:func:`reverse_process` for flow matching: x_{σ'} = x_σ + (σ' - σ) v̂ from σ = 1 down to 0."""
    if sampler != "euler":
        raise ValueError(f"the flow reverse process steps with 'euler', got {sampler!r}")
    device, b = noise.device, noise.shape[0]
    ptype = schedule.prediction_type
    scheduler = schedule.sampling_scheduler(sampler)
    scheduler.set_timesteps(steps, device=device)
    x = noise
    for i, t in enumerate(scheduler.timesteps):
        tt = torch.full((b,), float(t), device=device)  # σ · T
        level = NoiseLevel.from_sigma(scheduler.sigmas[i].to(device).expand(b))
        yield x, tt
        out = model_fn(x, tt)
        if valid is not None:
            out = mask_padding(out, x, level, ptype, valid)
        if ptype != "flow_prediction":  # the Euler step takes the velocity (x_σ - x̂0) / σ
            out = output_from_x0(predicted_x0(out, x, level, ptype), x, level, "flow_prediction")
        x = scheduler.step(out, t, x).prev_sample
    yield (x if valid is None else x.masked_fill(~valid, 0.0)), None
