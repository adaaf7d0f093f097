"""scripts/within_run_probe.py: affine combinations of one run's checkpoints."""

from __future__ import annotations

import importlib.util

import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("within_run_probe", REPO / "scripts" / "within_run_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_gamma_zero_is_the_centroid_and_any_gamma_keeps_the_weights_summing_to_one():
    run = {"w": torch.randn(4, 3, 2), "b": torch.randn(4, 5)}
    g = torch.Generator().manual_seed(0)
    centre = probe.affine_combinations(run, 0.0, 3, g)
    for k, v in run.items():
        torch.testing.assert_close(centre[k], v.mean(0).expand(3, *v.shape[1:]))
    same = {"w": torch.ones(4, 2) * 7.0}  # four equal checkpoints: every affine combination is that checkpoint
    far = probe.affine_combinations(same, 3.0, 5, g)["w"]
    torch.testing.assert_close(far, torch.full((5, 2), 7.0))
    spread = probe.affine_combinations(run, 2.0, 50, g)["b"]
    assert (spread - run["b"].mean(0)).abs().max() > 0.1  # a non-zero γ leaves the centroid
