"""Flow matching (rectified flow): the Euler sampler on an exact velocity field, the (a, s) view of
the clean estimate, a tiny fit end to end (export, load, sample), the exported folder's checks and
the diagnostics of a flow generator."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import export_last, fit_args, fit_tiny
from weightdiff.errors import ConditionError, ModelDirError
from weightdiff.io import read_json, write_json
from weightdiff.models.generator import load_generator
from weightdiff.models.schedule import ScheduleConfig, denoise, mask_padding, output_from_x0, predicted_x0
from weightdiff.sampling import WeightDiffusionPipeline
from weightdiff.tasks import get_task
from weightdiff.training.export import read_lightning_checkpoint
from weightdiff.training.objectives import loss_weight

EPS = torch.finfo(torch.float32).eps
VALID = torch.tensor([[True, True, True, True], [True, True, False, False]])  # (L=2, D=4): one token padded by 2
TASK = "rotdigits:angle=30"


def _flow() -> ScheduleConfig:
    """The flow-matching schedule the tiny fit below trains with."""
    return ScheduleConfig(objective="flow_matching", prediction_type="flow_prediction")

# ------------------------------------------------------------------------ Euler on a Gaussian
MU, TAU = 0.7, 0.5  # data x0 ~ N(MU, TAU²) per entry


def _gaussian_field(num_train_timesteps: int, ptype: str):
    """The exact denoiser of N(MU, TAU²) data on the path x_σ = (1 - σ) x0 + σ ε, at t = σ · T.

    x_σ ~ N((1 - σ) MU, V) with V = (1 - σ)² TAU² + σ²; E[x0 | x_σ] = MU + (1 - σ) TAU² / V · (x_σ - (1 - σ) MU)
    and E[ε | x_σ] = σ / V · (x_σ - (1 - σ) MU); the velocity is their difference E[ε - x0 | x_σ].
    """
    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = (t.double() / num_train_timesteps).view(-1, 1, 1)
        var = (1 - sigma) ** 2 * TAU ** 2 + sigma ** 2
        centred = x.double() - (1 - sigma) * MU
        x0 = MU + (1 - sigma) * TAU ** 2 / var * centred
        eps = sigma / var * centred
        return (x0 if ptype == "sample" else eps - x0).float()
    return fn


def _euler_std_bound(sigmas: torch.Tensor) -> float:
    """Bound on |c_K - TAU|, the Euler error in the samples' std on the grid ``sigmas`` (1 -> 0).

    The exact field is affine, v = α(σ) (x - m(σ)) - MU with m = (1 - σ) MU and α = V' / (2 V), so
    each Euler step keeps the mean exact (m' = m - h MU) and maps the std c of x to c (1 - h α): Euler
    on c' = α c, whose solution is c = sqrt(V). Its local error is at most h² max|c''| / 2 with
    c'' = TAU² / V^(3/2) (so max|c''| = TAU² / V_min^(3/2), V_min = TAU² / (1 + TAU²)), and each
    later step multiplies an error by at most 1 + h |α|: with Σ h = 1 the global error is at most
    exp(max|α|) · max|c''| · Σ h² / 2 (Hairer, Nørsett & Wanner, *Solving ODEs I*, thm. II.3.4).
    """
    h = (sigmas[:-1] - sigmas[1:]).double()
    grid = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    var = (1 - grid) ** 2 * TAU ** 2 + grid ** 2
    alpha = (grid - (1 - grid) * TAU ** 2) / var
    v_min = TAU ** 2 / (1 + TAU ** 2)
    return math.exp(float(alpha.abs().max())) * TAU ** 2 / v_min ** 1.5 * float((h ** 2).sum()) / 2


@pytest.mark.parametrize("ptype", ["flow_prediction", "sample"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_the_exact_velocity_of_a_gaussian_gives_its_mean_and_variance(ptype, shift):
    schedule = ScheduleConfig(objective="flow_matching", prediction_type=ptype, shift=shift)
    steps, batch = 400, 8000
    noise = torch.randn(batch, 2, 4, generator=torch.Generator().manual_seed(0))
    x = denoise(_gaussian_field(schedule.num_train_timesteps, ptype), (batch, 2, 4), schedule, steps=steps,
                sampler="euler", noise=noise, valid=VALID)
    assert torch.equal(x[:, ~VALID], torch.zeros_like(x[:, ~VALID]))  # padding: 0 at every step, 0 at the end
    values = x[:, VALID].double().flatten()
    n = values.numel()
    scheduler = schedule.sampling_scheduler("euler")
    scheduler.set_timesteps(steps)
    euler = _euler_std_bound(scheduler.sigmas)
    rounding = 4 * steps * EPS * (abs(MU) + 4)  # each step rounds x (|x| below MU + 4 std) in float32
    # the mean carries no Euler error (see _euler_std_bound), only the sampling error of n draws
    assert abs(float(values.mean()) - MU) <= 4 * (TAU + euler) / math.sqrt(n) + rounding
    # the variance: Euler's bound on the std, then the sampling error of a variance, sqrt(2 / n) relative
    var_tol = euler * (2 * TAU + euler) + 4 * math.sqrt(2 / n) * (TAU + euler) ** 2 + rounding
    assert var_tol < 0.15 * TAU ** 2  # the check has teeth: a variance 15 % off fails
    assert abs(float(values.var()) - TAU ** 2) <= var_tol, (float(values.var()), var_tol)
    # one step from pure noise (σ = 1) is the clean estimate there: E[x0 | x_1] = MU
    one = denoise(_gaussian_field(schedule.num_train_timesteps, ptype), (batch, 2, 4), schedule, sampler="x0",
                  noise=noise, valid=VALID)
    torch.testing.assert_close(one[:, VALID], torch.full_like(one[:, VALID], MU), rtol=0, atol=4 * EPS * 5)


# ------------------------------------------------------------------------- the (a, s) view
def test_flow_clean_estimate_and_velocity_invert_each_other_and_padding_is_masked():
    from weightdiff.models.schedule import NoiseLevel

    g = torch.Generator().manual_seed(1)
    x_t, v = torch.randn(4, 2, 4, generator=g), torch.randn(4, 2, 4, generator=g)
    sigma = torch.tensor([1.0, 0.5, 0.1, 0.001])
    level = NoiseLevel.from_sigma(sigma)
    x0 = predicted_x0(v, x_t, level, "flow_prediction")
    torch.testing.assert_close(x0, x_t - sigma.view(-1, 1, 1) * v, rtol=0, atol=0)  # x̂0 = x_σ - σ v
    # x0 = x - σ v and back (x - x0) / σ: two roundings on |x| + σ |v|, divided by σ on the way back
    atol = 4 * EPS * float((x_t.abs() / sigma.view(-1, 1, 1) + v.abs()).max())
    torch.testing.assert_close(output_from_x0(x0, x_t, level, "flow_prediction"), v, rtol=0, atol=atol)
    assert torch.equal(output_from_x0(x0, x_t, level, "sample"), x0)
    # the level of the denoiser's timestep σ · T is the same σ
    from_t = _flow().noise_level(sigma * _flow().num_train_timesteps)
    torch.testing.assert_close(from_t.signal, 1 - sigma, rtol=0, atol=EPS)
    masked = mask_padding(v, x_t, level, "flow_prediction", VALID)
    assert torch.equal(masked[:, VALID], v[:, VALID])
    zero = predicted_x0(masked, x_t, level, "flow_prediction")[:, ~VALID]
    assert float(zero.abs().max()) <= 4 * EPS * float(x_t.abs().max())
    # Min-SNR in velocity space: min(SNR, γ) σ², SNR = (1 - σ)² / σ² (x̂0's error is σ times v's)
    s = sigma[1:].double()
    want = torch.minimum(((1 - s) / s) ** 2, torch.tensor(5.0, dtype=torch.float64)) * s ** 2
    share = NoiseLevel.from_sigma(s).share
    got = loss_weight(share, "min_snr", "flow_prediction", gamma=5.0)
    # SNR = share / (1 - share) loses the digits of share that 1 - share cancels: u / (1 - share) relative
    rtol = 4 * torch.finfo(torch.float64).eps / float((1 - share).min())
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)


def test_options_that_do_not_apply_to_the_objective_are_refused():
    with pytest.raises(ValueError, match="prediction_type 'epsilon' does not apply to objective 'flow_matching'"):
        ScheduleConfig(objective="flow_matching", prediction_type="epsilon")
    with pytest.raises(ValueError, match="'flow_prediction' does not apply to objective 'ddpm'"):
        ScheduleConfig(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="shift"):
        ScheduleConfig(shift=3.0)
    for schedule, sampler in ((_flow(), "ddim"), (_flow(), "dpm"), (ScheduleConfig(), "euler")):
        with pytest.raises(ConditionError, match=f"sampler '{sampler}' does not sample a generator of objective "
                                                 f"'{schedule.objective}'"):
            denoise(lambda x, t: x, (1, 2, 4), schedule, steps=2, sampler=sampler)
    # the DDPM folder is what it was: its scheduler config holds no flow keys and reads back as DDPM
    ddpm = dict(ScheduleConfig().training_scheduler().config)
    assert "shift" not in ddpm and "objective" not in ddpm
    assert ScheduleConfig.from_scheduler_config(ddpm) == ScheduleConfig()


# ------------------------------------------------------------------------------ end to end
FIT_STEPS = 300


@pytest.fixture(scope="module")
def flow_run(tiny_lora_zoo, tmp_path_factory) -> Path:
    return fit_tiny(tiny_lora_zoo, tmp_path_factory.mktemp("flow_fit"), "--model.objective", "flow_matching",
                    "--model.prediction_type", "flow_prediction", "--trainer.max_steps", str(FIT_STEPS),
                    "--trainer.log_every_n_steps", "1")


@pytest.fixture(scope="module")
def flow_generator(flow_run, tmp_path_factory) -> Path:
    return export_last(flow_run, tmp_path_factory.mktemp("flow_gen") / "generator")


def _metric(run: Path, key: str) -> list[float]:
    return [float(r[key]) for r in csv.DictReader(open(next(run.glob("**/metrics.csv")))) if r.get(key)]


def test_flow_fit_lowers_the_loss_and_exports_a_flow_folder(flow_run, flow_generator):
    losses = _metric(flow_run, "train/weight_loss")
    assert len(losses) == FIT_STEPS
    k = len(losses) // 3
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.9 * first, (first, last)
    functional = _metric(flow_run, "train/functional_loss")  # x̂0 = x_σ - σ v̂ decoded and run in the target
    assert len(functional) == FIT_STEPS and all(math.isfinite(v) for v in functional)
    assert _metric(flow_run, "val/gen_acc_seen")  # the callback sampled with the Euler sampler

    index = read_json(flow_generator / "model_index.json")
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["sampling"] == {"sampler": "euler", "steps": 5, "latent_noise": 0.0}  # the objective's default; configs/tiny.yaml: 5
    config = read_json(flow_generator / "scheduler" / "scheduler_config.json")
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 1.0
    assert config["prediction_type"] == "flow_prediction"
    gen = load_generator(flow_generator)
    assert gen.schedule == _flow()
    ckpt = read_lightning_checkpoint(next(flow_run.glob("**/checkpoints/last.ckpt")))
    ema = {k[len("ema.module."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    state = gen.generator.state_dict()
    assert ema.keys() == state.keys() and all(torch.equal(ema[k], state[k]) for k in ema)


def test_flow_generator_samples_with_euler_and_x0_and_round_trips_bit_exactly(flow_generator, tmp_path):
    pipe = WeightDiffusionPipeline.from_pretrained(flow_generator)
    task = get_task(TASK)
    x, y = task.data().split("val")
    euler = pipe(task=TASK, num_samples=3, seed=0)
    assert euler.settings.sampler == "euler"
    one_step = pipe(task=TASK, num_samples=3, seed=0, sampler="x0")
    for samples in (euler, one_step):
        acc = pipe.target(task).accuracy(samples.params, x, y)  # decoded by the layout, run in the target network
        assert acc.shape == (3,) and bool(((acc >= 0) & (acc <= 1)).all())
    assert not torch.equal(euler.tokens, one_step.tokens)
    again = WeightDiffusionPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    assert again.schedule == pipe.schedule
    assert torch.equal(again(task=TASK, num_samples=3, seed=0).tokens, euler.tokens)
    with pytest.raises(ConditionError, match="sampler 'ddim' does not sample a generator of objective 'flow_matching'"):
        pipe(task=TASK, num_samples=1, sampler="ddim")


def test_cli_refuses_ddpm_samplers_and_options_on_flow_matching(flow_generator, tiny_lora_zoo, tmp_path, capsys):
    from weightdiff.cli import main

    out = tmp_path / "samples"
    args = ["sample", "--model", str(flow_generator), "--task", TASK, "--num", "2", "--out", str(out)]
    assert main([*args, "--sampler", "dpm"]) == 2
    err = capsys.readouterr().err
    assert "sampler 'dpm'" in err and "flow_matching" in err and not (out.exists() and any(out.iterdir()))
    assert main([*args, "--sampler", "euler"]) == 0 and len(list(out.iterdir())) == 2
    bad = fit_args(tiny_lora_zoo, tmp_path / "fit", "--model.objective", "flow_matching",
                   "--model.prediction_type", "epsilon")
    assert main(bad) == 2
    assert "prediction_type 'epsilon' does not apply to objective 'flow_matching'" in capsys.readouterr().err
    assert main([*bad[:-2], "--model.prediction_type", "flow_prediction", "--model.sampler", "ddim"]) == 2
    assert "sampler 'ddim' does not sample a generator of objective 'flow_matching'" in capsys.readouterr().err


# -------------------------------------------------------------------------- the folder's checks
def test_a_scheduler_of_the_other_objective_is_refused_naming_the_file(flow_generator, tmp_path):
    config_file = Path("scheduler") / "scheduler_config.json"

    def copy(name: str) -> Path:
        return Path(shutil.copytree(flow_generator, tmp_path / name))

    # a DDPM scheduler config in a flow folder (model_index.json names the flow scheduler)
    g = copy("ddpm_config")
    ScheduleConfig().training_scheduler().save_pretrained(g / "scheduler")
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    msg = str(err.value)
    assert str(g / config_file) in msg and "'DDPMScheduler'" in msg and "'FlowMatchEulerDiscreteScheduler'" in msg
    assert "model_index.json" in msg and "'scheduler'" in msg
    # model_index.json naming DDPM over a flow scheduler config
    g = copy("ddpm_index")
    write_json(g / "model_index.json", {**read_json(g / "model_index.json"), "scheduler": ["diffusers", "DDPMScheduler"]})
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    assert str(g / config_file) in str(err.value) and "FlowMatchEulerDiscreteScheduler" in str(err.value)
    # a scheduler class weightdiff does not sample with
    g = copy("unknown")
    write_json(g / "model_index.json", {**read_json(g / "model_index.json"),
                                        "scheduler": ["diffusers", "EulerDiscreteScheduler"]})
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    assert str(g / "model_index.json") in str(err.value) and "component 'scheduler'" in str(err.value)
    # a flow config this weightdiff would not have written (stochastic Euler steps), or an ε-predicting one
    for key, value, needle in (("stochastic_sampling", True, "'stochastic_sampling' is True, expected False"),
                               ("prediction_type", "epsilon", "prediction_type 'epsilon' does not apply")):
        g = copy(key)
        write_json(g / config_file, {**read_json(g / config_file), key: value})
        with pytest.raises(ModelDirError) as err:
            load_generator(g)
        assert str(g / config_file) in str(err.value) and needle in str(err.value)


# ------------------------------------------------------------------------------- diagnostics
def test_diagnose_a_flow_generator(flow_generator, tiny_lora_zoo, tmp_path, capsys):
    from weightdiff.cli import main

    out = tmp_path / "diag"
    argv = ["diagnose", "--model", str(flow_generator), "--zoo", str(tiny_lora_zoo), "--out", str(out),
            "--max-entries", "6", "--num", "2"]
    assert main([*argv, "--paths", "[euler:3]"]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    assert list(report["paths"]) == ["euler-3"]
    levels = report["noise_levels"]
    assert levels["objective"] == "flow_matching" and levels["timesteps"][:2] == [0, 10]
    train = levels["train"]
    # σ = 0: x_σ = x0 exactly, and the identity x_σ / (1 - σ) returns it
    assert train["identity_mse"][0] == 0.0
    # σ = 0.01: the identity's error is (σ / (1 - σ))² times the mean of ε² over the n noised entries
    n = 6 * int(load_generator(flow_generator).tokenizer.layout.valid_mask().sum())
    want = (0.01 / 0.99) ** 2
    # (float32 rounding of x_σ / (1 - σ) moves each error by about 3u |x0| (1 - σ) / σ relative: below
    # 1e-3 for normalised tokens, |x0| < 10)
    assert abs(train["identity_mse"][1] - want) <= 4 * math.sqrt(2 / n) * want + 1e-3 * want
    assert train["oracle_mse"][1] < 0.01 * want  # the posterior at low noise is the entry itself
    assert all(math.isfinite(v) for v in train["model_mse"])
    path = report["paths"]["euler-3"]
    assert len(path["t"]) == 3 and path["t"][0] == 1000.0  # σ · T from σ = 1
    assert "euler-3: final accuracy" in capsys.readouterr().out
    assert main([*argv, "--paths", "[ddim:3]"]) == 2
    err = capsys.readouterr().err
    assert "ddim:3" in err and "flow_matching" in err
    assert main(argv) == 0  # no --paths: the generator's own sampler, not DDIM's default
    assert list(json.loads((out / "diagnose.json").read_text())["paths"]) == ["euler-10", "euler-20"]
