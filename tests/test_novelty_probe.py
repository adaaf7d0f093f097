"""scripts/novelty_probe.py: accuracy, distances in within-run spacings and basins of one setting."""

from __future__ import annotations

import argparse
import importlib.util

import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("novelty_probe", REPO / "scripts" / "novelty_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_distances_are_in_within_run_spacings_and_unknown_ones_are_left_out():
    acc = torch.tensor([0.9, 0.8, 1.0, 0.7])
    dist = torch.tensor([0.0, 2.0, float("nan"), 4.0])  # median of the known three: 2.0
    s = probe.summarize(acc, dist, ["a", "b", "a", "c"], spacing=2.0)
    assert s["mean"] == pytest.approx(85.0) and s["best"] == pytest.approx(100.0)
    assert s["distance_median"] == pytest.approx(1.0) and s["distance_mean"] == pytest.approx(1.0)
    assert s["distance_p10"] == pytest.approx(0.2) and s["distance_p90"] == pytest.approx(1.8)  # linear quantiles
    assert s["basins"] == 3


def test_settings_parse_to_sampler_fields_and_bad_ones_are_named():
    from weightdiff.sampling import parse_sampler_setting

    assert parse_sampler_setting("sampler=ddpm,latent_noise=0.3,steps=20") == {"sampler": "ddpm", "latent_noise": 0.3,
                                                                               "steps": 20}
    with pytest.raises(argparse.ArgumentTypeError, match="'eta'"):
        parse_sampler_setting("eta=1")
    with pytest.raises(argparse.ArgumentTypeError, match="steps='ten' is not a int"):
        parse_sampler_setting("steps=ten")
