"""Tests of weightdiff.evaluate: batched evaluation, baselines, hypernetworks, novelty, reports."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests._tolerance import matmul_tol, network_tol, ridge_prediction_tol
from weightdiff.errors import BenchmarkError, TargetMismatchError, WeightFileError
from weightdiff.evaluate.baselines import (
    average_params, canonical_params, floor_predictions, gaussian_params, nearest_task, noise_added_params,
    stack_params, zero_adapter,
)
from weightdiff.evaluate.hypernet import HypernetTrainConfig, ParamCodec, RidgeHypernet, train_mlp_hypernet
from weightdiff.evaluate.novelty import ComparisonSpace, wrong_set_iou
from weightdiff.evaluate.report import RESULT_KEYS, aggregate, slug, task_stats, write_results
from weightdiff.evaluate.weights import evaluate_params, find_weight_paths, load_weight_sets, target_for
from weightdiff.io import save_weights
from weightdiff.targets import Target
from weightdiff.tasks import get_task




def _random_nets(task, num: int, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return stack_params([dict(task.build_network().state_dict()) for _ in range(num)])


@pytest.fixture(scope="module")
def digits():
    return get_task("digits")


# ----------------------------------------------------------------------------------- evaluation
def test_batched_evaluation_equals_per_model_loop(digits):
    target = Target.full(digits.build_network())
    params = _random_nets(digits, 5)
    acc, preds = evaluate_params(target, digits, params, chunk=2, input_chunk=128)  # odd chunks on purpose
    x, y = digits.data().split("test")
    for i in range(5):
        net = digits.build_network()
        net.load_state_dict({k: v[i] for k, v in params.items()}, strict=True)
        with torch.no_grad():
            p = net.eval()(x).argmax(-1)
        assert torch.equal(preds[i], p)
        assert acc[i].item() == pytest.approx((p == y).float().mean().item(), abs=1e-7)


def test_load_weight_sets_stacks_and_names_mismatch(tmp_path, digits):
    params = _random_nets(digits, 2)
    for i in range(2):
        save_weights(tmp_path / f"s{i}" / "model.safetensors", {k: v[i] for k, v in params.items()})
    ws = load_weight_sets(find_weight_paths(tmp_path))
    assert ws.kind == "full" and ws.ids == ["s0", "s1"]
    assert all(torch.equal(ws.params[k], params[k]) for k in params)
    target_for(ws, digits)  # fits the digits network strictly

    bad = {k: v[0] for k, v in params.items()}
    bad["fc.weight"] = torch.zeros(3, 3)
    save_weights(tmp_path / "s2" / "model.safetensors", bad)
    with pytest.raises(TargetMismatchError, match=r"s2/model\.safetensors.*'fc\.weight'.*\(3, 3\)"):
        load_weight_sets(find_weight_paths(tmp_path))
    missing = {k: v[0] for k, v in params.items() if k != "conv1.bias"}
    save_weights(tmp_path / "s2" / "model.safetensors", missing)
    with pytest.raises(TargetMismatchError, match=r"s2/model\.safetensors: missing key 'conv1\.bias'"):
        load_weight_sets(find_weight_paths(tmp_path))
    with pytest.raises(WeightFileError, match="matches no checkpoint"):
        find_weight_paths(str(tmp_path / "nothing*"))


# -------------------------------------------------------------------------------------- novelty
def test_wrong_set_iou_hand_cases():
    labels = torch.tensor([0, 0, 0, 0])
    zoo = torch.tensor([[0, 1, 1, 0],    # wrong on {1, 2}
                        [1, 1, 0, 0],    # wrong on {0, 1}
                        [0, 0, 0, 0]])   # wrong on {}
    preds = torch.tensor([[1, 1, 0, 0],  # {0, 1}: IoU 1/3 with zoo 0, 1 with zoo 1
                          [0, 0, 0, 0],  # {}: IoU(∅, ∅) = 0 by definition, and 0 with non-empty sets
                          [0, 0, 0, 1]]) # {3}: disjoint from every zoo set
    assert wrong_set_iou(preds, labels, zoo).tolist() == pytest.approx([1.0, 0.0, 0.0])
    # Excluding zoo 1 (the model itself) leaves the best match zoo 0 at 1/3.
    iou = wrong_set_iou(preds, labels, zoo, exclude=[1, None, None])
    assert iou.tolist() == pytest.approx([1 / 3, 0.0, 0.0])
    # A zoo checkpoint compared with its own zoo, excluding itself.
    self_iou = wrong_set_iou(zoo, labels, zoo, exclude=[0, 1, 2])
    assert self_iou.tolist() == pytest.approx([1 / 3, 1 / 3, 0.0])
    assert math.isnan(wrong_set_iou(zoo[:1], labels, zoo[:1], exclude=[0]).item())


def test_comparison_space_ignores_symmetries(digits):
    from weightdiff.weights.canonical import permute_state_dict, random_permutations, sequential_permutation_spec

    target = Target.full(digits.build_network())
    zoo = _random_nets(digits, 3)
    space = ComparisonSpace(target, zoo)
    one = {k: v[1] for k, v in zoo.items()}
    spec = sequential_permutation_spec(one)
    permuted = permute_state_dict(one, spec, random_permutations(one, spec, torch.Generator().manual_seed(1)))
    d = space.nearest_distance(stack_params([permuted]))
    assert d.item() == 0.0  # a permuted copy of a zoo checkpoint, aligned back, is the checkpoint itself
    noisy = {k: v + 0.05 * v.std() * torch.randn(v.shape, generator=torch.Generator().manual_seed(2))
             for k, v in permuted.items()}
    d = space.nearest_distance(stack_params([noisy]))
    assert 0.02 < d.item() < 0.08  # ~5 % of each tensor's std, not the distance to another network
    assert space.nearest_distance(zoo, exclude=[0, 1, 2]).min().item() > 0.5  # independent networks are far apart


def test_comparison_space_aligns_each_run_as_one(digits):
    """With groups, a run's checkpoints share one permutation, so their distance is the plain one."""
    from weightdiff.weights.canonical import permute_state_dict, random_permutations, sequential_permutation_spec

    target = Target.full(digits.build_network())
    base = _random_nets(digits, 2)
    gen = torch.Generator().manual_seed(3)
    step = {k: 0.1 * v.std() * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    # runs A and B, two checkpoints each: a network and the same network a small step later
    zoo = {k: torch.stack([v[0], v[0] + step[k][0], v[1], v[1] + step[k][1]]) for k, v in base.items()}
    space = ComparisonSpace(target, zoo, groups=["A", "A", "B", "B"])
    assert space.refine == 0 and set(space.groups) == {"A", "B"}
    pts = torch.cat([(v / space.scale[k]).flatten(1) for k, v in zoo.items()], 1).double()
    plain = [float((pts[1] - pts[0]).norm() / pts.shape[1] ** 0.5), float((pts[3] - pts[2]).norm() / pts.shape[1] ** 0.5)]
    # a permutation is an isometry of the per-tensor z-scored space: equal up to float32 z-scoring
    assert space.within_group_spacing(["A", "A", "B", "B"]) == pytest.approx(sum(plain) / 2, rel=1e-5)
    # a permuted copy of A's first checkpoint, a quarter step on: found in run A, no farther than as it is
    one = {k: v[0] + 0.25 * step[k][0] for k, v in base.items()}
    spec = sequential_permutation_spec(one)
    permuted = permute_state_dict(one, spec, random_permutations(one, spec, torch.Generator().manual_seed(4)))
    d, index = space.nearest(stack_params([permuted]))
    assert int(index[0]) in (0, 1)
    assert float(d[0]) <= 0.25 * plain[0] * (1 + 1e-5)
    # the zoo against itself: each checkpoint's nearest other is the other checkpoint of its run
    d, index = space.nearest(zoo, exclude=[0, 1, 2, 3])
    assert index.tolist() == [1, 0, 3, 2]
    assert d.tolist() == pytest.approx([plain[0], plain[0], plain[1], plain[1]], rel=1e-5)
    with pytest.raises(ValueError, match="one per zoo checkpoint"):
        ComparisonSpace(target, zoo, groups=["A", "B"])


# ------------------------------------------------------------------------------------ baselines
def test_average_gaussian_noise_shapes_and_values():
    params = {"w": torch.arange(12.0).reshape(3, 2, 2), "b": torch.tensor([[1.0], [2.0], [3.0]])}
    avg = average_params(params)
    assert avg["w"].shape == (1, 2, 2) and torch.equal(avg["w"][0], params["w"].mean(0))
    g = gaussian_params(params, 500, seed=0)
    assert g["w"].shape == (500, 2, 2) and g["b"].shape == (500, 1)
    # sampling error of 500 draws from N(2, 1): 4 standard errors of the mean (1/sqrt(n)) and of the std (1/sqrt(2n))
    assert torch.allclose(g["b"].mean(0), torch.tensor([2.0]), rtol=0, atol=4 / math.sqrt(500))
    assert torch.allclose(g["b"].std(0), torch.tensor([1.0]), rtol=0, atol=4 / math.sqrt(2 * 500))
    assert torch.equal(gaussian_params(params, 4, seed=3)["w"], gaussian_params(params, 4, seed=3)["w"])
    noisy = noise_added_params(params, 0.1, seed=0)
    assert noisy["w"].shape == params["w"].shape
    rel = (noisy["w"] - params["w"]).flatten(1).std(1) / params["w"].flatten(1).std(1)
    assert 0.01 < float(rel.mean()) < 0.3
    assert torch.equal(noise_added_params(params, 0.0)["w"], params["w"])


def test_retrieval_floor_and_zero_adapter():
    codes = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    assert nearest_task(torch.tensor([0.2, 0.9]), codes) == "b"
    task = get_task("digits")
    floor = floor_predictions(task)
    y_train = task.data().y_train
    assert floor.shape == (1, task.data().y_test.shape[0])
    assert int(floor[0, 0]) == int(torch.bincount(y_train).argmax())
    rot = get_task("rotdigits:angle=30,flip=0")
    base = rot.build_network()
    target = Target.lora(base, rot.default_lora_config())
    zero = zero_adapter(target)
    x = rot.data().x_test[:16]
    with torch.no_grad():
        ref = base(x)
        torch.testing.assert_close(target.forward_batched(zero, x)[0], ref, rtol=0, atol=network_tol(base, ref))


def test_canonical_lora_keeps_function():
    rot = get_task("rotdigits:angle=30,flip=0")
    target = Target.lora(rot.build_network(), rot.default_lora_config())
    torch.manual_seed(0)
    params = {k: 0.1 * torch.randn(3, *s) for k, s in target.param_shapes().items()}
    canon, ref = canonical_params(params, "lora")
    assert ref is None
    x = rot.data().x_test[:32]
    with torch.no_grad():
        ref = target.forward_batched(params, x)
        torch.testing.assert_close(target.forward_batched(canon, x), ref, rtol=0,
                                   atol=network_tol(rot.build_network(), ref))


# -------------------------------------------------------------------------------- hypernetworks
def test_ridge_recovers_exact_linear_map():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=gen)
    w, b = torch.randn(3, 7, generator=gen), torch.randn(7, generator=gen)
    y = x @ w + b
    groups = [f"t{i // 2}" for i in range(40)]  # two rows per task: CV holds whole tasks out
    ridge = RidgeHypernet().fit(x, y, groups)
    assert ridge.alpha_ == min(ridge.alphas)  # exact data: the least regularisation wins the CV
    x_new = torch.randn(5, 3, generator=gen)
    # Off only by the targets' float32 rounding, the α = 1e-6 shrinkage and the float32 output.
    atol = ridge_prediction_tol(x, x_new, w, b, ridge.alpha_)
    torch.testing.assert_close(ridge.predict(x_new), x_new @ w + b, rtol=0, atol=atol)
    # A thousand times the penalty shrinks the predictions far past that bound.
    shrunk = RidgeHypernet(alphas=(1e-3,)).fit(x, y, groups).predict(x_new)
    assert float((shrunk - (x_new @ w + b)).abs().max()) > 10 * atol


def test_param_codec_round_trip():
    params = {"w": torch.randn(4, 2, 3), "b": torch.randn(4, 2)}
    codec = ParamCodec.fit(params)
    flat = codec.flatten(params)
    assert flat.shape == (4, 8)
    w = flat[:, :6]  # "w" standardised by its own float64 mean and std: 0 and 1 up to float32 rounding
    assert abs(float(w.mean())) <= matmul_tol(reduction=w.numel(), scale=float(w.abs().max()), depth=2)
    assert abs(float(w.std()) - 1) <= matmul_tol(reduction=w.numel(), scale=float(w.pow(2).max()), depth=2)
    back = codec.unflatten(flat)
    # (v - mean) / std * std + mean in float32: four roundings, at most 2 eps (|v| + |mean|)
    eps = torch.finfo(torch.float32).eps
    for k in params:
        atol = 2 * eps * (float(params[k].abs().max()) + abs(codec.mean[k]))
        torch.testing.assert_close(back[k], params[k], rtol=0, atol=atol)


def test_mlp_hypernet_loss_goes_down():
    torch.manual_seed(0)  # the base network's initialisation: independent of which tests ran before
    tasks = [get_task(f"rotdigits:angle={a},flip=0") for a in (-60, 0, 60)]
    base = tasks[0].build_network()
    target = Target.lora(base, tasks[0].default_lora_config())
    gen = torch.Generator().manual_seed(0)
    params = {k: 0.1 * torch.randn(6, *s, generator=gen) for k, s in target.param_shapes().items()}
    codec = ParamCodec.fit(params)
    conds = torch.stack([t.code() for t in tasks for _ in range(2)])
    row_task = torch.tensor([i for i in range(3) for _ in range(2)])
    data = [(t.data().x_train, t.data().y_train) for t in tasks]
    cfg = HypernetTrainConfig(steps=150, lr=3e-3, batch_size=6, functional_batch=32, hidden=64,
                              functional_loss_weight=1.0)
    model, history = train_mlp_hypernet(target, codec, conds, codec.flatten(params), row_task, data, cfg)
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < 0.8 * first
    assert model(conds).shape == (6, codec.num_params)


# ------------------------------------------------------------------------------------- reports
def test_report_writes_required_keys(tmp_path):
    stats = {"t1": {"generated": task_stats(torch.tensor([0.5, 0.7, 0.6]), torch.tensor([0.2, float("nan"), 0.2]),
                                            torch.tensor([0.0, 3.0, float("nan")])),
                    "floor": task_stats(torch.tensor([0.1]), torch.tensor([0.9]), None)}}
    agg = aggregate(stats, ["t1"], spacing=2.0)
    assert agg["generated"]["mean"] == pytest.approx(0.6) and agg["generated"]["iou"] == pytest.approx(0.2)
    assert agg["generated"]["distance_ratio"] == pytest.approx(0.75)  # mean 1.5 over the two known
    assert agg["generated"]["distance_median"] == pytest.approx(1.5)   # torch's median of [0, 3]: their midpoint
    assert agg["floor"]["distance"] is None
    results = {"suite": "digits-cnn", "seen": agg, "unseen": {}, "unseen_by_kind": {},
               "latency_ms_per_sample": 1.5, "generation_seconds": 0.1, "sgd": {"1": {"accuracy": 0.3, "seconds": 0.2}},
               "sgd_examples_to_match": None, "settings": {"num": 2, "seen_tasks": ["t1"]}}
    json_path, md_path = write_results(tmp_path, results)
    loaded = json.loads(json_path.read_text())
    assert set(RESULT_KEYS) <= set(loaded)
    assert loaded["seen"]["floor"]["distance"] is None  # NaN/None never reach the JSON as NaN
    assert "| generated | 70.0 | 60.0 |" in md_path.read_text()
    whole = {**results, "runs_in_zoo": 2, "basins_covered": 1, "within_run_spacing": 0.5}
    _, md_path = write_results(tmp_path / "whole", whole)
    assert "median nearest-zoo distance 3.00 within-run spacings (mean 3.00)" in md_path.read_text()
    with pytest.raises(KeyError, match="sgd"):
        write_results(tmp_path, {k: v for k, v in results.items() if k != "sgd"})


# ------------------------------------------------------------------------- zoo and benchmark
@pytest.fixture(scope="module")
def tiny_zoos(tmp_path_factory):
    """A LoRA zoo (4 training tasks x 2 runs, 2 held-out tasks) and a full digits zoo, built for real."""
    from weightdiff.zoo import Recipe, RotationGrid, build_zoo

    root = tmp_path_factory.mktemp("zoos")
    grid = RotationGrid(angle_step=60.0, flips=[0], far_holes=[[30.0, 150.0]], far_step=200.0, far_min_distance=30.0,
                        near_holes=[[-40.0, -20.0]], near_max_distance=30.0)
    lora = Recipe(name="t-lora", kind="lora", family="rotdigits", generator=grid, runs=2, rank=4, alpha=8.0,
                  target_modules=["fc1", "fc2"], steps=40, lr=0.03)
    full = Recipe(name="t-digits", kind="full", family="digits", tasks=["digits"], runs=2, epochs=3,
                  checkpoint_epochs=[2, 3], lr=3e-3)
    return build_zoo(lora, root, progress=False), build_zoo(full, root, progress=False)


def test_zoo_checkpoints_score_their_manifest_accuracy(tiny_zoos, tmp_path):
    from weightdiff.cli import main
    from weightdiff.zoo import Zoo

    for path in tiny_zoos:
        zoo = Zoo.open(path)
        for task in zoo.tasks()[:2]:
            rows = [r for r in zoo.rows() if r["task"] == task]
            ws = load_weight_sets([zoo.entry_dir(r["id"]) for r in rows])  # base found from the zoo folder
            acc, _ = evaluate_params(target_for(ws, get_task(task)), get_task(task), ws.params)
            for a, r in zip(acc.tolist(), rows):
                assert a == pytest.approx(r["metrics"]["test_acc"], abs=2.5e-3)  # at most one test example apart
    zoo = Zoo.open(tiny_zoos[0])
    row = zoo.rows("heldout")[0]
    out = tmp_path / "eval.json"
    args = ["evaluate", "--task", row["task"], "--weights", str(zoo.entry_dir(row["id"])), "--json", str(out)]
    assert main(args) == 0
    assert json.loads(out.read_text())["mean"] == pytest.approx(row["metrics"]["test_acc"], abs=2.5e-3)
    # LoRA adapters evaluated as a full digits network: a user error, one line and exit status 2.
    assert main(["evaluate", "--task", "digits", "--weights", str(zoo.entry_dir(row["id"]))]) == 2


def test_run_benchmark_end_to_end_with_a_stub_generator(tiny_zoos, tmp_path, monkeypatch):
    """The whole protocol on a tiny zoo; the generator is replaced by noisy copies of zoo adapters."""
    import numpy as np

    import weightdiff.evaluate.benchmark
    from weightdiff.evaluate.benchmark import heldout_description, run_benchmark
    from weightdiff.weights.tokenizer import WeightTokenizer
    from weightdiff.zoo import Zoo

    zoo = Zoo.open(tiny_zoos[0])
    sds = [zoo.load(r["id"]) for r in zoo.rows("train")]
    tok = WeightTokenizer.from_state_dict(sds[0], token_size=32).fit(sds)
    calls = []

    class Stub:
        kind, tokenizer = "lora", tok
        config = {"zoo": {"family": "rotdigits"}, "model": {"condition": "text"}}

    def fake_generate(gen, cond, num, settings, **kw):
        calls.append(cond)
        gen_ = torch.Generator().manual_seed(len(calls))
        return tok.encode_batch([sds[i % len(sds)] for i in range(num)]) + 0.01 * torch.randn(
            num, *tok.encode_batch(sds[:1]).shape[1:], generator=gen_), False

    monkeypatch.setattr(weightdiff.evaluate.benchmark, "load_generator", lambda path: Stub())
    monkeypatch.setattr(weightdiff.evaluate.benchmark, "make_condition",
                        lambda gen, task=None, description=None, **kw: description)
    monkeypatch.setattr(weightdiff.evaluate.benchmark, "generate_tokens", fake_generate)
    r = run_benchmark("adapt-lora", "stub-model", tiny_zoos[0], tmp_path / "bench", num=3, hypernet_steps=20,
                      sgd_tasks=1, sgd_ks=(1, "all"), from_description=True, progress=False)
    assert set(RESULT_KEYS) <= set(r)
    assert r["settings"]["unseen_tasks"] == zoo.tasks("heldout")
    assert set(r["unseen_by_kind"]) == {"near", "far"}
    for section in ("seen", "unseen"):
        assert {"generated", "retrieval", "base without adapter", "linear hypernetwork", "MLP hypernetwork",
                "average", "gaussian", "noise-added 0.5", "floor"} <= set(r[section])
    # Free-text conditions: held-out paraphrases, one per task (plus the warm-up call).
    task = get_task(zoo.tasks("heldout")[0])
    assert heldout_description(task) in calls and "turned" in heldout_description(task)
    assert r["latency_ms_per_sample"] > 0 and set(r["sgd"]) == {"1", "all"}
    # Every number can be recomputed from the saved predictions.
    seen_task = r["settings"]["seen_tasks"][0]
    npz = np.load(tmp_path / "bench" / "predictions" / f"seen__{slug(seen_task)}__generated.npz")
    acc = (npz["predictions"] == npz["labels"][None]).mean(1)
    assert acc.mean() == pytest.approx(r["per_task"]["seen"][seen_task]["generated"]["mean"], abs=1e-6)
    for name in ("results.json", "results.md", "accuracy_distributions.png", "accuracy_vs_iou.png",
                 "accuracy_vs_distance.png"):
        assert (tmp_path / "bench" / name).stat().st_size > 0


def test_full_suite_benchmark_reports_one_step_row_evaluations_and_basins(tiny_zoos, tmp_path, monkeypatch):
    """A multi-step sampler gets a 'generated one-step' row from the same model in the same run, the
    number of model evaluations, and, for whole networks, how many of the zoo's runs it covers."""
    import weightdiff.evaluate.benchmark
    from weightdiff.evaluate.benchmark import run_benchmark
    from weightdiff.weights.tokenizer import WeightTokenizer
    from weightdiff.zoo import Zoo

    zoo = Zoo.open(tiny_zoos[1])
    rows = zoo.rows("train")
    sds = [zoo.load(r["id"]) for r in rows]
    tok = WeightTokenizer.from_state_dict(sds[0], token_size=32).fit(sds)
    samplers = []

    class Stub:
        kind, tokenizer = "full", tok
        config = {"zoo": {"family": "digits"}, "model": {"condition": "none"}, "sampling": {"sampler": "ddim", "steps": 4}}

    def fake_generate(gen, cond, num, settings, **kw):
        samplers.append(settings.sampler)
        pick = [0] * num if settings.sampler == "x0" else [i % len(sds) for i in range(num)]  # one-step: run 0 only
        return tok.encode_batch([sds[i] for i in pick]), False

    monkeypatch.setattr(weightdiff.evaluate.benchmark, "load_generator", lambda path: Stub())
    monkeypatch.setattr(weightdiff.evaluate.benchmark, "make_condition", lambda gen, task=None, **kw: task)
    monkeypatch.setattr(weightdiff.evaluate.benchmark, "generate_tokens", fake_generate)
    r = run_benchmark("digits-cnn", "stub-model", tiny_zoos[1], tmp_path / "bench", num=4, hypernet_steps=5,
                      sgd_tasks=0, polish_steps=2, progress=False)
    assert r["sampler"] == {"sampler": "ddim", "steps": 4, "model_evaluations": 4, "latent_noise": 0.0}
    # continued training of the samples and of the zoo's own checkpoints, each a row of the same run
    task = r["settings"]["seen_tasks"][0]
    for row in ("generated + 2 task-loss steps", "zoo + 2 task-loss steps"):
        assert r["per_task"]["seen"][task][row]["num"] == 4 and r["seen"][row]["distance"] > 0
    assert r["settings"]["polish_steps"] == 2 and r["settings"]["polish_lr"] == 1e-3
    assert {"generated", "generated one-step"} <= set(r["seen"]) and "x0" in samplers
    assert r["latency_ms_per_sample_one_step"] > 0
    assert r["runs_in_zoo"] == len({row["run_id"] for row in rows}) == 2
    assert r["basins_covered"] == 2  # samples are copies of entries of both runs
    assert r["within_run_spacing"] > 0
    assert "generated one-step" in (tmp_path / "bench" / "results.md").read_text()
    # the run-average baseline: one network per run, the mean of that run's checkpoints
    from weightdiff.tasks import get_task
    by_run: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_run.setdefault(row["run_id"], []).append(i)
    assert all(len(ix) > 1 for ix in by_run.values())
    means = [{k: torch.stack([sds[i][k].float() for i in ix]).mean(0) for k in sds[0]} for ix in by_run.values()]
    x_te, y_te = get_task(task).data().split("test")
    expected = zoo.target().accuracy({k: torch.stack([m[k] for m in means]) for k in means[0]}, x_te, y_te)
    got = r["per_task"]["seen"][task]["run average"]
    assert got["num"] == len(by_run) == 2
    half_example = 0.5 / len(y_te)  # accuracies are counts over the test set: equal predictions agree to rounding
    assert abs(got["mean"] - float(expected.mean())) < half_example
    assert abs(got["best"] - float(expected.max())) < half_example


def test_a_one_condition_hypernetwork_with_a_huge_head_is_trained_as_its_one_output(digits, monkeypatch):
    """One distinct training condition: an MLP's output is one vector; above MAX_HEAD_WEIGHTS it is that vector."""
    import weightdiff.evaluate.hypernet as hypernet

    target = Target.full(digits.build_network())
    params = _random_nets(digits, 6)
    codec = ParamCodec.fit(params)
    conds = torch.ones(6, 3)
    data = [(digits.data().x_train, digits.data().y_train)]
    cfg = HypernetTrainConfig(steps=40, lr=3e-2, batch_size=6, functional_batch=32, hidden=64)
    big = 64 * codec.num_params
    monkeypatch.setattr(hypernet, "MAX_HEAD_WEIGHTS", big)  # not above: the MLP itself
    model, _ = train_mlp_hypernet(target, codec, conds, codec.flatten(params), torch.zeros(6, dtype=torch.long),
                                  data, cfg)
    assert not model.constant
    monkeypatch.setattr(hypernet, "MAX_HEAD_WEIGHTS", big - 1)
    model, history = train_mlp_hypernet(target, codec, conds, codec.flatten(params),
                                        torch.zeros(6, dtype=torch.long), data, cfg)
    assert model.constant and sum(p.numel() for p in model.parameters()) == codec.num_params
    flat = codec.flatten(params)
    x, y = data[0]

    def task_loss(vector: torch.Tensor) -> float:
        logits = target.forward_each(codec.unflatten(vector.detach()[None]), x[None])[0]
        return float(torch.nn.functional.cross_entropy(logits, y))

    # it starts at the zoo's mean (the weight loss's optimum) and the task loss moves it from there
    assert task_loss(model.value) < task_loss(flat.mean(0)) - 1e-3
    start, _ = train_mlp_hypernet(target, codec, conds, flat, torch.zeros(6, dtype=torch.long), data,
                                  HypernetTrainConfig(steps=1, lr=1e-12, hidden=64))
    torch.testing.assert_close(start.value.detach(), flat.mean(0), rtol=0, atol=1e-6)
    assert torch.equal(model(conds[:2])[0], model.value.detach()) and model(conds).shape == (6, codec.num_params)
    varied = torch.randn(6, 3)  # distinct conditions: never collapsed, whatever the head's size
    model, _ = train_mlp_hypernet(target, codec, varied, codec.flatten(params), torch.zeros(6, dtype=torch.long),
                                  data, HypernetTrainConfig(steps=2, hidden=64))
    assert not model.constant


def test_comparison_space_without_alignment_measures_networks_as_they_are(digits):
    """One-parent zoos: distances are plain z-scored RMS distances over the tensors as they are."""
    target = Target.full(digits.build_network())
    zoo = _random_nets(digits, 4)
    plain = ComparisonSpace(target, zoo, align=False)
    assert plain.spec is None and plain.refine == 0
    one = {k: v[:1] for k, v in zoo.items()}
    scale = {k: v.float().std() for k, v in zoo.items()}
    pts = torch.cat([(v / scale[k]).flatten(1) for k, v in zoo.items()], 1).double()
    want = (pts[1:] - pts[:1]).norm(dim=1).min() / pts.shape[1] ** 0.5
    assert float(plain.nearest_distance(one, exclude=[0])[0]) == pytest.approx(float(want), rel=1e-5)
    assert float(plain.nearest_distance(one)[0]) == 0.0
    # aligned, random networks come closer than as they are (their units are matched first)
    assert float(ComparisonSpace(target, zoo).nearest_distance(one, exclude=[0])[0]) < float(want)


def test_align_runs_gives_a_runs_checkpoints_one_permutation(tiny_zoos):
    """align_runs: each run's checkpoints are permuted alike, as its last aligns to the reference."""
    from weightdiff.errors import CanonicalizationError
    from weightdiff.training.datamodule import ZooDataModule
    from weightdiff.weights.canonical import RunAlignment, align_to_reference, sequential_permutation_spec
    from weightdiff.zoo import Zoo

    zoo = Zoo.open(tiny_zoos[1])
    dm = ZooDataModule(zoo=str(tiny_zoos[1]), token_size=64, condition="none", align_runs=True)
    rows = dm.train_rows
    by_run: dict[str, list[dict]] = {}
    for r in rows:
        by_run.setdefault(r["run_id"], []).append(r)
    reference = zoo.load(rows[0]["id"])
    spec = sequential_permutation_spec(reference)
    for members in by_run.values():
        assert len(members) == 2
        first, last = (zoo.load(r["id"]) for r in members)
        a, b = (dm.prepared(r) for r in members)
        want = align_to_reference(last, reference, spec)
        assert all(torch.equal(b[k], want[k]) for k in want)  # the last: aligned on its own
        # one permutation for both: their difference is the raw difference, permuted (equal norms)
        for k in first:
            assert float((a[k] - b[k]).norm()) == pytest.approx(float((first[k] - last[k]).norm()), rel=1e-6)
            assert sorted((a[k] - b[k]).flatten().tolist()) == sorted((first[k] - last[k]).flatten().tolist())
    with pytest.raises(CanonicalizationError, match="run 'nope'"):
        RunAlignment(rows, zoo.load, reference)(reference, "nope")


def test_whole_network_zoo_state_names_a_lora_zoo_and_groups_runs(tiny_zoos):
    """The probe scripts' entry: a LoRA zoo is refused by name; a full zoo gives its runs and spacing."""
    from weightdiff.evaluate.rows import ZooState, run_groups

    with pytest.raises(BenchmarkError, match=re.escape(f"zoo {tiny_zoos[0]}: a whole-network zoo is needed")):
        ZooState.whole_network(str(tiny_zoos[0]))
    z = ZooState.whole_network(str(tiny_zoos[1]))
    assert z.run_ids == [r["run_id"] for r in z.rows] and len(set(z.run_ids)) == 2
    groups = run_groups(z, range(len(z.rows)))
    assert sorted(len(ix) for ix in groups.values()) == [2, 2]  # 2 runs x 2 checkpoints
    assert all(len({z.run_ids[i] for i in ix}) == 1 for ix in groups.values())
    assert z.within_run_spacing() == z.space.within_group_spacing(z.run_ids) > 0
    x, y = z.test_split()
    assert x.shape[0] == y.shape[0] > 0
