"""Training callbacks: sample weights during training and measure them in the target network.

The validation loss of a weight generator says little about whether its samples *work*; the
curve a researcher watches is the accuracy of generated weights on tasks, seen and unseen. Every
``every_n_epochs`` epochs :class:`SampleEvalCallback` samples a few weight sets (EMA weights) for
a few training tasks and a few held-out tasks, decodes them, runs them on each task's validation
split and logs ``val/gen_acc_seen`` and ``val/gen_acc_unseen`` next to the zoo's own accuracy.

Training runs are sized in optimizer steps (``max_steps``), so :class:`StepProgressBar` shows one
bar over the steps of the whole fit (``step 120/2000``) instead of Lightning's per-epoch bar,
which for ``max_steps`` runs reads ``Epoch 59/-2``; :func:`add_step_progress_bar` makes it the
default of ``weightdiff fit``.

Lightning's ``ModelCheckpoint(every_n_train_steps=N, save_last=True)`` writes ``last.ckpt`` only on
the steps it saves at, so a fit whose ``max_steps`` is not a multiple of N ends with a
``last.ckpt`` of up to N − 1 steps before the end, and ``export`` and resuming would lose them.
:class:`FinalCheckpoint`, added to every ``weightdiff fit`` by :func:`add_final_checkpoint`, writes
it at the end of the fit.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf


class SampleEvalCallback(Callback):
    """Log the validation accuracy of generated weights.

    Args:
        every_n_epochs: how often (in epochs) to sample and evaluate.
        num_tasks: tasks per group (seen / unseen), spread evenly over the zoo's tasks.
        num_samples: samples per task.
        steps: sampler steps (default: the model's ``num_inference_steps``).
    """

    def __init__(self, every_n_epochs: int = 10, num_tasks: int = 4, num_samples: int = 4, steps: int | None = None):
        self.every_n_epochs = every_n_epochs
        self.num_tasks = num_tasks
        self.num_samples = num_samples
        self.steps = steps

    def _pick(self, rows: list[dict]) -> list[str]:
        names = sorted({r["task"] for r in rows})
        if not names:
            return []
        stride = max(1, len(names) // self.num_tasks)
        return names[::stride][: self.num_tasks]

    @torch.no_grad()
    def _group_accuracy(self, pl_module: LightningModule, dm, names: list[str]) -> tuple[float, float]:
        target = dm.zoo.target()
        gen = torch.Generator().manual_seed(0)
        accs, zoo_accs = [], []
        for name in names:
            raw = dm.conditions.raw(name, _FirstChoice(), dm.hparams.num_examples, gen)
            raw = tuple(r[None] for r in raw) if isinstance(raw, tuple) else raw[None]
            raw = tuple(r.to(pl_module.device) for r in raw) if isinstance(raw, tuple) else raw.to(pl_module.device)
            tokens = pl_module.generate(raw, self.num_samples, steps=self.steps, generator=gen)
            params = dm.tokenizer.decode_float(tokens.cpu())
            d = dm.conditions.data[name]
            logits = target.forward_batched(params, d.x_val)  # (S, N, C)
            accs.append((logits.argmax(-1) == d.y_val).float().mean().item())
            zoo_accs.extend(r["metrics"]["val_acc"] for r in dm.zoo.rows()
                            if r["task"] == name and "val_acc" in r["metrics"])
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
        return mean(accs), mean(zoo_accs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:  # sampling is cheap and logged from rank 0 only
            return
        if getattr(pl_module, "in_autoencoder_phase", False):  # nothing to sample before the diffusion trains
            return
        dm = trainer.datamodule
        for group, rows in (("seen", dm.train_rows), ("unseen", dm.heldout_rows)):
            names = self._pick(rows)
            if not names:
                continue
            acc, zoo_acc = self._group_accuracy(pl_module, dm, names)
            pl_module.log(f"val/gen_acc_{group}", acc, prog_bar=True, rank_zero_only=True)
            pl_module.log(f"val/zoo_acc_{group}", zoo_acc, rank_zero_only=True)


class _FirstChoice:
    """A stand-in RNG that always picks the first option (the task's first description)."""

    def randrange(self, n: int) -> int:
        return 0


class StepProgressBar(TQDMProgressBar):
    """One training bar over optimizer steps for the whole fit: ``step i/N``, the epoch in the postfix.

    ``N`` is ``trainer.estimated_stepping_batches`` (``max_steps`` when that ends the run, else the
    steps of ``max_epochs`` epochs; no total for endless runs) and a resumed fit starts the bar at
    its restored step. Validation keeps Lightning's own bar below it.

    Args:
        refresh_rate: redraw every this many steps.
        process_position: bar row offset (for several bars at once).
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}, {rate_fmt}{postfix}]"

    def __init__(self, refresh_rate: int = 1, process_position: int = 0) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)

    @property
    def train_description(self) -> str:
        return "step"

    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc=self.train_description, total=convert_inf(self.trainer.estimated_stepping_batches),
                    initial=self.trainer.global_step,  # a resumed fit continues from its step
                    position=2 * self.process_position, disable=self.is_disabled, leave=True, dynamic_ncols=True,
                    file=sys.stdout, smoothing=0, bar_format=self.BAR_FORMAT)

    def on_train_epoch_start(self, trainer: Trainer, *_: Any) -> None:
        pass  # one bar for the whole fit: never reset per epoch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        bar = self.train_progress_bar
        if self._should_update(trainer.global_step, bar.total) and not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.train_progress_bar.disable:  # drawn with the next step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        return {"epoch": trainer.current_epoch, **super().get_metrics(trainer, pl_module)}


def add_step_progress_bar(trainer_config: Any) -> None:
    """Add a :class:`StepProgressBar` to a trainer config's callbacks (in place) unless the config turns
    the progress bar off (``enable_progress_bar: false``) or already names a progress bar.

    Args:
        trainer_config: the trainer's init arguments with instantiated callbacks (a dict or a
            jsonargparse ``Namespace``), as LightningCLI holds them before it builds the trainer.
    """
    callbacks = _callback_list(trainer_config)
    if trainer_config.get("enable_progress_bar") is False or any(isinstance(c, ProgressBar) for c in callbacks):
        return
    trainer_config["callbacks"] = [*callbacks, StepProgressBar()]


class FinalCheckpoint(Callback):
    """At the end of a fit, write ``last.ckpt`` of every ``save_last`` :class:`ModelCheckpoint` that
    has not saved the final step (see the module docstring)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for checkpoint in trainer.checkpoint_callbacks:
            if (isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last
                    and checkpoint._last_global_step_saved != trainer.global_step):
                checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


def add_final_checkpoint(trainer_config: Any) -> None:
    """Add a :class:`FinalCheckpoint` to a trainer config's callbacks (in place) unless it has one."""
    callbacks = _callback_list(trainer_config)
    if not any(isinstance(c, FinalCheckpoint) for c in callbacks):
        trainer_config["callbacks"] = [*callbacks, FinalCheckpoint()]


def _callback_list(trainer_config: Any) -> list[Callback]:
    """A trainer config's ``callbacks`` (absent, one, or a sequence) as a list."""
    callbacks = trainer_config.get("callbacks") or []
    return list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
