"""Denoiser diagnostics: the posterior-mean oracle and the distance helpers."""

from __future__ import annotations

import json
import math

import torch

from weightdiff.evaluate.diagnose import masked_mse, nearest_distance, posterior_mean

VALID = torch.tensor([[True, True, True, True], [True, True, False, False]])  # (L=2, D=4)
EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


def _zoo(m: int = 5, seed: int = 0) -> torch.Tensor:
    z = torch.randn(m, 2, 4, generator=torch.Generator().manual_seed(seed))
    return z.masked_fill(~VALID, 0.0)


def test_posterior_mean_matches_bayes_rule_by_hand():
    zoo, x_t, a = _zoo(), torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(1)), 0.6
    got = posterior_mean(x_t, a, zoo, VALID)
    for n in range(3):
        logp = torch.stack([-((x_t[n].double() - math.sqrt(a) * z.double())[VALID] ** 2).sum() / (2 * (1 - a))
                            for z in zoo])
        w = torch.softmax(logp, 0)
        want = sum(w[i] * zoo[i].double() for i in range(len(zoo)))
        # both sides in float64 (logits of size |logp| carry ~|logp| eps64 each, moving the mean by
        # that times |zoo|), then one float32 rounding each: at most one float32 ulp apart
        atol = 4 * EPS64 * float(zoo.abs().max()) * (1 + float(logp.abs().max()))
        torch.testing.assert_close(got[n], want.float(), rtol=EPS32, atol=atol)


def test_posterior_mean_limits_copy_at_low_noise_and_average_at_high_noise():
    zoo = _zoo()
    near = posterior_mean(math.sqrt(0.9999) * zoo[2:3], 0.9999, zoo, VALID)
    # a copy of the entry, the memorising oracle: the other entries' weights exp(-|Δz|² / 2e-4) are 0 in float64
    torch.testing.assert_close(near, zoo[2:3], rtol=0, atol=0)
    a, x_t = 1e-14, torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(4))
    far = posterior_mean(x_t, a, zoo, VALID)
    # the zoo average up to the weights' spread: logits differ by at most
    # (2 sqrt(a) |x_t| max|z| + a max|z|² / 2) / (1 - a), which moves the mean by that times max|z|;
    # the float32 mean of M entries adds M eps |z|
    norm = float(zoo.flatten(1).norm(dim=1).max())
    spread = (2 * math.sqrt(a) * float(x_t.norm()) * norm + a * norm ** 2 / 2) / (1 - a)
    atol = (spread + (len(zoo) + 1) * EPS32) * float(zoo.abs().max())
    torch.testing.assert_close(far[0], zoo.mean(0), rtol=0, atol=atol)


def test_padding_takes_no_part_in_the_posterior_or_the_errors():
    zoo = _zoo()
    x_t = torch.randn(2, 2, 4, generator=torch.Generator().manual_seed(3))
    noisy_pad = x_t.clone()
    noisy_pad[:, ~VALID] = 100.0
    torch.testing.assert_close(posterior_mean(x_t, 0.5, zoo, VALID), posterior_mean(noisy_pad, 0.5, zoo, VALID),
                               rtol=0, atol=0)  # padding is multiplied by 0 first: the same computation
    assert torch.equal(masked_mse(x_t, zoo[:2], VALID), masked_mse(noisy_pad, zoo[:2], VALID))
    assert torch.equal(nearest_distance(x_t, zoo, VALID), nearest_distance(noisy_pad, zoo, VALID))
    assert torch.equal(nearest_distance(zoo[1:2], zoo, VALID), torch.zeros(1))


def test_diagnose_command_on_a_trained_generator(tiny_generator, tiny_lora_zoo, tmp_path, capsys):
    from weightdiff.cli import main

    out = tmp_path / "diag"
    argv = ["diagnose", "--model", str(tiny_generator), "--zoo", str(tiny_lora_zoo), "--out", str(out),
            "--paths", "[ddim:3]", "--max-entries", "6", "--num", "2"]
    assert main(argv) == 0
    report = json.loads((out / "diagnose.json").read_text())
    levels = report["noise_levels"]
    n = len(levels["timesteps"])
    for key in ("model_mse", "identity_mse", "oracle_mse", "model_acc"):
        assert len(levels["train"][key]) == n
    # identity error grows with the noise level; the oracle reproduces training entries at low noise
    assert levels["train"]["identity_mse"][0] < levels["train"]["identity_mse"][-2]
    assert levels["train"]["oracle_mse"][1] < 1e-3
    assert all(0.0 <= a <= 1.0 for a in levels["train"]["model_acc"])
    path = report["paths"]["ddim-3"]
    assert len(path["accuracy"]) == 3 and path["zoo_spacing"] > 0
    assert (out / "diagnose.png").stat().st_size > 10_000
    assert "ddim-3: final accuracy" in capsys.readouterr().out
    assert main([*argv[:-6], "--paths", "[euler:3]"]) == 2
    assert "euler:3" in capsys.readouterr().err
