"""The shipped generator configs: valid options, and a multi-step default sampler."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml

from weightdiff.training.datamodule import ZooDataModule
from weightdiff.training.module import WeightDiffusion

REPO = Path(__file__).resolve().parents[1]
#: Generator configs a user trains on a built zoo (tiny.yaml is the tests' seconds-long fit).
SHIPPED = ["rotdigits-lora.yaml", "cordigits-lora.yaml", "digits-cnn.yaml", "digits-cnn-latent.yaml", "mnist1d-cnn.yaml",
           "digits-mlp.yaml"]


def _params(cls: type) -> set[str]:
    return {k for k in inspect.signature(cls.__init__).parameters if k != "self"}


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_config_names_only_real_options_and_samples_in_ten_steps_or_more(name):
    config = yaml.safe_load((REPO / "configs" / name).read_text())
    model, data = config["model"], config["data"]
    assert set(model) <= _params(WeightDiffusion), set(model) - _params(WeightDiffusion)
    assert set(data) <= _params(ZooDataModule), set(data) - _params(ZooDataModule)
    # The default sampler is a multi-step one (x0 is the one-step clean estimate).
    assert model.get("sampler", "ddim") in ("ddim", "ddpm", "dpm", "euler")
    assert model.get("num_inference_steps", 20) >= 10
    if model.get("latent_tokens"):
        assert model["autoencoder_steps"] < config["trainer"]["max_steps"]  # the diffusion gets steps too
