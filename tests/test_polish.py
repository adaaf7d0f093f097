"""Polishing: full-batch Adam steps of each weight set's own task loss (the benchmark's "+ K task-loss steps" rows)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from weightdiff.evaluate.baselines import polished_params, select, stack_params
from weightdiff.targets import Target
from weightdiff.tasks import get_task


@pytest.fixture(scope="module")
def setup():
    task = get_task("digits")
    target = Target.full(task.build_network())
    torch.manual_seed(0)
    params = stack_params([dict(task.build_network().state_dict()) for _ in range(3)])
    x, y = task.data().split("train")
    return target, params, x[:256], y[:256]


def _losses(target, params, x, y) -> torch.Tensor:
    with torch.no_grad():
        logits = target.forward_batched(params, x)  # (S, N, C)
    return torch.stack([F.cross_entropy(row, y) for row in logits])


def test_zero_steps_returns_copies(setup):
    target, params, x, y = setup
    out = polished_params(target, params, x, y, steps=0)
    assert all(torch.equal(out[k], params[k]) and out[k].data_ptr() != params[k].data_ptr() for k in params)


def test_every_set_is_trained_on_its_own_loss(setup):
    target, params, x, y = setup
    before = _losses(target, params, x, y)
    out = polished_params(target, params, x, y, steps=20, lr=1e-2)
    after = _losses(target, out, x, y)
    assert (after < before - 0.1).all(), (before, after)  # each of the 3 random networks learns
    assert not any(p.requires_grad for p in out.values())


def test_chunks_of_one_are_each_set_polished_alone(setup):
    """Chunking splits the sets, nothing else: a chunk of one is that set's own run, bit for bit."""
    target, params, x, y = setup
    chunked = polished_params(target, params, x, y, steps=3, lr=1e-2, chunk_size=1)
    for i in range(3):
        alone = polished_params(target, select(params, [i]), x, y, steps=3, lr=1e-2)
        assert all(torch.equal(chunked[k][i:i + 1], alone[k]) for k in params)


def test_negative_steps_are_refused(setup):
    target, params, x, y = setup
    with pytest.raises(ValueError, match="steps must be >= 0"):
        polished_params(target, params, x, y, steps=-1)
