"""A generator fitted on the tiny cordigits zoo (ViT base, LoRA on q/v), from text and from unlabelled inputs.

End to end on the real family: fit → export → sample → the adapters load and run in the ViT; a
description naming no corruption is a warning (the text generator reads no numbers), never silence.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.conftest import export_last, fit_tiny
from weightdiff.models.conditioning import unlabelled_inputs
from weightdiff.models.generator import load_generator
from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition
from weightdiff.tasks import get_task


@pytest.fixture(scope="module")
def zoo(tiny_cordigits_zoo):
    return tiny_cordigits_zoo


@pytest.mark.parametrize("condition", ["text", "unlabelled"])
def test_a_cordigits_generator_samples_adapters_that_run_in_the_vit(zoo, tmp_path, condition):
    from weightdiff.zoo import Zoo

    run = fit_tiny(zoo, tmp_path / "fit", "--data.condition", condition, "--data.num_examples", "8")
    gen = load_generator(export_last(run, tmp_path / "generator"))
    task = get_task("cordigits:c1=invert,s1=1")  # a never-trained corruption type (held out as 'novel')
    cond = make_condition(gen, task=task.name)
    if condition == "unlabelled":  # the 8 test-time inputs of the task, without labels
        expected = unlabelled_inputs(task, 8, seed=0)
        assert torch.equal(torch.as_tensor(cond.raw).reshape(8, -1), expected.reshape(8, -1))
    tokens, _ = generate_tokens(gen, cond, 3, SamplerSettings(seed=0), use_cache=False, progress=False)
    params = gen.tokenizer.decode_float(tokens)
    target = Zoo.open(zoo).target()
    target.check(params, "samples", batched=True)
    x, y = task.data().split("test")
    acc = target.accuracy(params, x, y)
    assert acc.shape == (3,) and torch.isfinite(acc).all()


def test_a_description_naming_no_corruption_is_a_warning(zoo, tmp_path, caplog):
    run = fit_tiny(zoo, tmp_path / "fit", "--data.condition", "text")
    gen = load_generator(export_last(run, tmp_path / "generator"))
    with caplog.at_level(logging.WARNING, logger="weightdiff.sampling"):
        make_condition(gen, description="Digits seen through a frosted window")
    assert any("names no corruption" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="weightdiff.sampling"):
        make_condition(gen, description="Digits that were turned upside down and heavily blurred")
    assert not any("names no corruption" in r.getMessage() for r in caplog.records)
