"""scripts/latent_geometry.py: the latent within-run and between-run spacings it reports."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("latent_geometry", REPO / "scripts" / "latent_geometry.py")
geometry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(geometry)


def test_within_run_is_the_median_pair_distance_and_between_the_nearest_other_run():
    # run a: three points on a line 1 apart (pairs 1, 1, 2: median 1); run b: two points 10 away, 1 apart
    latents = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [12.0, 0.0], [13.0, 0.0]])
    within, between = geometry.within_and_between(latents, ["a", "a", "a", "b", "b"])
    assert within == pytest.approx(1.0)
    # nearest latent of another run: 12, 11, 10 for run a; 10, 11 for run b -> median 11
    assert between == pytest.approx(11.0)
