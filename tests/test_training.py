"""Training through the Lightning CLI: loss goes down, export round-trips, resume, DDP, safe loading,
the learning-rate schedule."""

from __future__ import annotations

import csv
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, fit_args
from weightdiff.errors import WeightFileError
from weightdiff.models.generator import load_generator
from weightdiff.training.export import export_checkpoint, read_lightning_checkpoint
from weightdiff.training.module import warmup_cosine


def _metric(run: Path, key: str) -> list[float]:
    rows = list(csv.DictReader(open(next(run.glob("**/metrics.csv")))))
    return [float(r[key]) for r in rows if r.get(key)]


def test_fit_runs_and_weight_loss_decreases(tiny_run):
    losses = _metric(tiny_run, "train/weight_loss")
    assert len(losses) >= 6
    k = len(losses) // 3
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < 0.9 * first, (first, last)
    # the sampling callback logged the accuracy of generated weights
    assert _metric(tiny_run, "val/gen_acc_seen") and _metric(tiny_run, "val/gen_acc_unseen")


def test_export_round_trips_ema_weights(tiny_run, tiny_generator):
    ckpt = read_lightning_checkpoint(next(tiny_run.glob("**/checkpoints/last.ckpt")))
    gen = load_generator(tiny_generator)
    ema = {k[len("ema.module."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.module.")}
    state = gen.generator.state_dict()
    assert ema.keys() == state.keys()
    for k in ema:
        assert torch.equal(ema[k], state[k]), k
    assert gen.config["global_step"] == ckpt["global_step"] > 0
    assert gen.tokenizer.layout.num_params > 0
    # the layout's integer ids are copied into the EMA model, never averaged (and rounded down)
    layout = gen.tokenizer.layout
    assert torch.equal(ema["ids_tensor_index"], layout.token_tensor_index)
    assert torch.equal(ema["token_length"], layout.token_length)
    # the checkpoint carries the tokenizer the export wrote
    saved = ckpt["ZooDataModule"]["tokenizer"]
    assert torch.equal(saved["mean"], layout.mean) and saved["layout"] == layout.to_json()


@pytest.mark.parametrize("first_steps, second_steps", [(10, 15), (7, 9)])
def test_resume_continues_from_saved_step_and_ema(tiny_lora_zoo, tmp_path, first_steps, second_steps):
    """The tiny config saves every 5 steps; a fit that stops between two saves (7 steps) still ends
    with last.ckpt at its final step (Lightning alone would leave it at step 5) and resumes from it."""
    from weightdiff.training.lightning_cli import run_lightning_cli

    pinned = ["--trainer.logger.init_args.version", "0"]
    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", str(first_steps), *pinned))
    ckpt = next(tmp_path.glob("**/checkpoints/last.ckpt"))
    first = read_lightning_checkpoint(ckpt)
    assert first["global_step"] == first_steps
    assert int(first["state_dict"]["ema.n_averaged"]) == first_steps
    run_lightning_cli(fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", str(second_steps), "--ckpt_path", "last",
                               *pinned))
    second = read_lightning_checkpoint(ckpt)
    assert second["global_step"] == second_steps
    assert int(second["state_dict"]["ema.n_averaged"]) == second_steps  # EMA continued, not restarted


def test_ddp_on_two_cpu_processes(tiny_lora_zoo, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", "4", "--trainer.strategy", "ddp",
                    "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.check_val_every_n_epoch", "100")
    proc = subprocess.run([sys.executable, "-m", "weightdiff", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = read_lightning_checkpoint(next(tmp_path.glob("**/checkpoints/last.ckpt")))
    assert ckpt["global_step"] == 4


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_malicious_pickle_checkpoint_is_refused_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "last.ckpt"
    with open(bad, "wb") as fh:
        pickle.dump({"state_dict": _Exploit(marker)}, fh)
    with pytest.raises(WeightFileError, match="weights_only"):
        read_lightning_checkpoint(bad)
    with pytest.raises(WeightFileError):
        export_checkpoint(bad, tmp_path / "out")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("canonicalize", [False, True])
def test_datamodule_encodes_entries_exactly_as_the_tokenizer_was_fitted(tiny_lora_zoo, canonicalize):
    from weightdiff.weights.canonical import canonicalize_lora
    from weightdiff.training.datamodule import ZooDataModule

    dm = ZooDataModule(zoo=str(tiny_lora_zoo), token_size=32, canonicalize=canonicalize, condition="code",
                       functional_batch=0)
    dm.setup("fit")
    row = dm.train_rows[0]
    raw = dm.zoo.load(row["id"])
    expected = canonicalize_lora(raw) if canonicalize else raw
    assert torch.equal(dm._train.tokens[0], dm.tokenizer.encode(expected)[0])


@pytest.mark.parametrize("warmup, total", [(10, 60), (1, 7), (0, 5), (4, 4), (8, 3)])
def test_learning_rate_is_linear_warmup_then_cosine_to_a_tenth(warmup, total):
    lr = 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=lr)
    sched = warmup_cosine(opt, warmup, total)
    warm = min(warmup, total)
    for step in range(total):
        if step < warm:
            expected = (step + 1) / warm
        else:
            progress = (step - warm) / max(total - warm, 1)
            expected = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * expected, rel=1e-12, abs=1e-15), step
        opt.step()
        sched.step()
