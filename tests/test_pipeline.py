"""The trained generator as an artefact: the tokenizer is fitted once, at training time, and the
exported folder follows the diffusers conventions.

A tiny generator is trained on a copy of the tiny zoo named by a path relative to the working
directory, and exported at once. The zoo then changes (an entry altered, one added) so that
re-fitting the tokenizer would give other statistics; exports made afterwards, and from another
working directory, must still be the same artefact: bit-identical tokenizer files and samples.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from safetensors import safe_open

from tests._tolerance import network_tol
from tests.conftest import fit_args
from weightdiff.errors import ModelDirError, WeightFileError
from weightdiff.io import load_weights, read_json, save_weights, sha256_file, write_json
from weightdiff.models.generator import FORMAT_VERSION, WeightGenerator, load_generator, sample_tokens
from weightdiff.models.schedule import DEFAULT_SAMPLER, ScheduleConfig
from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition
from weightdiff.training.datamodule import ZooDataModule
from weightdiff.training.export import export_checkpoint, read_lightning_checkpoint
from weightdiff.training.module import WeightDiffusion

TASK = "rotdigits:angle=-15"
ENTRY = "rotdigits_angle-15_flip0-s000-c0030"
TOKENIZER_FILES = ("layout.json", "layout_stats.safetensors")


@pytest.fixture(scope="module")
def run(tiny_lora_zoo, tmp_path_factory):
    """(root, checkpoint, export made right after training) of a fit on ``./zoo`` (a relative path)."""
    from weightdiff.training.lightning_cli import run_lightning_cli

    root = tmp_path_factory.mktemp("artefact")
    shutil.copytree(tiny_lora_zoo, root / "zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        run_lightning_cli(fit_args(Path("zoo"), root / "fit", "--trainer.max_steps", "10"))
        ckpt = next((root / "fit").glob("**/checkpoints/last.ckpt"))
        first = export_checkpoint(ckpt, root / "first")
    return root, ckpt, first


def _data_module(ckpt: Path, zoo: Path) -> ZooDataModule:
    hp = {k: v for k, v in read_lightning_checkpoint(ckpt)["datamodule_hyper_parameters"].items()
          if not k.startswith("_")}
    return ZooDataModule(**{**hp, "zoo": str(zoo)})


def _rewrite_entry(entry: Path, scale: float, new_id: str | None = None) -> None:
    weights = entry / "adapter_model.safetensors"
    save_weights(weights, {k: v * scale for k, v in load_weights(weights).items()})
    row = read_json(entry / "entry.json")
    write_json(entry / "entry.json", {**row, "id": new_id or row["id"], "sha256": sha256_file(weights)})


@pytest.fixture(scope="module")
def grown(run):
    """The zoo after training: one training entry altered, one added. Returns the saved tokenizer state."""
    root, ckpt, _ = run
    zoo = root / "zoo"
    saved = read_lightning_checkpoint(ckpt)[ZooDataModule.__qualname__]["tokenizer"]
    _rewrite_entry(zoo / "entries" / ENTRY, 5.0)
    added = zoo / "entries" / "zz-added"
    shutil.copytree(zoo / "entries" / "rotdigits_angle-30_flip0-s000-c0030", added)
    _rewrite_entry(added, -3.0, new_id="zz-added")
    refit = _data_module(ckpt, zoo).tokenizer.layout
    # Otherwise the test below could not tell an export that re-fits from one that does not.
    assert not torch.equal(refit.mean, saved["mean"]) and not torch.equal(refit.std, saved["std"])
    return saved


def _samples(gen_dir: Path) -> torch.Tensor:
    gen = load_generator(gen_dir)
    tokens, _ = generate_tokens(gen, make_condition(gen, task=TASK), 3, SamplerSettings(steps=3, seed=4),
                                use_cache=False, progress=False)
    return tokens


def test_export_after_the_zoo_changed_and_from_another_directory_is_the_same_artefact(run, grown, tmp_path,
                                                                                       monkeypatch):
    root, ckpt, first = run
    later = export_checkpoint(ckpt, tmp_path / "later")
    monkeypatch.chdir(tmp_path)  # `zoo` (the relative path the fit was given) names nothing here
    elsewhere = export_checkpoint(ckpt, tmp_path / "elsewhere")
    run_folder = ckpt.parents[1]  # the logger's version folder, beside checkpoints/
    for name in TOKENIZER_FILES:
        reference = (first / "tokenizer" / name).read_bytes()
        assert (run_folder / "tokenizer" / name).read_bytes() == reference, name
        for other in (later, elsewhere):
            assert (other / "tokenizer" / name).read_bytes() == reference, (other, name)
    assert torch.equal(load_generator(first).tokenizer.layout.mean, grown["mean"])
    weights = "generator/diffusion_pytorch_model.safetensors"
    assert (later / weights).read_bytes() == (elsewhere / weights).read_bytes() == (first / weights).read_bytes()
    reference = _samples(first)
    assert torch.equal(_samples(later), reference) and torch.equal(_samples(elsewhere), reference)


def test_resume_trains_on_with_the_checkpoint_tokenizer_not_a_refit(run, grown):
    root, ckpt, _ = run
    dm = _data_module(ckpt, root / "zoo")
    dm.setup("fit")
    refitted = dm._train.tokens.clone()
    dm.load_state_dict(read_lightning_checkpoint(ckpt)[ZooDataModule.__qualname__])
    assert torch.equal(dm.tokenizer.layout.mean, grown["mean"]) and torch.equal(dm.tokenizer.layout.std, grown["std"])
    assert not torch.equal(dm._train.tokens, refitted)  # the datasets were encoded again
    row = dm.train_rows[0]
    assert torch.equal(dm._train.tokens[0], dm.tokenizer.encode(dm.prepared(row))[0])


def test_changed_or_missing_base_network_is_a_named_error(run, tmp_path):
    root, ckpt, _ = run
    base = (root / "zoo" / "base" / "model.safetensors").resolve()
    original = base.read_bytes()
    try:
        tensors = load_weights(base)
        key = next(iter(tensors))
        save_weights(base, {**tensors, key: tensors[key] + 1.0})
        with pytest.raises(WeightFileError) as err:
            export_checkpoint(ckpt, tmp_path / "out")
        assert str(base) in str(err.value) and "sha256" in str(err.value)
        base.unlink()
        with pytest.raises(WeightFileError) as err:
            export_checkpoint(ckpt, tmp_path / "out")
        assert str(base) in str(err.value) and "not found" in str(err.value)
    finally:
        base.write_bytes(original)
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_a_saved_tokenizer_is_refused(run, tmp_path):
    _, ckpt, _ = run
    state = read_lightning_checkpoint(ckpt)
    del state[ZooDataModule.__qualname__]
    old = tmp_path / "old.ckpt"
    torch.save(state, old)
    with pytest.raises(WeightFileError) as err:
        export_checkpoint(old, tmp_path / "out")
    assert str(old) in str(err.value) and f"'{ZooDataModule.__qualname__}'" in str(err.value)


def test_format_version_1_folder_asks_for_a_re_export(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 1}))
    save_weights(tmp_path / "generator.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(ModelDirError) as err:
        load_generator(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "format_version 1" in msg and "re-export" in msg and "Lightning checkpoint" in msg


def test_the_folder_follows_the_diffusers_conventions(run):
    _, ckpt, first = run
    index = read_json(first / "model_index.json")
    assert index["format_version"] == FORMAT_VERSION and index["_class_name"] == "WeightDiffusionPipeline"
    assert index["generator"] == ["weightdiff.models.generator", "WeightGenerator"]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert index["tokenizer"] == ["weightdiff.weights.tokenizer", "WeightTokenizer"]
    assert index["sampling"] == {"sampler": DEFAULT_SAMPLER, "steps": 5, "latent_noise": 0.0}  # configs/tiny.yaml: 5 steps
    assert index["global_step"] == 10 and index["zoo"]["num_train_checkpoints"] == 16
    assert index["model_id"] == sha256_file(first / "generator" / "diffusion_pytorch_model.safetensors")[:16]
    gen = load_generator(first)

    # generator/: loads with diffusers' own loader, to the same weights; its config holds sizes only
    config = read_json(first / "generator" / "config.json")
    assert config["_class_name"] == "WeightGenerator" and config["num_tokens"] == gen.tokenizer.layout.num_tokens
    assert not any(isinstance(v, list) for v in config.values())
    ours, theirs = gen.generator.state_dict(), WeightGenerator.from_pretrained(first / "generator").state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(first / "generator" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}

    # scheduler/: the training DDPMScheduler (no clamping); samplers are built from its config
    scheduler = DDPMScheduler.from_pretrained(first / "scheduler")
    assert scheduler.config.clip_sample is False
    assert ScheduleConfig.from_scheduler_config(scheduler.config) == gen.schedule
    ddim = DDIMScheduler.from_config(scheduler.config)
    assert torch.equal(ddim.alphas_cumprod, gen.schedule.sampling_scheduler("ddim").alphas_cumprod)

    # base/: the zoo's base network byte for byte, and a PEFT adapter config that points at it
    hp = read_lightning_checkpoint(ckpt)[ZooDataModule.__qualname__]["zoo"]
    assert sha256_file(first / "base" / "model.safetensors") == hp["base"]["sha256"] == index["base"]["sha256"]
    adapter = read_json(first / "base" / "adapter_config.json")
    assert adapter["base_model_name_or_path"] == "."  # its own folder: still right when the export moves

    card = (first / "README.md").read_text()
    for needle in ("tiny-rotdigits-lora", "| training steps | 10 |", "16 / 16", "`text`", "from_pretrained",
                   "weightdiff sample --model"):
        assert needle in card, needle


def test_model_card_reports_the_benchmark_it_is_given(run, tmp_path):
    results = {"seen": {"generated": {"mean": 0.8}, "floor": {"mean": 0.1}}, "unseen": {"generated": {"mean": 0.5}}}
    write_json(tmp_path / "results.json", results)
    out = export_checkpoint(run[1], tmp_path / "gen", results=tmp_path / "results.json")
    card = (out / "README.md").read_text()
    assert "| generated | 80.0 % | 50.0 % |" in card and "| floor | 10.0 % | – |" in card


def test_a_scheduler_that_clamps_samples_is_refused(run, tmp_path):
    g = Path(shutil.copytree(run[2], tmp_path / "gen"))
    file = g / "scheduler" / "scheduler_config.json"
    write_json(file, {**read_json(file), "clip_sample": True})
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    assert str(file) in str(err.value) and "'clip_sample' is True, expected False" in str(err.value)


# --------------------------------------------------------------------------------- cross-attention
def _examples_generator(cross_attention: bool) -> WeightGenerator:
    torch.manual_seed(0)
    layout = {"tensor_index": [0, 0, 1], "chunk_index": [0, 1, 0], "depth": [0, 0, 1], "kind": [0, 0, 1],
              "length": [4, 2, 3]}
    net = WeightGenerator(token_size=4, num_tokens=3, num_tensors=2, max_chunks=2, max_depth=2, num_kinds=8,
                          condition="examples", condition_dims={"x_dim": 6, "num_classes": 3}, hidden=16, depth=2,
                          heads=2, cross_attention=cross_attention, token_layout=layout)
    for p in net.parameters():  # zero-initialised gates and read-outs would hide the dependence
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_cross_attention_feeds_the_per_example_features_to_the_denoiser():
    net = _examples_generator(cross_attention=True)
    g = torch.Generator().manual_seed(1)
    raw = (torch.randn(2, 5, 6, generator=g), torch.randint(0, 3, (2, 5), generator=g))
    other = (torch.randn(2, 5, 6, generator=g), raw[1])
    cond = net.encode_condition(raw)
    assert cond.vector.shape == (2, 16) and cond.context.shape == (2, 5, 16) and cond.context_mask.all()
    x, t = torch.randn(2, 3, 4, generator=g), torch.tensor([10, 500])
    out = net(x, t, cond.vector, cond.context, cond.context_mask)
    # the same adaLN vector with another example set's sequence: the output follows the context
    assert not torch.allclose(out, net(x, t, cond.vector, net.encode_condition(other).context, cond.context_mask))
    # the examples' order does not matter (no positions in the set encoder nor in cross-attention);
    # it only changes the order of the pooling's and the attention's sums
    perm = torch.randperm(5, generator=g)
    shuffled = net.encode_condition((raw[0][:, perm], raw[1][:, perm]))
    atol = network_tol(net, out)
    torch.testing.assert_close(net(x, t, shuffled.vector, shuffled.context, shuffled.context_mask), out,
                               rtol=0, atol=atol)
    # while a context that lost one example (an off-by-one in its mask) lands outside that bound
    short_mask = cond.context_mask.clone()
    short_mask[:, -1] = False
    assert float((net(x, t, cond.vector, cond.context, short_mask) - out).abs().max()) > 4 * atol
    # dropped rows get the null embedding in the vector and along the whole sequence
    dropped = net.encode_condition(raw, torch.tensor([True, False]))
    assert torch.equal(dropped.context[0], net.cond.null_embedding.expand(5, -1))
    # classifier-free guidance runs through the same path
    tokens = sample_tokens(net, raw, 2, ScheduleConfig(), steps=3, sampler="ddim", guidance=2.0)
    assert tokens.shape == (4, 3, 4) and torch.isfinite(tokens).all()
    assert _examples_generator(cross_attention=False).encode_condition(raw).context is None


def test_training_step_with_cross_attention_reaches_the_set_encoder_through_the_context():
    spec = {"token_size": 4, "num_tensors": 2, "max_chunks": 2, "max_depth": 2, "num_kinds": 8,
            "token_ids": {"tensor_index": [0, 0, 1], "chunk_index": [0, 1, 0], "depth": [0, 0, 1], "kind": [0, 0, 1]},
            "token_length": [4, 2, 3], "condition_dims": {"x_dim": 6, "num_classes": 3}}
    model = WeightDiffusion(spec=spec, hidden=16, depth=1, heads=2, condition="examples", cross_attention=True,
                            functional_loss_weight=0.0)
    for p in model.generator.parameters():  # past the zero-initialised read-out and gates
        torch.nn.init.normal_(p, std=0.2)
    g = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.randn(4, 3, 4, generator=g),
             "cond": (torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4, 5), generator=g))}
    model._losses(batch, cond_dropout=0.0)["weight"].backward()
    assert model.generator.denoiser.blocks[0].cross_attn.kv.weight.grad.abs().sum() > 0
