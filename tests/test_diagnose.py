"""Denoiser diagnostics: the posterior-mean oracle and the distance helpers."""

from __future__ import annotations

import math

import torch

from weightdiff.evaluate.diagnose import masked_mse, nearest_distance, posterior_mean

VALID = torch.tensor([[True, True, True, True], [True, True, False, False]])  # (L=2, D=4)


def _zoo(m: int = 5, seed: int = 0) -> torch.Tensor:
    z = torch.randn(m, 2, 4, generator=torch.Generator().manual_seed(seed))
    return z.masked_fill(~VALID, 0.0)


def test_posterior_mean_matches_bayes_rule_by_hand():
    zoo, x_t, a = _zoo(), torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1)), 0.6
    got = posterior_mean(x_t, a, zoo, VALID)
    for n in range(3):
        logp = torch.tensor([-((x_t[n] - math.sqrt(a) * z)[VALID].double() ** 2).sum() / (2 * (1 - a)) for z in zoo])
        w = torch.softmax(logp, 0)
        want = sum(w[i] * zoo[i].double() for i in range(len(zoo))).float()
        torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)


def test_posterior_mean_limits_copy_at_low_noise_and_average_at_high_noise():
    zoo = _zoo()
    near = posterior_mean(math.sqrt(0.9999) * zoo[2:3], 0.9999, zoo, VALID)
    torch.testing.assert_close(near, zoo[2:3], rtol=0, atol=1e-5)  # a copy of the entry: the memorising oracle
    far = posterior_mean(torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(4)), 1e-14, zoo, VALID)
    torch.testing.assert_close(far[0], zoo.mean(0), rtol=0, atol=1e-5)  # the zoo average


def test_padding_takes_no_part_in_the_posterior_or_the_errors():
    zoo = _zoo()
    x_t = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(3))
    noisy_pad = x_t.clone()
    noisy_pad[:, ~VALID] = 100.0
    torch.testing.assert_close(posterior_mean(x_t, 0.5, zoo, VALID), posterior_mean(noisy_pad, 0.5, zoo, VALID))
    assert torch.equal(masked_mse(x_t, zoo[:2], VALID), masked_mse(noisy_pad, zoo[:2], VALID))
    assert torch.equal(nearest_distance(x_t, zoo, VALID), nearest_distance(noisy_pad, zoo, VALID))
    assert torch.equal(nearest_distance(zoo[1:2], zoo, VALID), torch.zeros(1))
