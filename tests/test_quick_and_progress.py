"""Long phases show progress with meaningful totals, and the module is the one owner of its optimizer.

Bars are drawn by tqdm only on a terminal: the tests stand a terminal-like text stream in for stderr
(or stdout, where Lightning draws) and read the totals off what was drawn.
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import REPO
from weightdiff.evaluate.benchmark import run_benchmark


class _Terminal(io.StringIO):
    """A text stream that says it is a terminal, so tqdm draws on it."""

    def isatty(self) -> bool:
        return True


def _counts(text: str, desc: str) -> set[str]:
    """Every ``n/total`` tqdm drew after ``desc`` (carriage returns separate the redraws)."""
    return {m.group(1) for line in re.split(r"[\r\n]", text) if desc in line
            for m in [re.search(r"(\d+/\d+)", line.split(desc, 1)[1])] if m}


def test_benchmark_bars_count_hypernetwork_steps_and_every_few_shot_fit(tiny_lora_zoo, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    ks, seeds = (1, 5), (0, 1)
    results = run_benchmark("adapt-lora", None, tiny_lora_zoo, tmp_path / "bench", num=2, max_seen_tasks=1,
                            max_unseen_tasks=2, sgd_tasks=2, sgd_ks=ks, sgd_seeds=seeds, hypernet_steps=7,
                            noise_scales=(0.1,), select_per_class=None, progress=True)
    drawn = terminal.getvalue()
    assert results["hypernetworks"]["mlp_steps"] == 7
    assert "7/7" in _counts(drawn, "MLP hypernetwork"), drawn
    fits = len(results["settings"]["sgd_tasks"]) * len(ks) * len(seeds)  # every (task, k, seed) is one fit
    assert fits == 8
    assert {f"0/{fits}", f"{fits}/{fits}"} <= _counts(drawn, "few-shot SGD"), drawn


def test_progress_false_or_no_terminal_draws_no_bar(tiny_lora_zoo, tmp_path, monkeypatch):
    """progress=False silences the bars on a terminal; progress=True draws nothing into a log file."""
    for progress, stream in ((False, _Terminal()), (True, io.StringIO())):
        monkeypatch.setattr(sys, "stderr", stream)
        run_benchmark("adapt-lora", None, tiny_lora_zoo, tmp_path / f"bench-{progress}", num=2, max_seen_tasks=1,
                      max_unseen_tasks=1, sgd_tasks=1, sgd_ks=(1,), hypernet_steps=3, noise_scales=(0.1,),
                      select_per_class=None, progress=progress)
        drawn = stream.getvalue()
        for desc in ("MLP hypernetwork", "few-shot SGD", "benchmark tasks"):
            assert desc not in drawn, (progress, drawn)


class _Linear(L.LightningModule):
    """A two-parameter regression: enough for the trainer to take steps."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(batches: int) -> DataLoader:
    x = torch.linspace(-1, 1, 2 * batches)[:, None]
    return DataLoader(TensorDataset(x, 2 * x), batch_size=2)


def test_step_progress_bar_counts_steps_over_epochs(tmp_path, monkeypatch):
    """max_steps=7 over 3-batch epochs: one bar `step 7/7`, not an `Epoch 2/-2` bar per epoch."""
    from weightdiff.training.callbacks import StepProgressBar

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)  # Lightning draws its bars on stdout
    bar = StepProgressBar()
    trainer = L.Trainer(max_steps=7, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(_Linear(), _loader(3))
    assert trainer.max_epochs == -1  # max_steps-driven: Lightning's own bar would read `Epoch 2/-2`
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (7, 7)
    drawn = terminal.getvalue()
    assert "step 7/7" in drawn, drawn
    assert {f"step {i}/7" for i in range(1, 8)} <= set(re.findall(r"step \d+/\d+", drawn))
    assert "Epoch" not in drawn and "/-" not in drawn
    assert "epoch=2" in drawn  # the epoch is still shown, in the postfix


def test_step_progress_bar_of_a_resumed_fit_starts_at_its_step(tmp_path, monkeypatch):
    from weightdiff.training.callbacks import StepProgressBar

    def trainer(max_steps: int, bar: StepProgressBar) -> L.Trainer:
        return L.Trainer(max_steps=max_steps, callbacks=[bar], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)

    first = trainer(4, StepProgressBar())
    first.fit(_Linear(), _loader(3))
    first.save_checkpoint(tmp_path / "four.ckpt")
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    bar = StepProgressBar()
    trainer(7, bar).fit(_Linear(), _loader(3), ckpt_path=tmp_path / "four.ckpt")
    assert (bar.train_progress_bar.initial, bar.train_progress_bar.n, bar.train_progress_bar.total) == (4, 7, 7)
    assert set(re.findall(r"step \d+/\d+", terminal.getvalue())) == {"step 4/7", "step 5/7", "step 6/7", "step 7/7"}


def test_fit_shows_step_bar_and_uses_the_modules_optimizer(tiny_lora_zoo, tmp_path, monkeypatch):
    """`weightdiff fit` (LightningCLI) draws a StepProgressBar; its optimizer is the module's AdamW with
    --model.lr and the warm-up/cosine schedule."""
    from weightdiff.training.callbacks import StepProgressBar
    from weightdiff.training.lightning_cli import run_lightning_cli

    monkeypatch.setattr(sys, "stdout", _Terminal())
    cli = run_lightning_cli(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--data.zoo", str(tiny_lora_zoo),
                             "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir",
                             str(tmp_path), "--trainer.max_steps", "3", "--trainer.check_val_every_n_epoch", "10",
                             "--model.lr", "0.002", "--model.warmup_steps", "2"])
    bar = cli.trainer.progress_bar_callback
    assert isinstance(bar, StepProgressBar)
    assert (bar.train_progress_bar.n, bar.train_progress_bar.total) == (3, 3)
    (opt,) = cli.trainer.optimizers
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["initial_lr"] == 0.002
    (sched,) = cli.trainer.lr_scheduler_configs
    assert isinstance(sched.scheduler, torch.optim.lr_scheduler.SequentialLR) and sched.interval == "step"


def test_step_progress_bar_is_added_unless_off_or_named():
    """--trainer.enable_progress_bar false still works (no bar is forced in), and a bar the config names
    is kept."""
    from lightning.pytorch.callbacks import RichProgressBar

    from weightdiff.training.callbacks import StepProgressBar, add_step_progress_bar

    off = {"enable_progress_bar": False, "callbacks": []}
    add_step_progress_bar(off)
    assert off["callbacks"] == []
    chosen = RichProgressBar()
    named = {"callbacks": [chosen]}
    add_step_progress_bar(named)
    assert named["callbacks"] == [chosen]
    default = {"callbacks": None}
    add_step_progress_bar(default)
    assert [type(c) for c in default["callbacks"]] == [StepProgressBar]


def test_fit_refuses_optimizer_and_lr_scheduler_options(tiny_lora_zoo, tmp_path, capsys):
    """--optimizer/--lr_scheduler would replace the module's AdamW, warm-up and cosine (and make --model.lr
    dead): refused in one line, exit 2, before anything is trained or written."""
    from weightdiff.cli import main

    for option, value in (("--optimizer", "SGD"), ("--lr_scheduler", "StepLR")):
        out = tmp_path / option.strip("-")
        code = main(["fit", "--config", str(REPO / "configs/tiny.yaml"), "--data.zoo", str(tiny_lora_zoo),
                     "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
                     "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", option, value])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (option, err)
        assert len(err) == 1 and err[0].startswith("weightdiff: error:") and option in err[0], err
        assert not list(Path(out).glob("**/*.ckpt"))
