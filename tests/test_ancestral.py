"""The ``ddpm`` sampler (ancestral: DDIM's step with η = 1, fresh noise at every step): its step,
its per-sample noise, and where it is refused."""

from __future__ import annotations

import math

import pytest
import torch

from tests._tolerance import network_tol, steps_tol
from weightdiff.errors import ConditionError
from weightdiff.models.generator import load_generator, seeded_latent_noise, seeded_noise, seeded_step_noise
from weightdiff.models.schedule import ScheduleConfig, denoise, reverse_process
from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return load_generator(tiny_generator)


def _posterior_step(x_t, x0, noise, a_t, a_prev):
    """The DDPM posterior q(x_prev | x_t, x0) drawn with ``noise``: mean and std written out."""
    beta = 1 - a_t / a_prev
    mean = (math.sqrt(a_prev) * beta / (1 - a_t)) * x0 + (math.sqrt(a_t / a_prev) * (1 - a_prev) / (1 - a_t)) * x_t
    std = math.sqrt((1 - a_prev) / (1 - a_t) * beta)
    return mean + std * noise


def test_a_ddpm_step_is_the_posterior_given_the_clean_estimate():
    """With a model that returns a known x̂0, each step draws from q(x_prev | x_t, x̂0) with the
    given noise, and the last step (to ᾱ = 1) lands on x̂0 itself."""
    schedule = ScheduleConfig(prediction_type="sample")
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 4)
    x_t = torch.randn(2, 3, 4)
    steps = 4
    step_noise = torch.randn(steps, 2, 3, 4)
    states = [x for x, _ in reverse_process(lambda x, t: x0, x_t, schedule, steps=steps, sampler="ddpm",
                                            step_noise=step_noise)]
    scheduler = schedule.sampling_scheduler("ddpm")
    scheduler.set_timesteps(steps)
    table = schedule.training_scheduler().alphas_cumprod.double()
    ts = [int(t) for t in scheduler.timesteps]
    x = x_t.double()
    for i, t in enumerate(ts):
        a_t = float(table[t])
        a_prev = float(table[ts[i + 1]]) if i + 1 < steps else 1.0
        expected = _posterior_step(x, x0.double(), step_noise[i].double(), a_t, a_prev)
        # The step writes x_prev = √ᾱ_prev x̂0 + √(1 − ᾱ_prev − σ²) ε̂ + σ z in float32. Where the
        # posterior variance σ² nearly uses up 1 − ᾱ_prev (the first step, ᾱ_t ≈ 0), that root is
        # of a difference of O(1) numbers rounded to ~eps, so it is off by up to √(2 eps) times ε̂;
        # the remaining products and sums of O(1) values add a few eps each.
        eps = torch.finfo(torch.float32).eps
        eps_hat = (x - math.sqrt(a_t) * x0.double()) / math.sqrt(1 - a_t)
        atol = math.sqrt(2 * eps) * float(eps_hat.abs().max()) + 64 * eps
        torch.testing.assert_close(states[i + 1].double(), expected, rtol=0, atol=atol)
        x = states[i + 1].double()
    assert torch.equal(states[-1], x0)  # σ = 0 and the x̂0 coefficient 1 in the last step


def test_step_noise_of_the_wrong_shape_or_sampler_is_refused():
    schedule = ScheduleConfig(prediction_type="sample")
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="step_noise"):
        next(iter(reverse_process(lambda x, t: x, x, schedule, steps=3, sampler="ddpm",
                                  step_noise=torch.zeros(2, 2, 3, 4))))
    with pytest.raises(ValueError, match="step_noise"):
        next(iter(reverse_process(lambda x, t: x, x, schedule, steps=3, sampler="ddim",
                                  step_noise=torch.zeros(3, 2, 3, 4))))


def test_a_generator_draws_the_step_noise_after_x_t_so_seeded_runs_repeat():
    schedule = ScheduleConfig(prediction_type="sample")
    fn = lambda x, t: 0.5 * x  # noqa: E731
    run = lambda: denoise(fn, (2, 3, 4), schedule, steps=3, sampler="ddpm",  # noqa: E731
                          generator=torch.Generator().manual_seed(3))
    first, again = run(), run()
    assert torch.equal(first, again)
    deterministic = denoise(fn, (2, 3, 4), schedule, steps=3, sampler="ddim", generator=torch.Generator().manual_seed(3))
    assert not torch.equal(first, deterministic)


def test_each_samples_draws_come_from_its_own_seed_in_a_fixed_order():
    shape = (3, 4)
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(shape, generator=g) for _ in range(5)]
    assert torch.equal(seeded_noise([11], shape)[0], draws[0])
    assert torch.equal(seeded_latent_noise([11], shape, 1.0)[0], draws[1])
    steps = seeded_step_noise([5, 11], shape, 3)
    assert steps.shape == (3, 2, *shape)
    assert all(torch.equal(steps[i, 1], draws[2 + i]) for i in range(3))
    assert torch.equal(steps[:, 0], seeded_step_noise([5], shape, 3)[:, 0])  # not a function of the batch


def test_ddpm_samples_repeat_by_seed_and_do_not_depend_on_the_batch(gen):
    cond = make_condition(gen, task="rotdigits:angle=30")
    s = SamplerSettings(steps=3, seed=7, sampler="ddpm")
    a, _ = generate_tokens(gen, cond, 3, s, use_cache=False, progress=False)
    b, _ = generate_tokens(gen, cond, 3, s, use_cache=False, progress=False)
    assert torch.equal(a, b)
    d, _ = generate_tokens(gen, cond, 1, s, use_cache=False, batch_size=1, progress=False)
    # steps_tol's bound holds for η = 1: both coefficients stay in [0, 1] and the fresh noise is the same
    assert gen.schedule.prediction_type == "sample"
    tol = steps_tol(network_tol(gen.generator.denoiser, a), s.steps)
    torch.testing.assert_close(d[0], a[0], rtol=0, atol=tol)
    ddim, _ = generate_tokens(gen, cond, 1, SamplerSettings(steps=3, seed=7), use_cache=False, progress=False)
    assert float((ddim[0] - a[0]).abs().max()) > 100 * tol  # the fresh noise moves the sample


def test_the_ddpm_sampler_is_refused_where_it_does_not_apply(gen, monkeypatch):
    with pytest.raises(ConditionError, match="does not sample"):
        ScheduleConfig(objective="flow_matching", prediction_type="flow_prediction").check_sampler("ddpm")
    monkeypatch.setattr(gen.generator.config, "window", 2)
    cond = make_condition(gen, task="rotdigits:angle=30")
    with pytest.raises(ConditionError, match="window"):
        generate_tokens(gen, cond, 1, SamplerSettings(steps=2, sampler="ddpm"), use_cache=False, progress=False)
