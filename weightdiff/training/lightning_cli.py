"""LightningCLI for ``weightdiff fit`` / ``validate``: the typed ``__init__`` signatures are the config."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from weightdiff.training.callbacks import add_final_checkpoint, add_step_progress_bar
from weightdiff.training.datamodule import ZooDataModule
from weightdiff.training.module import WeightDiffusion

PROG = "weightdiff"


class WeightDiffCLI(LightningCLI):
    """``LightningCLI(WeightDiffusion, ZooDataModule)`` with the data-dependent sizes linked.

    Only ``fit`` and ``validate`` are subcommands: the module has no ``test_step`` or
    ``predict_step`` (sampling is ``weightdiff sample``).
    """

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The subcommands and the ``Trainer`` method arguments each one leaves out of its options."""
        return {name: skip for name, skip in LightningCLI.subcommands().items() if name in ("fit", "validate")}

    def add_arguments_to_parser(self, parser) -> None:
        # Sizes known only after the zoo is opened and the tokenizer fitted.
        parser.link_arguments("data.spec", "model.spec", apply_on="instantiate")
        parser.link_arguments("data.condition", "model.condition")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse ``args`` (``None``: ``sys.argv[1:]``); giving both is how the console script runs."""
        self.config = parser.parse_args(args)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        add_step_progress_bar(trainer_config)  # `step i/max_steps`
        add_final_checkpoint(trainer_config)  # last.ckpt holds the final step
        return super().instantiate_trainer(**kwargs)


def run_lightning_cli(args: Sequence[str] | None = None, *, keep_process_argv: bool = False) -> WeightDiffCLI:
    """Run LightningCLI (``fit``/``validate``).

    Parse errors (an unknown key in a config file, a bad value, a missing required option) raise
    :class:`jsonargparse.ArgumentError` instead of printing the usage and exiting, so that the
    caller can report them in one line; ``--help`` still prints and exits.

    Args:
        args: e.g. ``["fit", "--config", ...]``; ``None`` reads the process's ``sys.argv``.
        keep_process_argv: leave ``sys.argv`` as it is while ``args`` run. It is what Lightning's
            DDP launcher re-runs in each worker process: true for the console script, whose
            command line holds ``args`` after the global options; false (``sys.argv`` emptied
            meanwhile) when called from Python, where ``sys.argv`` is some other program's.
    """
    # auto_configure_optimizers=False: the module owns the optimizer and its schedule (--model.lr,
    # --model.weight_decay, --model.warmup_steps); no --optimizer/--lr_scheduler to silently replace them.
    kwargs = dict(save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
                  parser_kwargs={"prog": PROG, "exit_on_error": False,
                                 **{name: {"exit_on_error": False} for name in WeightDiffCLI.subcommands()}})
    if args is None or keep_process_argv:
        return WeightDiffCLI(WeightDiffusion, ZooDataModule, args=None if args is None else list(args), **kwargs)
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        return WeightDiffCLI(WeightDiffusion, ZooDataModule, args=list(args), **kwargs)
    finally:
        sys.argv = argv
