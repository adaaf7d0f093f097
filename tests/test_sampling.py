"""Sampling: the pipeline, PEFT-loadable samples, the cache, determinism, best-of-k, the predict loop
around the same core, a Lightning-free import, bad input through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from safetensors import safe_open

from tests._tolerance import network_tol, steps_tol
from tests.conftest import REPO
from weightdiff.errors import ConditionError, ModelDirError, TaskStringError
from weightdiff.io import load_weights
from weightdiff.models.generator import load_generator
from weightdiff.sampling import (SamplerSettings, WeightDiffusionPipeline, generate_tokens, make_condition, sample,
                                 select_best)
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
            ref = peft_model(x)
            torch.testing.assert_close(target.forward_batched(params, x)[0], ref, rtol=0,
                                       atol=network_tol(task.build_network(), ref))


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
    assert gen.schedule.prediction_type == "sample" and s.sampler == "ddim"  # the sampler steps_tol bounds
    tol = steps_tol(network_tol(gen.generator.denoiser, a), s.steps)
    torch.testing.assert_close(d[0], a[0], rtol=0, atol=tol)
    e, _ = generate_tokens(gen, cond, 1, SamplerSettings(steps=3, seed=8), use_cache=False, progress=False)
    assert float((e[0] - a[0]).abs().max()) > 100 * tol  # another seed is far outside the rounding


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
    with pytest.raises(ModelDirError, match="missing 'model_index.json'"):
        load_generator(tmp_path)
    pipe = WeightDiffusionPipeline.from_pretrained(gen.path)
    with pytest.raises(ConditionError, match="exactly one"):
        pipe("digits", task="rotdigits:angle=3")
    with pytest.raises(ConditionError, match="not on labelled examples"):
        pipe(examples=(torch.zeros(4, 64), torch.zeros(4, dtype=torch.long)))


@pytest.fixture(scope="module")
def pipe(tiny_generator):
    return WeightDiffusionPipeline.from_pretrained(tiny_generator)


def test_pipeline_call_gives_peft_adapters_of_the_generators_default_sampler(pipe, gen, tmp_path):
    from peft import PeftModel

    out = pipe("Handwritten digits turned 73 degrees anticlockwise", num_samples=3, seed=5, batch_size=2)
    assert len(out) == 3 and out.seeds == [5, 6, 7] and out.kind == "lora"
    assert (out.settings.sampler, out.settings.steps) == (gen.config["sampling"]["sampler"],
                                                          gen.config["sampling"]["steps"])
    # the same core as generate_tokens: sample i from seed + i, whatever the batch size
    tokens, _ = generate_tokens(gen, make_condition(gen, description=out.condition["description"]), 3,
                                out.settings, batch_size=2, use_cache=False, progress=False)
    assert torch.equal(out.tokens, tokens)
    assert {k: tuple(v.shape) for k, v in out.params.items()} == \
        {k: (3, *v.shape) for k, v in out.state_dicts[0].items()}
    dirs = out.save(tmp_path)
    task = get_task("rotdigits:angle=73")
    x = task.data().x_test[:20]
    for i, d in enumerate(dirs):
        meta = json.loads((d / "sample.json").read_text())
        assert meta["seed"] == 5 + i and meta["model_id"] == pipe.model_id
        config = json.loads((d / "adapter_config.json").read_text())
        assert (d / config["base_model_name_or_path"]).resolve() == (pipe.path / "base").resolve()
        with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
            assert f.metadata() == {"format": "pt"}
        base = task.build_network()
        base.load_state_dict(pipe.base_state(), strict=True)
        peft_model = PeftModel.from_pretrained(base, d).eval()
        params = {k: v[None] for k, v in out.state_dicts[i].items()}
        with torch.no_grad():
            ref = peft_model(x)
            torch.testing.assert_close(pipe.target(task).forward_batched(params, x)[0], ref, rtol=0,
                                       atol=network_tol(task.build_network(), ref))


def test_save_pretrained_then_from_pretrained_gives_bit_identical_samples(pipe, tmp_path):
    copy = pipe.save_pretrained(tmp_path / "copy")
    again = WeightDiffusionPipeline.from_pretrained(copy)
    assert again.model_id == pipe.model_id
    for name in ("tokenizer/layout.json", "tokenizer/layout_stats.safetensors", "base/model.safetensors",
                 "generator/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json", "README.md"):
        assert (copy / name).read_bytes() == (pipe.path / name).read_bytes(), name
    for kwargs in (dict(num_inference_steps=4), dict(sampler="dpm", num_inference_steps=3),
                   dict(sampler="x0", temperature=0.5), dict(guidance_scale=2.0, num_inference_steps=3)):
        a = pipe(task="rotdigits:angle=30", num_samples=2, seed=9, **kwargs)
        b = again(task="rotdigits:angle=30", num_samples=2, seed=9, **kwargs)
        assert torch.equal(a.tokens, b.tokens), kwargs
        assert all(torch.equal(a.state_dicts[0][k], b.state_dicts[0][k]) for k in a.state_dicts[0])


def test_save_pretrained_is_atomic(pipe, tmp_path, monkeypatch):
    def die(directory):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe.tokenizer, "save", die)
    with pytest.raises(KeyboardInterrupt):
        pipe.save_pretrained(tmp_path / "gen")
    assert list(tmp_path.iterdir()) == []


def test_lightning_predict_loop_runs_the_same_core(gen):
    from weightdiff.training.predict import predict_tokens

    cond = make_condition(gen, task="rotdigits:angle=45")
    settings = SamplerSettings(steps=3, seed=2)
    plain, _ = generate_tokens(gen, cond, 5, settings, batch_size=2, use_cache=False, progress=False)
    looped = predict_tokens(gen, cond, 5, settings, devices=1, batch_size=2, progress=False,
                            trainer_kwargs={"accelerator": "cpu"})
    assert torch.equal(plain, looped)


_DDP_SCRIPT = """
import sys, torch
from weightdiff.models.generator import load_generator
from weightdiff.io import save_weights
from functools import partial

from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition
from weightdiff.training.predict import predict_tokens

if __name__ == "__main__":
    gen = load_generator(sys.argv[1])
    cond = make_condition(gen, task="rotdigits:angle=45")
    tokens, _ = generate_tokens(gen, cond, 5, SamplerSettings(steps=3, seed=2), batch_size=2, use_cache=False,
                                progress=False, generate=partial(predict_tokens, devices=2,
                                                                 trainer_kwargs={"accelerator": "cpu", "strategy": "ddp"}))
    save_weights(sys.argv[2].replace("RANK", str(torch.distributed.get_rank())), {"tokens": tokens})
"""


def test_generate_tokens_over_two_processes_returns_every_sample_on_every_rank(gen, tmp_path):
    script = tmp_path / "ddp_sample.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(gen.path), str(tmp_path / "tokens_RANK.safetensors")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, _ = generate_tokens(gen, make_condition(gen, task="rotdigits:angle=45"), 5, SamplerSettings(steps=3, seed=2),
                               batch_size=2, use_cache=False, progress=False)
    for rank in (0, 1):
        tokens = load_weights(tmp_path / f"tokens_{rank}.safetensors")["tokens"]
        # the ranks batch other samples together: equal up to float rounding
        torch.testing.assert_close(tokens, plain, rtol=0, atol=steps_tol(network_tol(gen.generator.denoiser, plain), 3))


def test_sampling_and_evaluation_import_no_lightning():
    code = ("import weightdiff.sampling, weightdiff.evaluate, weightdiff.evaluate.benchmark, sys; "
            "assert not any(m == 'lightning' or m.startswith(('lightning.', 'pytorch_lightning')) "
            "for m in sys.modules), sorted(m for m in sys.modules if 'lightning' in m)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


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
