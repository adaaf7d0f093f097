"""Training callbacks: sample weights during training and measure them in the target network.

The validation loss of a weight generator says little about whether its samples *work*; the
curve a researcher watches is the accuracy of generated weights on tasks, seen and unseen. Every
``every_n_epochs`` epochs :class:`SampleEvalCallback` samples a few weight sets (EMA weights) for
a few training tasks and a few held-out tasks, decodes them, runs them on each task's validation
split and logs ``val/gen_acc_seen`` and ``val/gen_acc_unseen`` next to the zoo's own accuracy.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


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
            zoo_accs.extend(r["metrics"]["val_acc"] for r in dm.zoo.rows() if r["task"] == name)
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else float("nan")
        return mean(accs), mean(zoo_accs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        if not trainer.is_global_zero:  # sampling is cheap and logged from rank 0 only
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
