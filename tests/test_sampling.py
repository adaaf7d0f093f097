"""Sampling: PEFT-loadable samples, the cache, determinism, best-of-k, bad input through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO
from weightdiff.errors import ConditionError, ModelDirError, TaskStringError
from weightdiff.models.generator import load_generator
from weightdiff.io import load_weights
from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition, sample, select_best
from weightdiff.tasks import get_task


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return load_generator(tiny_generator)


def test_free_text_sample_loads_through_peft_and_matches_batched_forward(gen, tmp_path):
    from peft import PeftModel

    cond = make_condition(gen, description="Handwritten digits turned 73 degrees anticlockwise")
    dirs, info = sample(gen, cond, 2, SamplerSettings(steps=4), tmp_path, use_cache=False, progress=False)
    assert len(dirs) == 2 and not info["from_cache"]
    task = get_task("rotdigits:angle=73")
    x = task.data().x_test[:50]
    target = gen.target(task)
    for d in dirs:
        meta = json.loads((d / "sample.json").read_text())
        assert meta["condition"]["description"].startswith("Handwritten") and meta["model_id"] == gen.model_id
        base = task.build_network()
        base.load_state_dict(gen.base_state(), strict=True)
        peft_model = PeftModel.from_pretrained(base, d).eval()
        params = {k: v[None] for k, v in load_weights(d / "adapter_model.safetensors").items()}
        with torch.no_grad():
            torch.testing.assert_close(peft_model(x), target.forward_batched(params, x)[0], rtol=1e-5, atol=1e-5)


def test_cache_returns_identical_tokens_and_same_seed_is_bit_identical(gen):
    cond = make_condition(gen, task="rotdigits:angle=30")
    s = SamplerSettings(steps=3, seed=7)
    a, cached_a = generate_tokens(gen, cond, 3, s, use_cache=True, progress=False)
    b, cached_b = generate_tokens(gen, cond, 3, s, use_cache=True, progress=False)
    c, cached_c = generate_tokens(gen, cond, 3, s, use_cache=False, progress=False)
    assert (cached_a, cached_b, cached_c) == (False, True, False)
    assert torch.equal(a, b) and torch.equal(a, c)
    # a sample does not depend on how many were requested with it (per-sample seeds; only
    # float rounding of differently-sized matrix products differs)
    d, _ = generate_tokens(gen, cond, 1, s, use_cache=False, progress=False)
    torch.testing.assert_close(d[0], a[0], rtol=1e-4, atol=1e-4)
    e, _ = generate_tokens(gen, cond, 1, SamplerSettings(steps=3, seed=8), use_cache=False, progress=False)
    assert not torch.equal(e[0], a[0])


def test_best_of_k_keeps_the_most_accurate_candidates(gen, tmp_path):
    cond = make_condition(gen, task="rotdigits:angle=45")
    dirs, info = select_best(gen, cond, 2, SamplerSettings(steps=3), tmp_path, task="rotdigits:angle=45",
                             examples=40, candidates=4, use_cache=False)
    assert len(dirs) == 2
    assert info["selection_accuracy"][0] >= info["selection_accuracy"][1]
    meta = json.loads((dirs[0] / "sample.json").read_text())
    assert meta["condition"]["selected_with_examples"] == 40


def test_bad_requests_raise_named_errors(gen, tmp_path):
    with pytest.raises(ConditionError, match="empty"):
        make_condition(gen, description="   ")
    with pytest.raises(TaskStringError):
        make_condition(gen, task="rotdigits:angel=3")
    with pytest.raises(ModelDirError, match="family"):
        make_condition(gen, task="mnist1d")
    with pytest.raises(ConditionError, match="--num"):
        generate_tokens(gen, make_condition(gen, task="rotdigits:angle=3"), 0, SamplerSettings())
    with pytest.raises(ModelDirError, match="missing 'config.json'"):
        load_generator(tmp_path)


@pytest.mark.parametrize("extra, needle", [
    (["--num", "0"], "--num"),
    (["--description", ""], "empty"),
    (["--task", "nosuchfamily"], "nosuchfamily"),
])
def test_cli_bad_input_one_line_nonzero_exit_nothing_written(tiny_generator, tmp_path, extra, needle):
    out = tmp_path / "samples"
    args = ["--model", str(tiny_generator), "--out", str(out)]
    if "--task" not in extra and "--description" not in extra:
        args += ["--task", "rotdigits:angle=10"]
    proc = subprocess.run([sys.executable, "-m", "weightdiff", "sample", *args, *extra], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.startswith("weightdiff: error")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())
