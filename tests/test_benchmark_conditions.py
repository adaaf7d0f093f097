"""The benchmark with several generators in one run, and baselines that read the tasks' text.

A tiny real rotdigits LoRA zoo; the generators are stubs (noisy copies of zoo adapters), so
what is tested is the protocol's wiring: which rows exist, in which order, what each row's
models are, and what retrieval and the hypernetworks read.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import weightdiff.evaluate.benchmark as benchmark
from weightdiff.evaluate.report import slug
from weightdiff.models.conditioning import text_condition
from weightdiff.tasks import get_task


@pytest.fixture(scope="module")
def lora_zoo(tmp_path_factory):
    from weightdiff.zoo import Recipe, RotationGrid, build_zoo

    grid = RotationGrid(angle_step=60.0, flips=[0], far_holes=[[30.0, 150.0]], far_step=200.0, far_min_distance=30.0,
                        near_holes=[[-40.0, -20.0]], near_max_distance=30.0)
    recipe = Recipe(name="c-lora", kind="lora", family="rotdigits", generator=grid, runs=2, rank=4, alpha=8.0,
                    target_modules=["fc1", "fc2"], steps=30, lr=0.03)
    return build_zoo(recipe, tmp_path_factory.mktemp("zoos"), progress=False)


def _stubs(zoo_path, monkeypatch):
    """Two stub generators, a text one and a code one, whose samples differ (offset copies of the zoo).

    Returns ``(calls, decoded)``: every ``(condition kind, condition)`` sampled, and ``decoded(num, offset)``,
    the params a stub with that offset returns for ``num`` samples."""
    from weightdiff.weights.tokenizer import WeightTokenizer
    from weightdiff.zoo import Zoo

    zoo = Zoo.open(zoo_path)
    sds = [zoo.load(r["id"]) for r in zoo.rows("train")]
    tok = WeightTokenizer.from_state_dict(sds[0], token_size=32).fit(sds)
    calls: list[tuple[str, object]] = []

    def stub(condition: str, offset: int):
        return type("Stub", (), {"kind": "lora", "tokenizer": tok, "offset": offset,
                                 "config": {"zoo": {"family": "rotdigits"}, "model": {"condition": condition},
                                            "sampling": {"sampler": "ddim", "steps": 10}}})()

    gens = {"text-model": stub("text", 0), "code-model": stub("code", 1)}

    def fake_generate(gen, cond, num, settings, **kw):
        calls.append((gen.config["model"]["condition"], cond))
        picked = [sds[(i + gen.offset) % len(sds)] for i in range(num)]
        return tok.encode_batch(picked), False

    monkeypatch.setattr(benchmark, "load_generator", lambda path: gens[str(path)])
    monkeypatch.setattr(benchmark, "make_condition", lambda gen, task=None, description=None, **kw: description or task)
    monkeypatch.setattr(benchmark, "generate_tokens", fake_generate)
    def decoded(num: int, offset: int = 0):
        return tok.decode_float(tok.encode_batch([sds[(i + offset) % len(sds)] for i in range(num)]))

    return calls, decoded


def test_a_second_generator_is_a_row_of_the_same_run(lora_zoo, tmp_path, monkeypatch):
    calls, decoded = _stubs(lora_zoo, monkeypatch)
    out = tmp_path / "bench"
    r = benchmark.run_benchmark("adapt-lora", ["text-model", "code-model"], lora_zoo, out, num=3, hypernet_steps=5,
                                sgd_tasks=0, select_per_class=0, from_description=True, progress=False)
    for section in ("seen", "unseen"):
        names = list(r[section])
        assert "generated (code)" in names
        # right after the first generator's own rows, before every baseline
        assert names.index("generated (code)") == names.index("generated ensemble of 3") + 1
    other = r["other_generators"]["generated (code)"]
    assert other["model"] == "code-model" and other["condition"] == "code"
    assert other["model_evaluations"] == 10 and other["latency_ms_per_sample"] > 0
    # The text generator reads the held-out paraphrase; the code generator the task itself.
    unseen = r["settings"]["unseen_tasks"][0]
    assert ("text", benchmark.heldout_description(get_task(unseen))) in calls
    assert ("code", unseen) in calls
    # Its row is scored from its own samples: the saved predictions recompute its mean, and it
    # differs from the first generator's (the stubs return different zoo entries).
    seen = r["settings"]["seen_tasks"][0]
    npz = np.load(out / "predictions" / f"seen__{slug(seen)}__{slug('generated (code)')}.npz")
    acc = (npz["predictions"] == npz["labels"][None]).mean(1)
    assert acc.mean() == pytest.approx(r["per_task"]["seen"][seen]["generated (code)"]["mean"], abs=1e-6)
    first = np.load(out / "predictions" / f"seen__{slug(seen)}__generated.npz")
    assert not np.array_equal(first["predictions"], npz["predictions"])
    assert "row 'generated (code)': code-model (code condition)" in (out / "results.md").read_text()
    # The ensemble row: the first generator's 3 samples as one model (the argmax of their mean softmax).
    from weightdiff.evaluate.rows import ZooState
    from weightdiff.zoo import Zoo

    z = ZooState(Zoo.open(lora_zoo), num=3, seed=0)
    samples = {k: v.float() for k, v in decoded(3).items()}
    x = get_task(seen).data().x_test
    expected = z.target.forward_batched(samples, x).softmax(-1).mean(0).argmax(-1)
    ens = np.load(out / "predictions" / f"seen__{slug(seen)}__{slug('generated ensemble of 3')}.npz")
    assert np.array_equal(ens["predictions"][0], expected.numpy())
    assert list(r["seen"]).index("generated ensemble of 3") < list(r["seen"]).index("generated (code)")


def test_text_suite_baselines_read_the_description_embedding(lora_zoo, tmp_path, monkeypatch):
    from weightdiff.zoo import Zoo

    suite = tmp_path / "text-suite.yaml"
    suite.write_text("name: adapt-text\nkind: lora\nfamily: rotdigits\nbaseline_condition: text\n")
    _stubs(lora_zoo, monkeypatch)
    fitted = {}
    real_fit = benchmark.ZooState.fit_hypernets

    def spy(self, steps, weight):
        fitted["width"] = next(iter(self.features.values())).shape
        return real_fit(self, steps, weight)

    monkeypatch.setattr(benchmark.ZooState, "fit_hypernets", spy)
    r = benchmark.run_benchmark(suite, "text-model", lora_zoo, tmp_path / "bench", num=2, hypernet_steps=5,
                                sgd_tasks=0, select_per_class=0, from_description=True, progress=False)
    assert r["settings"]["baseline_condition"] == "text"
    assert fitted["width"] == (384 + get_task(r["settings"]["seen_tasks"][0]).NUMERIC_DIM,)
    assert any("description embedding" in n for n in r["notes"])
    # Retrieval of an unseen task: the training task whose mean description embedding is nearest
    # to the held-out description's, computed here independently.
    zoo = Zoo.open(lora_zoo)
    by_task: dict[str, list[str]] = {}
    for row in zoo.rows("train"):
        by_task.setdefault(row["task"], row["descriptions"])
    names = sorted(by_task)
    feats = torch.stack([text_condition(by_task[t], "rotdigits").mean(0) for t in names])
    for unseen in r["settings"]["unseen_tasks"]:
        query = text_condition([benchmark.heldout_description(get_task(unseen))], "rotdigits")[0]
        nearest = names[int(torch.argmin((feats - query).pow(2).sum(1)))]
        ids = np.load(tmp_path / "bench" / "predictions" / f"unseen__{slug(unseen)}__retrieval.npz")["ids"]
        assert sorted(ids.tolist()) == sorted(row["id"] for row in zoo.rows("train") if row["task"] == nearest)


def test_an_unknown_baseline_condition_names_the_field(tmp_path):
    from weightdiff.errors import BenchmarkError
    from weightdiff.tasks.suites import load_suite

    suite = tmp_path / "bad.yaml"
    suite.write_text("name: x\nkind: lora\nfamily: rotdigits\nbaseline_condition: examples\n")
    with pytest.raises(BenchmarkError, match=r"bad.yaml: field 'baseline_condition' expected one of \['code', 'text'\]"):
        load_suite(suite)


def test_polishing_is_refused_on_an_adapter_suite_before_anything_is_written(lora_zoo, tmp_path):
    from weightdiff.errors import BenchmarkError

    out = tmp_path / "bench"
    with pytest.raises(BenchmarkError, match="polish_steps is for whole-network suites.*'adapt-lora' is a lora suite"):
        benchmark.run_benchmark("adapt-lora", None, lora_zoo, out, polish_steps=5, progress=False)
    with pytest.raises(BenchmarkError, match="polish_steps must be >= 0, got -1"):
        benchmark.run_benchmark("adapt-lora", None, lora_zoo, out, polish_steps=-1, progress=False)
    assert not out.exists()


def test_adapter_suites_get_the_adaptation_rows_and_generate_then_refine(lora_zoo, tmp_path, monkeypatch):
    from weightdiff.evaluate.adaptation import knn_lora_average
    from weightdiff.evaluate.baselines import select
    from weightdiff.evaluate.rows import ZooState
    from weightdiff.evaluate.weights import evaluate_params
    from weightdiff.zoo import Zoo

    _stubs(lora_zoo, monkeypatch)
    out = tmp_path / "bench"
    r = benchmark.run_benchmark("adapt-lora", "text-model", lora_zoo, out, num=2, hypernet_steps=5, sgd_tasks=1,
                                sgd_ks=(1, 5), select_per_class=0, multitask_steps=20, progress=False)
    for section in ("seen", "unseen"):
        names = list(r[section])
        assert {"multi-task LoRA", "kNN LoRA average (k=3)"} <= set(names)
        assert names.index("kNN LoRA average (k=3)") == names.index("average") - 1
        assert "test-time adaptation (TENT)" not in names  # the DigitsMLP base has no normalisation layer
    assert r["adaptation"]["multitask"]["steps"] == 20 and r["adaptation"]["tent"] is None
    # generate-then-refine: the same k as few-shot SGD, at a tenth of the recipe's learning rate
    assert set(r["refine"]) == set(r["sgd"]) == {"1", "5"}
    assert r["settings"]["refine_lr"] == pytest.approx(0.1 * 0.03)
    assert "generate-then-refine %" in (out / "results.md").read_text()
    # The kNN row of an unseen task is the average of its 3 nearest training tasks' first-seed adapters.
    zoo = Zoo.open(lora_zoo)
    z = ZooState(zoo, num=2, seed=0)
    names = sorted(z.index)
    picked = [next(i for i in z.index[t] if z.rows[i]["seed"] == 0) for t in names]
    unseen = get_task(r["settings"]["unseen_tasks"][0])
    knn = knn_lora_average(unseen.code().float(), torch.stack([z.codes[t] for t in names]), select(z.params, picked))
    acc, _ = evaluate_params(z.target, unseen, knn.params)
    assert acc.item() == pytest.approx(r["per_task"]["unseen"][unseen.name]["kNN LoRA average (k=3)"]["mean"], abs=1e-9)


def test_the_cordigits_suite_adapts_its_vit_base_at_test_time_on_the_unlabelled_batch(tiny_cordigits_zoo, tmp_path,
                                                                                        monkeypatch):
    """On a LayerNorm base the run gets a TENT row, adapted on exactly the K unlabelled test inputs the
    unlabelled generator reads; every held-out kind, 'novel' included, is reported apart."""
    from weightdiff.evaluate.adaptation import tent
    from weightdiff.models.conditioning import unlabelled_inputs
    from weightdiff.weights.tokenizer import WeightTokenizer
    from weightdiff.zoo import Zoo

    zoo_path = tiny_cordigits_zoo
    zoo = Zoo.open(zoo_path)
    sds = [zoo.load(r["id"]) for r in zoo.rows("train")]
    tok = WeightTokenizer.from_state_dict(sds[0], token_size=64).fit(sds)

    def stub(condition, k):
        return type("Stub", (), {"kind": "lora", "tokenizer": tok, "config": {
            "zoo": {"family": "cordigits"}, "model": {"condition": condition},
            "data": {"num_examples": k}, "sampling": {"sampler": "ddim", "steps": 10}}})()

    gens = {"text": stub("text", 16), "unlabelled": stub("unlabelled", 24)}
    monkeypatch.setattr(benchmark, "load_generator", lambda path: gens[str(path)])
    monkeypatch.setattr(benchmark, "make_condition", lambda gen, task=None, description=None, **kw: task)
    monkeypatch.setattr(benchmark, "generate_tokens",
                        lambda gen, cond, num, settings, **kw: (tok.encode_batch(sds[:num]), False))
    r = benchmark.run_benchmark("cordigits-lora", ["text", "unlabelled"], zoo_path, tmp_path / "bench", num=2,
                                hypernet_steps=5, sgd_tasks=0, select_per_class=0, multitask_steps=10, progress=False)
    assert set(r["unseen_by_kind"]) == {"near", "far", "combo", "novel"}
    assert r["adaptation"]["tent"]["unlabelled_examples"] == 24
    assert r["settings"]["baseline_condition"] == "text"
    base = zoo.base_module()
    for name in r["settings"]["unseen_tasks"]:
        task = get_task(name)
        expected = tent(base, unlabelled_inputs(task, 24, seed=0), task.data().x_test).predictions
        acc = (expected == task.data().y_test).float().mean().item()
        assert r["per_task"]["unseen"][name]["test-time adaptation (TENT)"]["mean"] == pytest.approx(acc, abs=1e-9)
        assert "generated (unlabelled)" in r["per_task"]["unseen"][name]
