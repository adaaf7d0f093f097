"""Latent diffusion: the weight autoencoder, the two-phase fit, export, sampling and refusals."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests._tolerance import matmul_tol
from tests.conftest import export_last, fit_args, fit_tiny
from weightdiff.cli import main
from weightdiff.errors import WeightFileError
from weightdiff.models.autoencoder import WeightAutoencoder
from weightdiff.models.generator import load_generator
from weightdiff.sampling import WeightDiffusionPipeline
from weightdiff.training.export import export_checkpoint, read_lightning_checkpoint
from weightdiff.weights.canonical import canonicalize

AE_STEPS, MSE_STEPS, FIT_STEPS = 30, 15, 50
LATENT = ["--model.latent_tokens", "2", "--model.latent_dim", "8", "--model.autoencoder_steps", str(AE_STEPS),
          "--model.autoencoder_mse_steps", str(MSE_STEPS), "--model.autoencoder_basis", "64", "--model.noise_draws", "3"]
TASK = "rotdigits:angle=30,flip=0"


# ------------------------------------------------------------------------------- the autoencoder
def test_principal_coordinates_are_exact_on_the_zoo_and_latents_have_unit_rms():
    torch.manual_seed(0)
    n, p = 12, 40
    flat = torch.randn(n, p) * 3 + torch.linspace(-2, 2, p)
    ae = WeightAutoencoder(p, latent_tokens=3, latent_dim=4, width=16, basis=n)
    ae.fit_basis(flat)
    assert bool(ae.fitted) and ae.basis.shape == (p, n)
    basis = ae.basis
    assert torch.allclose(basis.T @ basis, torch.eye(n), atol=matmul_tol(reduction=p, scale=1.0))
    # n entries span n - 1 directions around their mean: projecting on the basis loses nothing.
    back = ae.mean + ((flat - ae.mean) @ basis) @ basis.T
    scale = float((flat - ae.mean).abs().max())
    assert torch.allclose(back, flat, atol=matmul_tol(reduction=p, scale=scale, depth=2) + matmul_tol(reduction=n, scale=scale))
    z = ae.encode(flat, scaled=False)
    assert z.shape == (n, 3, 4)
    rms = z.flatten(1).pow(2).mean(1).sqrt()
    assert torch.allclose(rms, torch.ones(n), atol=1e-3)  # layer-normalised (eps 1e-5 inside the root)
    ae.finish(flat)
    assert bool(ae.ready)
    expected = z.flatten(1).std(0).mean()
    assert torch.allclose(ae.latent_std, expected) and float(ae.latent_std) < 1.0
    assert torch.allclose(ae.encode(flat), z / expected)
    assert ae.decode(ae.encode(flat)).shape == (n, p)


def test_a_basis_wider_than_the_zoo_keeps_zero_columns():
    flat = torch.randn(5, 30)
    ae = WeightAutoencoder(30, basis=12)
    ae.fit_basis(flat)
    norms = ae.basis.norm(dim=0)
    # min(N, P) = 5 directions from the SVD, the other 7 columns zero
    assert torch.allclose(norms[:5], torch.ones(5), atol=matmul_tol(reduction=30, scale=1.0))
    assert torch.equal(norms[5:], torch.zeros(7))


def test_bad_autoencoder_sizes_are_refused():
    with pytest.raises(ValueError, match="latent_tokens"):
        WeightAutoencoder(10, latent_tokens=0)
    with pytest.raises(ValueError, match="latent_noise"):
        WeightAutoencoder(10, latent_noise=-1.0)


# ------------------------------------------------------------------------------------- fitting
def _metric(run: Path, key: str) -> list[tuple[int, float]]:
    rows = csv.DictReader(open(next(run.glob("**/metrics.csv"))))
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


@pytest.fixture(scope="module")
def latent_run(tiny_lora_zoo, tmp_path_factory) -> Path:
    return fit_tiny(tiny_lora_zoo, tmp_path_factory.mktemp("latent_fit"), *LATENT, "--trainer.max_steps",
                    str(FIT_STEPS), "--trainer.log_every_n_steps", "1")


@pytest.fixture(scope="module")
def latent_generator(latent_run, tmp_path_factory) -> Path:
    return export_last(latent_run, tmp_path_factory.mktemp("latent_gen") / "generator")


def test_the_fit_trains_the_autoencoder_first_then_diffuses_with_it_frozen(latent_run):
    ae_loss = _metric(latent_run, "train/autoencoder_loss")
    weight_loss = _metric(latent_run, "train/weight_loss")
    ae_functional = _metric(latent_run, "train/autoencoder_functional_loss")
    functional = _metric(latent_run, "train/functional_loss")
    assert [s for s, _ in ae_loss] == list(range(AE_STEPS))
    assert [s for s, _ in weight_loss] == list(range(AE_STEPS, FIT_STEPS))
    # The functional loss joins the autoencoder after its MSE-only steps; the diffusion has its own.
    assert [s for s, _ in ae_functional] == list(range(MSE_STEPS, AE_STEPS))
    assert [s for s, _ in functional] == list(range(AE_STEPS, FIT_STEPS))
    assert ae_loss[-1][1] < ae_loss[0][1]
    ckpt = read_lightning_checkpoint(next(latent_run.glob("**/checkpoints/last.ckpt")))
    state = ckpt["state_dict"]
    online = {k[len("generator.autoencoder."):]: v for k, v in state.items() if k.startswith("generator.autoencoder.")}
    ema = {k[len("ema.module.autoencoder."):]: v for k, v in state.items()
           if k.startswith("ema.module.autoencoder.")}
    assert online.keys() == ema.keys() and "basis" in online
    # Frozen at the switch and copied into the EMA model: the sampler decodes with what the DiT learnt on.
    assert all(torch.equal(online[k], ema[k]) for k in online)
    assert bool(online["ready"]) and bool(online["fitted"])


def test_the_autoencoder_does_not_change_after_its_phase(tiny_lora_zoo, tmp_path):
    from weightdiff.training.lightning_cli import run_lightning_cli

    pinned = ["--trainer.logger.init_args.version", "0"]
    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--trainer.max_steps", str(AE_STEPS + 5), *pinned))
    ckpt = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    first = read_lightning_checkpoint(ckpt)["state_dict"]
    # A resume past the switch keeps the autoencoder frozen (requires_grad is not saved in a checkpoint).
    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--trainer.max_steps", str(AE_STEPS + 10),
                               "--ckpt_path", "last", *pinned))
    second = read_lightning_checkpoint(ckpt)
    assert second["global_step"] == AE_STEPS + 10  # checkpoints every 5 steps (configs/tiny.yaml)
    keys = [k for k in first if k.startswith("generator.autoencoder.")]
    assert keys and all(torch.equal(first[k], second["state_dict"][k]) for k in keys)
    moved = [k for k in first if k.startswith("generator.denoiser.")
             and not torch.equal(first[k], second["state_dict"][k])]
    assert moved  # while the DiT trains on


def test_a_checkpoint_from_before_the_switch_is_refused_by_export(tiny_lora_zoo, tmp_path):
    from weightdiff.training.lightning_cli import run_lightning_cli

    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--trainer.max_steps", "10"))
    ckpt = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    with pytest.raises(WeightFileError, match="before its autoencoder finished"):
        export_checkpoint(ckpt, tmp_path / "gen")
    assert not (tmp_path / "gen").exists()


def test_latent_options_that_do_not_fit_are_refused(tiny_lora_zoo, tmp_path, capsys):
    bad = fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--model.autoencoder_mse_steps", str(AE_STEPS + 1))
    assert main(bad) == 2
    assert "autoencoder_mse_steps" in capsys.readouterr().err
    bad = fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--model.path_functional_weight", "1")
    assert main(bad) == 2
    assert "path_functional_weight" in capsys.readouterr().err
    assert main(fit_args(tiny_lora_zoo, tmp_path, *LATENT, "--model.noise_draws", "0")) == 2
    assert "noise_draws" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the exported model
def test_a_latent_generator_samples_decoded_weights_deterministically(latent_generator, tmp_path):
    gen = load_generator(latent_generator)
    net = gen.generator
    assert net.autoencoder is not None and net.sample_shape == (2, 8) and net.sample_valid is None
    pipe = WeightDiffusionPipeline.from_pretrained(latent_generator)
    first = pipe(task=TASK, num_samples=3, seed=5)
    again = pipe(task=TASK, num_samples=3, seed=5)
    assert all(torch.equal(first.params[k], again.params[k]) for k in first.params)
    tokens = net.to_tokens(torch.randn(4, 2, 8))
    assert tokens.shape == (4, net.config.num_tokens, net.config.token_size)
    assert torch.equal(tokens[:, ~net.valid], torch.zeros_like(tokens[:, ~net.valid]))  # padding stays 0
    out = tmp_path / "samples"
    assert main(["sample", "--model", str(latent_generator), "--task", TASK, "--num", "2", "--out", str(out)]) == 0
    assert main(["evaluate", "--task", TASK, "--weights", str(out)]) == 0


def test_diagnose_measures_a_latent_generator_in_its_latent(latent_generator, tiny_lora_zoo):
    """Noise levels and paths run on the entries' latents; at low noise the posterior-mean oracle
    returns those latents, so its accuracy is that of their decodings, computed here directly."""
    from weightdiff.evaluate.diagnose import diagnose_generator, diffusion_space
    from weightdiff.tasks import get_task
    from weightdiff.zoo import Zoo

    gen, zoo = load_generator(latent_generator), Zoo.open(tiny_lora_zoo)
    report = diagnose_generator(gen, zoo, paths=[("ddim", 2)], max_entries=None, num=2, timesteps=(0, 5, 999))
    train = report["noise_levels"]["train"]
    assert train["oracle_mse"][1] < 1e-3
    into, back = diffusion_space(gen)
    rows = zoo.rows("train")
    canonical = gen.config.get("data", {}).get("canonicalize", True)  # as the datamodule prepared them
    tokens = gen.tokenizer.encode_batch([canonicalize(zoo.load(r["id"]), "lora") if canonical else zoo.load(r["id"])
                                         for r in rows])
    latents = into(tokens)
    assert latents.shape[1:] == gen.generator.sample_shape
    decoded = gen.tokenizer.decode_float(back(latents))
    accs = []
    for i, row in enumerate(rows):
        task = get_task(row["task"])
        x, y = task.data().split("val")
        accs.append(float(gen.target(task).accuracy({k: v[i:i + 1] for k, v in decoded.items()}, x, y)[0]))
    n_val = get_task(rows[0]["task"]).data().split("val")[1].numel()
    assert abs(train["oracle_acc"][1] - sum(accs) / len(accs)) <= 1 / n_val
    assert len(report["paths"]["ddim-2"]["accuracy"]) == 2



def test_noise_draws_repeat_each_entry_with_its_own_condition_and_task_batch(tiny_lora_zoo):
    """With r draws the loss sees every entry r times, each beside its own condition and examples."""
    from weightdiff.training.datamodule import ZooDataModule
    from weightdiff.training.module import WeightDiffusion

    dm = ZooDataModule(str(tiny_lora_zoo), token_size=32, condition="code", functional_batch=4, batch_size=3)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    module = WeightDiffusion(spec=dm.spec, hidden=32, depth=1, heads=2, condition="code", noise_draws=3,
                             functional_loss_weight=0.0)
    seen = {}

    def spy(x_t, t, c, context=None, context_mask=None, tokens=None):
        seen["x_t"], seen["c"] = x_t, c
        return torch.zeros_like(x_t)

    module.generator.forward = spy
    torch.manual_seed(0)
    module._losses(batch, cond_dropout=0.0)
    b = batch["tokens"].shape[0]
    assert seen["x_t"].shape[0] == 3 * b
    cond = module.generator.encode_condition(batch["cond"], None).vector
    assert torch.equal(seen["c"], cond.repeat_interleave(3, 0))


# ------------------------------------------------------------------------- latent noise at sampling
def test_latent_noise_is_drawn_after_each_samples_start_noise_from_its_own_seed():
    from weightdiff.models.generator import seeded_latent_noise, seeded_noise

    shape = (2, 8)
    both = seeded_latent_noise([3, 4], shape, 0.5)
    assert torch.equal(both[1], seeded_latent_noise([4], shape, 0.5)[0])  # not a function of the batch
    g = torch.Generator().manual_seed(3)
    start = torch.randn(shape, generator=g)
    assert torch.equal(start, seeded_noise([3], shape)[0])                  # x_T is the first draw, unchanged
    assert torch.equal(both[0], torch.randn(shape, generator=g) * 0.5)      # the latent noise the next one
    assert torch.equal(seeded_latent_noise([3], shape, 0.0), torch.zeros(1, *shape))


def test_latent_noise_moves_the_decoded_sample_by_the_decoders_response(latent_generator):
    """The noise enters before the decoder: the sample is decode(latent + noise), x_T unchanged."""
    from weightdiff.models.generator import sample_tokens, seeded_latent_noise, seeded_noise
    from weightdiff.models.schedule import denoise
    from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition

    gen = load_generator(latent_generator)
    net = gen.generator
    cond = make_condition(gen, task=TASK)
    kw = dict(steps=3, sampler="ddim", guidance=1.0, noise=seeded_noise([7, 8], net.sample_shape))
    plain = sample_tokens(net, cond.raw, 2, gen.schedule, **kw)  # decoded, no latent noise
    noise = seeded_latent_noise([7, 8], net.sample_shape, 0.3)
    noisy = sample_tokens(net, cond.raw, 2, gen.schedule, latent_noise=noise, **kw)
    assert not torch.equal(noisy, plain)
    # the same latents, found by running the sampler alone, then decoded with the noise added
    c = net.encode_condition(cond.raw, None).repeat_interleave(2)
    null = net.encode_condition(cond.raw, torch.ones(1, dtype=torch.bool))
    with torch.no_grad():
        z = denoise(net.guided_fn(c, null.repeat_interleave(2), 1.0), (2, *net.sample_shape), gen.schedule,
                    steps=3, sampler="ddim", noise=kw["noise"])
        expected = net.to_tokens(z + noise)
    assert torch.equal(noisy, expected)  # the same computation on the same inputs
    # the artefact's path draws the same noise from seeds 7 and 8
    settings = SamplerSettings(steps=3, sampler="ddim", seed=7, latent_noise=0.3)
    tokens, _ = generate_tokens(gen, cond, 2, settings, use_cache=False, batch_size=2, progress=False)
    assert torch.equal(tokens, noisy)


def test_latent_noise_is_refused_where_it_cannot_apply(latent_generator, tiny_generator, tmp_path, capsys):
    from weightdiff.errors import ConditionError
    from weightdiff.sampling import SamplerSettings

    with pytest.raises(ConditionError, match="--latent-noise"):
        SamplerSettings(latent_noise=-0.1)
    with pytest.raises(ConditionError, match="--latent-noise"):
        SamplerSettings(latent_noise=float("nan"))
    out = tmp_path / "s"
    assert main(["sample", "--model", str(tiny_generator), "--task", TASK, "--num", "1", "--out", str(out),
                 "--latent-noise", "0.2"]) != 0
    assert "latent generators" in capsys.readouterr().err and not out.exists()
    pipe = WeightDiffusionPipeline.from_pretrained(tiny_generator)
    with pytest.raises(ConditionError, match="diffuses weight tokens"):
        pipe(task=TASK, latent_noise=0.2)
    assert main(["sample", "--model", str(latent_generator), "--task", TASK, "--num", "1", "--out", str(out),
                 "--latent-noise", "0.2"]) == 0


def test_the_fit_option_becomes_the_exported_default(tiny_lora_zoo, tmp_path, capsys):
    import json

    assert main(fit_args(tiny_lora_zoo, tmp_path, "--model.sampling_latent_noise", "0.2")) == 2
    assert "sampling_latent_noise" in capsys.readouterr().err  # token-space generator
    run = fit_tiny(tiny_lora_zoo, tmp_path / "fit", *LATENT, "--trainer.max_steps", str(AE_STEPS + 5),
                   "--model.sampling_latent_noise", "0.25")
    gen_dir = export_last(run, tmp_path / "gen")
    assert json.loads((gen_dir / "model_index.json").read_text())["sampling"]["latent_noise"] == 0.25
    assert "latent noise 0.25" in (gen_dir / "README.md").read_text()
    pipe = WeightDiffusionPipeline.from_pretrained(gen_dir)
    assert pipe.settings().latent_noise == 0.25 and pipe.settings(latent_noise=0.0).latent_noise == 0.0
    default, off = pipe(task=TASK, num_samples=1, seed=2), pipe(task=TASK, num_samples=1, seed=2, latent_noise=0.0)
    assert any(not torch.equal(default.params[k], off.params[k]) for k in default.params)
