"""Training objectives: Min-SNR weights, shifted timestep sampling, states along a sampler's path."""

from __future__ import annotations

import math

import pytest
import torch

from weightdiff.models.schedule import ScheduleConfig, denoise
from weightdiff.training.objectives import loss_weight, sample_timesteps, sampler_states


def test_min_snr_weight_in_each_parameterisation():
    a = torch.tensor([0.999, 0.8, 0.5, 0.01])
    snr = a / (1 - a)
    # The same float32 operations as the formulas below (the clamps do not bind here): exact.
    x0 = loss_weight(a, "min_snr", "sample", gamma=5.0)
    torch.testing.assert_close(x0, torch.minimum(snr, torch.tensor(5.0)), rtol=0, atol=0)
    torch.testing.assert_close(loss_weight(a, "min_snr", "epsilon", gamma=5.0), x0 / snr, rtol=0, atol=0)
    torch.testing.assert_close(loss_weight(a, "min_snr", "v_prediction", gamma=5.0), x0 / (snr + 1), rtol=0, atol=0)
    assert torch.equal(loss_weight(a, "none", "sample"), torch.ones(4))
    with pytest.raises(ValueError, match="min_snr"):
        loss_weight(a, "edm", "sample")


def test_timestep_shift_moves_the_budget_and_stays_in_range():
    g = lambda: torch.Generator().manual_seed(0)
    uniform = sample_timesteps(20000, 1000, 1.0, generator=g())
    high = sample_timesteps(20000, 1000, 3.0, generator=g())
    low = sample_timesteps(20000, 1000, 1 / 3, generator=g())
    for t in (uniform, high, low):
        assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) <= 999
    # E[u'] for u ~ U(0, 1): ~0.5 uniform; s = 3 gives ~0.70, s = 1/3 gives ~0.30 (standard error ~0.002)
    assert abs(uniform.float().mean() / 1000 - 0.5) < 0.01
    assert high.float().mean() / 1000 > 0.65 and low.float().mean() / 1000 < 0.35


@pytest.mark.parametrize("ptype", ["sample", "epsilon"])
def test_sampler_states_are_the_states_the_sampler_visits(ptype):
    """Stopping after k steps and finishing with the remaining steps reproduces the full run."""
    schedule = ScheduleConfig(prediction_type=ptype)
    alphas = schedule.training_scheduler().alphas_cumprod
    valid = torch.tensor([[True, True], [True, False]])
    seen = []

    def fn(x, t):
        seen.append((x.clone(), t.clone()))
        x0 = torch.tanh(x.mean(dim=(1, 2), keepdim=True)) + torch.zeros_like(x)
        a = alphas[t].view(-1, 1, 1)
        return x0 if ptype == "sample" else (x - a.sqrt() * x0) / (1 - a).sqrt()

    noise = torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(1))
    denoise(fn, (3, 2, 2), schedule, steps=6, noise=noise, valid=valid)
    visited = list(seen)
    for k in (0, 2, 5):
        seen.clear()
        x_k, t_k = sampler_states(fn, noise, schedule, steps=6, stop=k, valid=valid)
        assert torch.equal(t_k, visited[k][1])
        torch.testing.assert_close(x_k, visited[k][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="stop"):
        sampler_states(fn, noise, schedule, steps=6, stop=6)


def test_fit_with_every_objective_option_trains_the_on_path_loss(tiny_lora_zoo, tmp_path):
    """Min-SNR weights, a timestep shift and the on-path functional loss together: the run
    completes and logs a finite on-path loss that training lowers."""
    import csv

    from conftest import fit_args
    from weightdiff.training.lightning_cli import run_lightning_cli

    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", "40", "--trainer.log_every_n_steps", "1",
                               "--model.loss_weighting", "min_snr", "--model.timestep_shift", "2.0",
                               "--model.path_functional_weight", "1.0", "--model.sampler", "ddim",
                               "--model.num_inference_steps", "3"))
    rows = list(csv.DictReader(next(tmp_path.glob("**/metrics.csv")).open()))
    path = [float(r["train/path_functional_loss"]) for r in rows if r.get("train/path_functional_loss")]
    assert len(path) >= 30 and all(math.isfinite(v) for v in path)
    first, last = sum(path[:10]) / 10, sum(path[-10:]) / 10
    assert last < first, (first, last)
