"""The ``unlabelled`` condition: a set encoder over K unlabelled inputs of a task's domain.

The encoder (order invariance, sensitivity to each input, null embedding, shape errors), the
seeded test-time draw that sampling, the benchmark and a test-time-adaptation baseline share,
the training draw, a tiny fit end to end, sampling from a task's inputs or from inputs of one's
own (a tensor, a .safetensors or a .npz file) and the errors for bad ones.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._tolerance import network_tol
from tests.conftest import export_last, fit_tiny
from weightdiff.cli import main
from weightdiff.errors import ConditionError
from weightdiff.io import load_weights, save_weights
from weightdiff.models.conditioning import (
    TEST_TIME_SPLIT, UnlabelledSetCondition, build_condition, unlabelled_inputs,
)
from weightdiff.models.generator import load_generator
from weightdiff.sampling import (
    SamplerSettings, WeightDiffusionPipeline, generate_tokens, make_condition, num_examples, sample,
)
from weightdiff.tasks import get_task
from weightdiff.training.datamodule import TaskConditions
from weightdiff.zoo import Zoo

H = 32
TASK = "rotdigits:angle=40,flip=0"


def _sets(b: int = 3, k: int = 9, x_dim: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, k, x_dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------ the encoder
@pytest.mark.parametrize("pooling", ["attention", "mean"])
def test_encoder_is_invariant_to_the_order_of_the_inputs_and_reads_each_one(pooling):
    torch.manual_seed(0)
    enc = UnlabelledSetCondition(H, x_dim=10, pooling=pooling).eval()
    x = _sets()
    ref, seq_ref = enc(x), enc.sequence(x)[0]
    # reordering the inputs reorders the attention and pooling sums: equal up to their float32 rounding
    tol, seq_tol = network_tol(enc, ref), network_tol(enc, seq_ref)
    for seed in range(3):
        perm = torch.randperm(9, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(enc(x[:, perm]), ref, rtol=0, atol=tol)
        seq, mask = enc.sequence(x[:, perm])
        torch.testing.assert_close(seq, seq_ref[:, perm], rtol=0, atol=seq_tol)
        assert seq.shape == (3, 9, H) and bool(mask.all())
    # one input of set 1 changed: set 1's embedding moves far beyond the rounding, the others not at all
    x2 = x.clone()
    x2[1, 4] = torch.randn(10, generator=torch.Generator().manual_seed(99))
    out = enc(x2)
    assert float((out[1] - ref[1]).abs().max()) > 100 * tol
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], rtol=0, atol=0)
    # unflattened inputs are flattened: the same numbers in the same order
    torch.testing.assert_close(enc(x.view(3, 9, 2, 5)), ref, rtol=0, atol=0)


def test_dropped_rows_get_the_null_embedding_in_the_vector_and_the_sequence():
    torch.manual_seed(0)
    enc = UnlabelledSetCondition(H, x_dim=10).eval()
    x, drop = _sets(), torch.tensor([True, False, True])
    plain = enc(x)
    vec, seq, mask = enc.embed_with_sequence(x, drop)
    null = enc.null_embedding.detach()
    assert torch.equal(vec[0], null) and torch.equal(vec[2], null) and torch.equal(vec[1], plain[1])
    assert torch.equal(seq[0], null.expand(9, -1)) and torch.equal(seq[1], enc.sequence(x)[0][1])
    assert mask.shape == (3, 9) and bool(mask.all())
    assert not torch.allclose(plain[1], null)


@pytest.mark.parametrize("raw, needles", [
    (torch.zeros(3, 10), ["inputs of shape (3, 10)", "expected (B, K, 10) or (B, K, *input_shape)"]),
    (torch.zeros(3, 0, 10), ["inputs of shape (3, 0, 10)", "at least one example per set"]),
    (torch.zeros(3, 4, 7), ["each example has 7 input values", "expected x_dim=10"]),
    ((torch.zeros(3, 4, 10), torch.zeros(3, 4, dtype=torch.long)), ["takes the inputs alone", "'examples' condition"]),
])
def test_a_batch_of_the_wrong_shape_is_one_error_naming_what_was_expected(raw, needles):
    enc = UnlabelledSetCondition(H, x_dim=10)
    with pytest.raises(ConditionError) as err:
        enc(raw)
    assert all(n in str(err.value) for n in needles), str(err.value)


def test_build_condition_makes_the_unlabelled_encoder_from_x_dim():
    enc = build_condition("unlabelled", H, x_dim=64, heads=2, pooling="mean")
    assert isinstance(enc, UnlabelledSetCondition) and enc.x_dim == 64 and enc.pooling == "mean"
    assert not hasattr(enc, "label_embed")  # nothing of it reads labels
    with pytest.raises(ConditionError, match=r"unlabelled condition needs \['x_dim'\]"):
        build_condition("unlabelled", H)
    with pytest.raises(ConditionError, match="unlabelled condition: hidden=30 is not divisible by heads=4"):
        UnlabelledSetCondition(30, x_dim=10, heads=4)


# --------------------------------------------------------------------------------- the raw inputs
def test_test_time_inputs_are_a_seeded_draw_of_the_named_split_without_replacement():
    task = get_task(TASK)
    data = task.data()
    a = unlabelled_inputs(task, 16, seed=3)
    assert TEST_TIME_SPLIT == "test"
    assert a.shape == (16, *task.input_shape) and a.dtype == torch.float32
    assert torch.equal(a, unlabelled_inputs(TASK, 16, 3, TEST_TIME_SPLIT))  # a task string or object, one draw
    assert not torch.equal(a, unlabelled_inputs(task, 16, seed=4))
    for split, pool in (("test", data.x_test), ("train", data.x_train)):
        drawn = unlabelled_inputs(task, 16, 3, split)
        rows = [torch.nonzero((pool.flatten(1) == x.flatten()).all(1)).flatten().tolist() for x in drawn]
        assert all(rows), f"an input not of the {split} split"
        assert len({r[0] for r in rows}) == 16  # sixteen different rows
    with pytest.raises(ConditionError, match=rf"need 100000 unlabelled inputs, the task's test split has "
                                             rf"{data.x_test.shape[0]}"):
        unlabelled_inputs(task, 100_000)
    with pytest.raises(ConditionError, match="a whole number of at least 1, got 0"):
        unlabelled_inputs(task, 0)


def test_training_items_draw_fresh_inputs_of_the_training_split():
    conds = TaskConditions([TASK], "unlabelled")
    assert conds.dims(16) == {"x_dim": math.prod(get_task(TASK).input_shape)}
    gen = torch.Generator().manual_seed(0)
    first, second = conds.raw(TASK, None, 16, gen), conds.raw(TASK, None, 16, gen)
    assert first.shape == (16, *get_task(TASK).input_shape)
    assert not torch.equal(first, second)  # each read of an item is a new draw
    train = conds.data[TASK].x_train.flatten(1)
    assert all(bool((train == x.flatten()).all(1).any()) for x in first)


# ---------------------------------------------------------------------------- fit, export, sample
@pytest.fixture(scope="module")
def fit_run(tiny_lora_zoo, tmp_path_factory) -> Path:
    return fit_tiny(tiny_lora_zoo, tmp_path_factory.mktemp("fit-unlabelled"), "--data.condition", "unlabelled")


@pytest.fixture(scope="module")
def generator_dir(fit_run, tmp_path_factory) -> Path:
    return export_last(fit_run, tmp_path_factory.mktemp("gen-unlabelled") / "generator")


@pytest.fixture(scope="module")
def gen(generator_dir):
    return load_generator(generator_dir)


@pytest.fixture(scope="module")
def heldout_task(tiny_lora_zoo) -> str:
    return min({r["task"] for r in Zoo.open(tiny_lora_zoo).rows(split="heldout")})


def test_a_tiny_fit_on_unlabelled_inputs_trains_and_exports_the_set_encoder(fit_run, gen, generator_dir):
    rows = list(csv.DictReader(next(fit_run.glob("**/metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert gen.config["model"]["condition"] == "unlabelled" and gen.config["model"]["condition_dims"] == {"x_dim": 64}
    assert isinstance(gen.generator.cond, UnlabelledSetCondition)
    card = (generator_dir / "README.md").read_text()
    assert "unlabelled inputs of the task's domain" in card and f"`{TEST_TIME_SPLIT}` split" in card


def test_sampling_a_task_conditions_on_its_test_time_batch_and_is_deterministic_per_seed(gen, heldout_task,
                                                                                          tmp_path):
    from peft import PeftModel

    k = num_examples(gen)
    cond = make_condition(gen, task=heldout_task, seed=5)
    assert torch.equal(cond.raw, unlabelled_inputs(heldout_task, k, 5).flatten(1)[None])  # what TENT adapts on
    assert cond.info["split"] == TEST_TIME_SPLIT and cond.info["examples"] == k and cond.info["seed"] == 5
    assert make_condition(gen, task=heldout_task, examples=32, seed=5).raw.shape == (1, 32, 64)
    settings = SamplerSettings(steps=3, seed=7)
    a, _ = generate_tokens(gen, cond, 2, settings, use_cache=False, progress=False)
    b, _ = generate_tokens(gen, make_condition(gen, task=heldout_task, seed=5), 2, settings, use_cache=False,
                           progress=False)
    assert torch.equal(a, b)
    other, _ = generate_tokens(gen, make_condition(gen, task=heldout_task, seed=6), 2, settings, use_cache=False,
                               progress=False)
    assert not torch.equal(a, other)  # another draw of inputs is another condition

    dirs, _ = sample(gen, cond, 2, settings, tmp_path / "samples", use_cache=False, progress=False)
    task = get_task(heldout_task)
    x = task.data().x_test[:50]
    for d in dirs:
        assert json.loads((d / "sample.json").read_text())["condition"]["split"] == TEST_TIME_SPLIT
        base = task.build_network()
        base.load_state_dict(gen.base_state(), strict=True)
        peft_model = PeftModel.from_pretrained(base, d).eval()
        params = {n: v[None] for n, v in load_weights(d / "adapter_model.safetensors").items()}
        with torch.no_grad():
            ref = peft_model(x)
            torch.testing.assert_close(gen.target(task).forward_batched(params, x)[0], ref, rtol=0,
                                       atol=network_tol(task.build_network(), ref))


def test_inputs_of_ones_own_as_a_tensor_or_a_file_give_the_same_samples(generator_dir, heldout_task, tmp_path):
    pipe = WeightDiffusionPipeline.from_pretrained(generator_dir)
    x = unlabelled_inputs(heldout_task, 24, seed=1)  # (24, 1, 8, 8)
    save_weights(tmp_path / "x.safetensors", {"pixels": x})
    np.savez(tmp_path / "x.npz", x=x.numpy(), other=np.zeros(3))  # several arrays: the one named x
    for given in (x, x.flatten(1), tmp_path / "x.safetensors", str(tmp_path / "x.npz")):
        cond = pipe.condition(inputs=given)
        assert torch.equal(cond.raw, x.flatten(1)[None]) and cond.info["examples"] == 24
    assert pipe.condition(inputs=tmp_path / "x.npz").info["inputs"] == str(tmp_path / "x.npz")
    from_file = pipe(inputs=tmp_path / "x.safetensors", num_samples=2, num_inference_steps=3, seed=0)
    from_tensor = pipe(inputs=x, num_samples=2, num_inference_steps=3, seed=0)
    assert torch.equal(from_file.tokens, from_tensor.tokens)


def _bad_file(tmp_path: Path, case: str) -> Path:
    if case == "shape":
        save_weights(tmp_path / "bad.safetensors", {"x": torch.zeros(24, 63)})
    elif case == "empty":
        save_weights(tmp_path / "bad.safetensors", {"x": torch.zeros(0, 64)})
    elif case == "nan":
        save_weights(tmp_path / "bad.safetensors", {"x": torch.full((4, 64), float("nan"))})
    elif case == "corrupt":
        (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file at all")
    elif case == "several":
        np.savez(tmp_path / "bad.npz", a=np.zeros((4, 64)), b=np.zeros((4, 64)))
    elif case == "objects":
        np.savez(tmp_path / "bad.npz", x=np.array([{"a": 1}], dtype=object))
    elif case == "suffix":
        (tmp_path / "bad.pt").write_bytes(b"")
    found = [p for p in tmp_path.iterdir() if p.name.startswith("bad")]
    return found[0] if found else tmp_path / "missing.safetensors"


BAD_FILES = {
    "shape": ["shape (24, 63)", "expected (K, 64) or (K, *input_shape) with 64 values per input"],
    "empty": ["shape (0, 64)", "K >= 1"],
    "nan": ["256 non-finite values"],
    "corrupt": ["is not a safetensors file"],
    "several": ["holds arrays ['a', 'b']", "one named 'x'"],
    "objects": ["cannot be read as .npz"],
    "suffix": ["expected a .safetensors or .npz file"],
    "missing": ["no such file"],
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_inputs_file_is_one_error_naming_it(gen, tmp_path, case):
    path = _bad_file(tmp_path, case)
    with pytest.raises(ConditionError) as err:
        make_condition(gen, inputs=path)
    message = str(err.value)
    assert str(path) in message and all(n in message for n in BAD_FILES[case]), message


def test_requests_the_generator_cannot_take_are_refused(gen, heldout_task):
    x = unlabelled_inputs(heldout_task, 8)
    with pytest.raises(ConditionError, match="--description: this generator is conditioned on 'unlabelled'"):
        make_condition(gen, description="digits rotated by 40 degrees")
    with pytest.raises(ConditionError, match="--examples 5 draws inputs of a --task; --inputs gives them"):
        make_condition(gen, inputs=x, examples=5)
    with pytest.raises(ConditionError, match="exactly one of --task, --description or --inputs"):
        make_condition(gen, task=heldout_task, inputs=x)
    pipe = WeightDiffusionPipeline.from_pretrained(gen.path)
    with pytest.raises(ConditionError, match="not on labelled examples; pass unlabelled inputs alone as inputs=x"):
        pipe.condition(examples=(x, torch.zeros(8, dtype=torch.long)))

    class TextGenerator:  # only the config is read before the request is refused
        config = {"model": {"condition": "text"}, "zoo": {"family": "rotdigits"}}

    with pytest.raises(ConditionError, match="--inputs: this generator is conditioned on 'text'"):
        make_condition(TextGenerator(), inputs=x)


def test_cli_samples_from_an_inputs_file_and_reports_a_bad_one_in_one_line(generator_dir, heldout_task, tmp_path,
                                                                          capsys):
    file = tmp_path / "inputs.safetensors"
    save_weights(file, {"x": unlabelled_inputs(heldout_task, 20, seed=2)})
    out = tmp_path / "samples"
    common = ["sample", "--model", str(generator_dir), "--num", "2", "--steps", "2", "--no-cache"]
    assert main([*common, "--inputs", str(file), "--out", str(out)]) == 0
    meta = json.loads((out / "sample_0001" / "sample.json").read_text())
    assert meta["condition"]["inputs"] == str(file) and meta["condition"]["examples"] == 20

    (tmp_path / "bad").mkdir()
    bad = _bad_file(tmp_path / "bad", "shape")
    capsys.readouterr()
    assert main([*common, "--inputs", str(bad), "--out", str(tmp_path / "nothing")]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("weightdiff: error:") and str(bad) in line and "expected (K, 64)" in line
    assert not (tmp_path / "nothing").exists() or not any((tmp_path / "nothing").iterdir())
    assert main([*common, "--inputs", str(file), "--task", heldout_task, "--out", str(tmp_path / "both")]) == 2
    assert "exactly one of --task, --description and --inputs" in capsys.readouterr().err
