"""scripts/angle_jitter_probe.py: a text condition's parsed angle moved by offsets."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from tests.conftest import REPO
from weightdiff.tasks.numeric import parse_description

spec = importlib.util.spec_from_file_location("angle_jitter_probe", REPO / "scripts" / "angle_jitter_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_offsets_move_the_parsed_angle_and_nothing_else():
    features = parse_description("Digits rotated by 40 degrees clockwise, mirrored.").features()
    raw = torch.cat([torch.randn(1, 6), features[None]], dim=1)
    out = probe.rotated(raw, [0.0, 10.0, -50.0])
    assert out.shape == (3, raw.shape[1])
    # offset 0: the condition as read, up to float32 rounding of cos/sin (a few ulps of 1)
    torch.testing.assert_close(out[0], raw[0], rtol=0.0, atol=4 * torch.finfo(torch.float32).eps)
    assert torch.equal(out[:, :6], raw.repeat(3, 1)[:, :6])  # the embedding is untouched
    assert torch.equal(out[:, -2:], raw.repeat(3, 1)[:, -2:])  # has_angle and the mirror flag too
    for row, expected in zip(out[1:], (-30.0, -90.0)):  # 40 degrees clockwise is -40
        assert math.degrees(math.atan2(row[-3], row[-4])) == pytest.approx(expected, abs=1e-4)
