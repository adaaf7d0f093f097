"""The conditional mean: a hypernetwork μ(c) inside the generator, with the DiT diffusing x0 - μ(c)."""

from __future__ import annotations

import pytest
import torch

from weightdiff.errors import WeightDiffError
from weightdiff.models.generator import WeightGenerator, sample_tokens, seeded_noise
from weightdiff.models.schedule import ScheduleConfig
from weightdiff.weights.tokenizer import WeightTokenizer


def _tokenizer() -> WeightTokenizer:
    """Tensors that end mid-token, so the last token of each has padding."""
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(5, 3, generator=g), "a.bias": torch.randn(5, generator=g)}
    return WeightTokenizer.from_state_dict(state, token_size=4)


def _generator(mean_head: int = 8, condition: str = "code", condition_dims: dict | None = None,
               **kwargs) -> WeightGenerator:
    lay = _tokenizer().layout
    torch.manual_seed(0)
    return WeightGenerator(token_size=lay.token_size, num_tokens=lay.num_tokens, num_tensors=lay.num_tensors,
                           max_chunks=lay.max_chunks, max_depth=lay.max_depth, num_kinds=lay.num_kinds,
                           condition=condition, condition_dims=condition_dims or {"raw_dim": 3}, hidden=16,
                           depth=1, heads=2, mean_head=mean_head,
                           token_layout={"tensor_index": lay.token_tensor_index,
                                         "chunk_index": lay.token_chunk_index, "depth": lay.token_depth,
                                         "kind": lay.token_kind, "length": lay.token_length}, **kwargs).eval()


def test_the_mean_starts_at_zero_and_is_zero_on_padding():
    net = _generator()
    c = torch.randn(3, 16)
    assert torch.equal(net.conditional_mean(c), torch.zeros(3, *net.valid.shape))  # zero output layer
    torch.nn.init.normal_(net.mean_net.out.weight)
    torch.nn.init.normal_(net.mean_net.out.bias)
    mean = net.conditional_mean(c)
    assert not net.valid.all()  # the layout has padding to check
    assert (mean[:, ~net.valid] == 0).all() and (mean[:, net.valid] != 0).all()
    assert not torch.equal(mean[0], mean[1])  # it depends on the condition


def test_residual_and_to_tokens_invert_and_need_the_mean():
    net = _generator()
    x0, mean = torch.randn(2, *net.valid.shape), torch.randn(2, *net.valid.shape)
    back = net.to_tokens(net.residual(x0, mean=mean), mean=mean)
    # (x0 - m) + m rounds once in each operation: within 2 ulp of the larger magnitude.
    tol = 2 * torch.finfo(torch.float32).eps * float(torch.maximum(x0.abs(), mean.abs()).max())
    torch.testing.assert_close(back, x0, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="needs `mean`"):
        net.to_tokens(x0)
    with pytest.raises(ValueError, match="needs `mean`"):
        net.residual(x0)
    with pytest.raises(ValueError, match="no mean head"):
        _generator(mean_head=0).conditional_mean(torch.randn(1, 16))


@pytest.mark.parametrize("kwargs", [{"center": True}, {"window": 2}, {"mean_head": -1}, {"mean_input": "codes"},
                                    {"mean_input": "raw", "condition": "none"},
                                    {"mean_input": "numeric", "condition": "code"}])
def test_the_mean_head_refuses_what_it_does_not_combine_with(kwargs):
    with pytest.raises(ValueError, match="mean_head|mean_input"):
        _generator(**{"mean_head": 8, **kwargs})


def test_a_sample_is_the_mean_plus_a_residual_sampled_without_it():
    """The DiT samples the residual; the mean only enters at the end. Moving the mean by b moves
    every sample by b on valid entries (and not on padding), from the same noise."""
    net = _generator()
    for p in net.denoiser.parameters():  # zero-initialised gates would make the DiT's output constant
        torch.nn.init.normal_(p, std=0.2)
    code = torch.randn(2, 3)
    noise = seeded_noise([1, 2, 3, 4], net.sample_shape)
    kw = dict(steps=3, sampler="ddim", guidance=1.0, noise=noise)
    before = sample_tokens(net, code, 2, ScheduleConfig(), **kw)
    bias = torch.randn(net.valid.numel())
    with torch.no_grad():
        net.mean_net.out.bias.copy_(bias)
    after = sample_tokens(net, code, 2, ScheduleConfig(), **kw)
    shift = bias.view(net.valid.shape).masked_fill(~net.valid, 0.0)
    tol = 2 * torch.finfo(torch.float32).eps * float(after.abs().max() + before.abs().max())
    torch.testing.assert_close(after - before, shift.expand_as(after), rtol=0, atol=tol)


def test_a_raw_input_mean_reads_the_standardised_condition_of_each_sample():
    net = _generator(mean_input="raw")
    torch.nn.init.normal_(net.mean_net.out.weight)
    train = torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 0.0]])
    net.fit_mean_input(train)
    torch.testing.assert_close(net.mean_net.input_mean, train.mean(0))
    # population std per column; the constant column keeps std 1 instead of dividing by 0
    torch.testing.assert_close(net.mean_net.input_std, torch.tensor([(8 / 3) ** 0.5, 1.0, (8 / 3) ** 0.5]))
    c = torch.randn(2, 16)
    raw = torch.tensor([[1.0, 5.0, 2.0], [9.0, 0.0, -3.0]])
    mean = net.conditional_mean(c, raw)
    assert torch.equal(mean, net.conditional_mean(torch.randn(2, 16), raw))  # the embedding plays no part
    assert not torch.equal(mean[0], mean[1])
    with pytest.raises(ValueError, match="needs `raw`"):
        net.conditional_mean(c)
    for p in net.denoiser.parameters():
        torch.nn.init.normal_(p, std=0.2)
    # sample_tokens: each of a row's samples gets that row's mean (condition-major order)
    kw = dict(steps=2, sampler="ddim", guidance=1.0, noise=seeded_noise([1, 2, 3, 4], net.sample_shape))
    got = sample_tokens(net, raw, 2, ScheduleConfig(), **kw)
    with torch.no_grad():
        net.mean_net.out.weight.zero_()
    residual = sample_tokens(net, raw, 2, ScheduleConfig(), **kw)
    tol = 2 * torch.finfo(torch.float32).eps * float(got.abs().max() + residual.abs().max())
    torch.testing.assert_close(got - residual, mean.repeat_interleave(2, 0), rtol=0, atol=tol)


def test_a_numeric_mean_reads_only_the_numbers_parsed_from_the_text():
    from weightdiff.models.conditioning import TEXT_DIM
    from weightdiff.tasks.numeric import NUMERIC_DIM

    net = _generator(mean_input="numeric", condition="text", condition_dims={"raw_dim": TEXT_DIM + NUMERIC_DIM})
    assert net.mean_net.input_mean.shape == (NUMERIC_DIM,)
    torch.nn.init.normal_(net.mean_net.out.weight)
    train = torch.randn(6, TEXT_DIM + NUMERIC_DIM)
    net.fit_mean_input(train)
    torch.testing.assert_close(net.mean_net.input_mean, train[:, TEXT_DIM:].mean(0))
    raw = torch.randn(2, TEXT_DIM + NUMERIC_DIM)
    other_text = torch.cat([torch.randn(2, TEXT_DIM), raw[:, TEXT_DIM:]], 1)
    c = torch.randn(2, 16)
    assert torch.equal(net.conditional_mean(c, raw), net.conditional_mean(c, other_text))
    moved = raw.clone()
    moved[:, TEXT_DIM] += 1.0
    assert not torch.equal(net.conditional_mean(c, raw), net.conditional_mean(c, moved))


@pytest.mark.parametrize("mean_input", ["embedding", "raw", "numeric"])
def test_a_fit_trains_the_mean_as_a_hypernetwork_and_exports_it(tiny_lora_zoo, tmp_path, mean_input):
    """The fit logs the mean's weight and task losses, its output layer moves off zero, and the
    exported generator samples finite tokens, 0 on padding. A raw-input mean is standardised by
    the training conditions: the text features of every phrasing of every training task."""
    import csv

    from conftest import export_last, fit_tiny
    from weightdiff.models.generator import load_generator
    from weightdiff.sampling import make_condition

    run = fit_tiny(tiny_lora_zoo, tmp_path / "fit", "--model.mean_head", "32", "--model.mean_input", mean_input,
                   "--trainer.max_steps", "12")
    rows = list(csv.DictReader(next(run.glob("**/metrics.csv")).open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/mean_loss", "train/mean_functional_loss", "train/weight_loss"} <= logged
    gen = load_generator(export_last(run, tmp_path / "generator"))
    net = gen.generator
    assert net.config.mean_head == 32 and net.mean_net.out.weight.abs().sum() > 0
    if mean_input != "embedding":
        from weightdiff.models.conditioning import TEXT_DIM
        from weightdiff.training.datamodule import TaskConditions
        from weightdiff.zoo import Zoo

        zoo = Zoo.open(tiny_lora_zoo)
        names = sorted({r["task"] for r in zoo.rows("train")})
        conds = TaskConditions(names, "text")
        feats = torch.cat([conds.text[n] for n in names]).float()
        feats = feats[:, TEXT_DIM:] if mean_input == "numeric" else feats
        torch.testing.assert_close(net.mean_net.input_mean, feats.mean(0))
        assert net.mean_net.input_std.shape == (feats.shape[1],) and (net.mean_net.input_std > 0).all()
    else:
        assert not hasattr(net.mean_net, "input_mean")  # reads the provider's vector as it is
    cond = make_condition(gen, task="rotdigits:angle=10,flip=0")
    tokens = sample_tokens(net, cond.raw, 2, ScheduleConfig(), steps=2, sampler="ddim", guidance=1.0,
                           noise=seeded_noise([0, 1], net.sample_shape))
    assert tokens.shape == (2, *net.valid.shape) and torch.isfinite(tokens).all()
    assert (tokens[:, ~net.valid] == 0).all()


@pytest.mark.parametrize("extra", [("--model.center_tokens", "true"), ("--model.path_functional_weight", "1.0"),
                                   ("--model.latent_tokens", "1")])
def test_fit_refuses_a_mean_head_with_another_residual(tiny_lora_zoo, tmp_path, extra):
    from conftest import fit_tiny

    with pytest.raises(WeightDiffError, match="mean_head"):
        fit_tiny(tiny_lora_zoo, tmp_path / "fit", "--model.mean_head", "32", *extra)


def test_diagnose_measures_a_mean_head_generator_in_its_residual_space(tiny_lora_zoo, tmp_path):
    """Entries are diffused as residuals from μ of their task: the maps invert, need the tasks,
    and at low noise the posterior-mean oracle (over the task's residuals) returns the entries, so
    its accuracy is the zoo's; paths measure distances between weight tokens."""
    from conftest import export_last, fit_tiny
    from weightdiff.evaluate.diagnose import diagnose_generator, diffusion_space
    from weightdiff.models.generator import load_generator, mean_tokens
    from weightdiff.sampling import make_condition
    from weightdiff.tasks import get_task
    from weightdiff.weights.canonical import canonicalize
    from weightdiff.zoo import Zoo

    run = fit_tiny(tiny_lora_zoo, tmp_path / "fit", "--model.mean_head", "32", "--model.mean_input", "numeric",
                   "--trainer.max_steps", "12")
    gen, zoo = load_generator(export_last(run, tmp_path / "generator")), Zoo.open(tiny_lora_zoo)
    with pytest.raises(WeightDiffError, match="conditional mean"):
        diffusion_space(gen)

    def condition(name: str):
        return make_condition(gen, task=name).raw

    into, back = diffusion_space(gen, condition)
    rows = zoo.rows("train")[:3]
    tasks = [r["task"] for r in rows]
    canonical = gen.config.get("data", {}).get("canonicalize", True)
    tokens = gen.tokenizer.encode_batch([canonicalize(zoo.load(r["id"]), "lora") if canonical else zoo.load(r["id"])
                                         for r in rows])
    mean = torch.cat([mean_tokens(gen.generator, condition(t)) for t in tasks])
    assert mean.abs().sum() > 0  # μ has moved off zero: the residual is not the token itself
    torch.testing.assert_close(into(tokens, tasks), tokens - mean)
    torch.testing.assert_close(back(into(tokens, tasks), tasks), tokens)
    with pytest.raises(WeightDiffError, match="task"):
        into(tokens, None)

    report = diagnose_generator(gen, zoo, paths=[("ddim", 2)], max_entries=None, num=2, timesteps=(0, 5, 999))
    train = report["noise_levels"]["train"]
    assert train["oracle_mse"][1] < 1e-3  # t = 5: the oracle is the entry's own residual
    all_rows = zoo.rows("train")
    n_val = get_task(all_rows[0]["task"]).data().split("val")[1].numel()
    zoo_acc = sum(r["metrics"]["val_acc"] for r in all_rows) / len(all_rows)
    assert abs(train["oracle_acc"][1] - zoo_acc) <= 1 / n_val  # one near-tie may round the other way
    path = report["paths"]["ddim-2"]
    assert len(path["accuracy"]) == 2 and path["final_distance"] > 0 and path["zoo_spacing"] > 0


def test_the_benchmark_scores_the_conditional_mean_beside_the_samples(tiny_lora_zoo, tmp_path):
    """The row ``generated mean μ(c)`` is the one adapter μ(c) of each task, scored in the same run."""
    from conftest import export_last, fit_tiny
    from weightdiff.evaluate import benchmark
    from weightdiff.evaluate.rows import MEAN_ROW
    from weightdiff.evaluate.weights import evaluate_params
    from weightdiff.models.generator import load_generator, mean_tokens
    from weightdiff.sampling import make_condition
    from weightdiff.tasks import get_task

    run = fit_tiny(tiny_lora_zoo, tmp_path / "fit", "--model.mean_head", "32", "--model.mean_input", "numeric",
                   "--trainer.max_steps", "8")
    folder = export_last(run, tmp_path / "generator")
    r = benchmark.run_benchmark("adapt-lora", folder, tiny_lora_zoo, tmp_path / "bench", num=2, hypernet_steps=5,
                                max_seen_tasks=1, max_unseen_tasks=2, sgd_tasks=1, sgd_ks=(1,), select_per_class=0,
                                ensemble=False, adaptation=False, progress=False)
    names = list(r["unseen"])
    assert names.index(MEAN_ROW) == names.index("generated one-step") + 1
    gen = load_generator(folder)
    for name in r["settings"]["unseen_tasks"]:
        task = get_task(name)
        params = gen.tokenizer.decode_float(mean_tokens(gen.generator, make_condition(gen, task=name).raw))
        acc, _ = evaluate_params(gen.target(task), task, params)
        assert r["per_task"]["unseen"][name][MEAN_ROW]["mean"] == pytest.approx(float(acc[0]), abs=1e-6)
        assert r["per_task"]["unseen"][name][MEAN_ROW]["num"] == 1


#: A three-token layout small enough to build a WeightDiffusion module for the clipping tests.
CLIP_SPEC = {"token_size": 4, "num_tensors": 2, "max_chunks": 2, "max_depth": 2, "num_kinds": 8,
             "token_ids": {"tensor_index": [0, 0, 1], "chunk_index": [0, 1, 0], "depth": [0, 0, 1], "kind": [0, 0, 1]},
             "token_length": [4, 2, 3], "condition_dims": {"raw_dim": 3}}


def test_separate_clipping_leaves_the_means_step_apart_from_the_dits():
    """``mean_clip: separate``: a large DiT gradient is clipped to the limit on its own, and μ's
    small gradient (norm below the limit) is left as it is — a joint clip would scale it down too."""
    from weightdiff.training.module import WeightDiffusion

    model = WeightDiffusion(spec=CLIP_SPEC, hidden=16, depth=1, heads=2, condition="code", functional_loss_weight=0.0,
                            mean_head=8, mean_clip="separate")
    mean_ids = {id(p) for p in model.generator.mean_net.parameters()}
    rest = [p for p in model.generator.parameters() if id(p) not in mean_ids]
    for p in rest:
        p.grad = torch.ones_like(p)
    for p in model.generator.mean_net.parameters():
        p.grad = torch.full_like(p, 1e-4)
    mean_before = [p.grad.clone() for p in model.generator.mean_net.parameters()]
    model.configure_gradient_clipping(torch.optim.SGD(model.generator.parameters(), lr=0.1), 1.0, "norm")
    assert all(torch.equal(p.grad, g) for p, g in zip(model.generator.mean_net.parameters(), mean_before))
    rest_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in rest]))
    torch.testing.assert_close(rest_norm, torch.tensor(1.0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("trained", "expected"), [
    ({}, 1.0),
    ({"functional_loss_weight": 0.0}, 0.0),
    ({"functional_loss_weight": 1.0, "mean_head": 256, "mean_functional_weight": 10.0}, 10.0),
    ({"functional_loss_weight": 10.0, "mean_head": 256, "mean_functional_weight": None}, 10.0),
    ({"functional_loss_weight": 0.0, "mean_head": 0, "mean_functional_weight": 10.0}, 0.0),
    ({"functional_loss_weight": 1.0, "latent_tokens": 4, "autoencoder_functional_weight": 3.0}, 3.0)])
def test_the_hypernetwork_gets_the_largest_task_loss_weight_of_the_generators_parts(trained, expected):
    from weightdiff.evaluate.benchmark import hypernet_functional_weight

    assert hypernet_functional_weight(trained) == expected


def test_the_mean_can_carry_the_task_loss_alone(tiny_lora_zoo, tmp_path):
    """``mean_functional_weight`` with the DiT's task loss off: μ logs its task loss, the DiT none,
    and the export records both weights for the benchmark's hypernetwork."""
    import csv

    from conftest import export_last, fit_tiny
    from weightdiff.models.generator import load_generator

    run = fit_tiny(tiny_lora_zoo, tmp_path / "fit", "--model.mean_head", "32", "--model.functional_loss_weight", "0",
                   "--model.mean_functional_weight", "5", "--trainer.max_steps", "6")
    rows = list(csv.DictReader(next(run.glob("**/metrics.csv")).open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert "train/mean_functional_loss" in logged and "train/functional_loss" not in logged
    trained = load_generator(export_last(run, tmp_path / "generator")).config["training"]
    assert trained["functional_loss_weight"] == 0.0 and trained["mean_functional_weight"] == 5.0


@pytest.mark.parametrize(("mean_clip", "mean_grad_norm"), [("dit", 100.0), ("separate", 1.0)])
def test_dit_clipping_leaves_a_large_mean_gradient_as_it_is(mean_clip, mean_grad_norm):
    """``mean_clip: dit``: only the DiT's gradient is clipped; μ's, however large, is left as the
    benchmark's unclipped hypernetwork would step (``separate`` would clip it to the limit)."""
    from weightdiff.training.module import WeightDiffusion

    model = WeightDiffusion(spec=CLIP_SPEC, hidden=16, depth=1, heads=2, condition="code", functional_loss_weight=0.0,
                            mean_head=8, mean_clip=mean_clip)
    mean = list(model.generator.mean_net.parameters())
    mean_ids = {id(p) for p in mean}
    rest = [p for p in model.generator.parameters() if id(p) not in mean_ids]
    for p in rest:
        p.grad = torch.ones_like(p)

    def norm(params):
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    for p in mean:
        p.grad = torch.ones_like(p)
    scale = 100.0 / float(norm(mean))
    for p in mean:
        p.grad.mul_(scale)  # μ's gradient norm: 100
    model.configure_gradient_clipping(torch.optim.SGD(model.generator.parameters(), lr=0.1), 1.0, "norm")

    torch.testing.assert_close(norm(rest), torch.tensor(1.0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(norm(mean), torch.tensor(mean_grad_norm), atol=1e-4, rtol=1e-5)
