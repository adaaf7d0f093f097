"""The reverse process: padded token entries never flow back through the sampler."""

from __future__ import annotations

import pytest
import torch

from weightdiff.models.schedule import ScheduleConfig, denoise, mask_padding, output_from_x0, predicted_x0

PREDICTION_TYPES = ("sample", "epsilon", "v_prediction")
VALID = torch.tensor([[True, True, True], [True, False, False]])  # (L=2, D=3): one token padded by 2
EPS = torch.finfo(torch.float32).eps


def _per_sample(a: torch.Tensor) -> torch.Tensor:
    return a.view(-1, 1, 1)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_output_from_x0_inverts_predicted_x0(ptype):
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(4, 2, 3, generator=g), torch.randn(4, 2, 3, generator=g)
    a = torch.tensor([0.9, 0.5, 0.1, 0.01])
    x0 = predicted_x0(out, x_t, a, ptype)
    # "sample" is the identity both ways. Otherwise about six float32 roundings, each of relative
    # size u on |x_t| or |out|, and those on |x_t| are divided by sigma = sqrt(1 - a) on the way back
    # (both directions use the same rounded sqrt(a) and sigma, so theirs cancel).
    atol = 0.0 if ptype == "sample" else 4 * EPS * float((x_t.abs() / _per_sample((1 - a).sqrt()) + out.abs()).max())
    torch.testing.assert_close(output_from_x0(x0, x_t, a, ptype), out, rtol=0, atol=atol)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
def test_mask_padding_zeroes_the_clean_estimate_on_padding_only(ptype):
    g = torch.Generator().manual_seed(1)
    x_t, out = torch.randn(3, 2, 3, generator=g), torch.randn(3, 2, 3, generator=g)
    a = torch.tensor([0.8, 0.3, 0.05])
    masked = mask_padding(out, x_t, a, ptype, VALID)
    assert torch.equal(masked[:, VALID], out[:, VALID])  # valid entries untouched, bit for bit
    x0 = predicted_x0(masked, x_t, a, ptype)
    # x0 = 0 converted to an output and back: "sample" is exact; otherwise a few roundings on |x_t|,
    # divided by sqrt(a) when epsilon is turned back into x0 (and by at most 1 for v)
    atol = 0.0 if ptype == "sample" else 4 * EPS * float((x_t.abs() / _per_sample(a.sqrt())).max())
    torch.testing.assert_close(x0[:, ~VALID], torch.zeros_like(x0[:, ~VALID]), rtol=0, atol=atol)


@pytest.mark.parametrize("ptype", PREDICTION_TYPES)
@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_what_the_model_outputs_on_padding_does_not_reach_the_samples(ptype, sampler):
    """Two models that differ only on padded outputs give the same samples once padding is masked.

    The model mixes every input entry into every output (like attention does), so without the
    mask the padded outputs would feed back through x_t into the valid entries.
    """
    schedule = ScheduleConfig(prediction_type=ptype)
    alphas = schedule.training_scheduler().alphas_cumprod

    def model(padding_value: float):
        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            target_x0 = torch.full_like(x, 0.5) + 0.1 * x.mean(dim=(1, 2), keepdim=True)
            out = output_from_x0(target_x0, x, alphas[t], ptype)
            return torch.where(VALID, out, torch.full_like(out, padding_value))
        return fn

    noise = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(2))
    run = lambda fn, valid: denoise(fn, (2, 2, 3), schedule, steps=10, sampler=sampler, noise=noise, valid=valid)
    quiet, loud = run(model(0.0), VALID), run(model(50.0), VALID)
    # the masked outputs do not depend on the padded ones at all: the two runs compute the same numbers
    torch.testing.assert_close(quiet, loud, rtol=0, atol=0)
    assert torch.equal(quiet[:, ~VALID], torch.zeros_like(quiet[:, ~VALID]))
    unmasked = run(model(50.0), None)
    assert (unmasked[:, VALID] - quiet[:, VALID]).abs().max() > 1e-2  # the leak the mask removes
