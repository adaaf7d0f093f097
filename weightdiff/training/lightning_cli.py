"""LightningCLI for ``weightdiff fit`` / ``validate``: the typed ``__init__`` signatures are the config."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI

from weightdiff.training.datamodule import ZooDataModule
from weightdiff.training.module import WeightDiffusion


class WeightDiffCLI(LightningCLI):
    """``LightningCLI(WeightDiffusion, ZooDataModule)`` with the data-dependent sizes linked."""

    def add_arguments_to_parser(self, parser) -> None:
        # Sizes known only after the zoo is opened and the tokenizer fitted.
        parser.link_arguments("data.spec", "model.spec", apply_on="instantiate")
        parser.link_arguments("data.condition", "model.condition")


def run_lightning_cli(args: Sequence[str] | None = None) -> WeightDiffCLI:
    """Run LightningCLI (``fit``/``validate``/``test``).

    Args:
        args: e.g. ``["fit", "--config", ...]`` when called from Python; ``None`` reads the
            process's ``sys.argv`` (the console script), which is also what Lightning's DDP
            launcher re-runs in each worker process.
    """
    kwargs = dict(save_config_kwargs={"overwrite": True})
    if args is None:
        return WeightDiffCLI(WeightDiffusion, ZooDataModule, **kwargs)
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads `args`, not the process's argv
    try:
        return WeightDiffCLI(WeightDiffusion, ZooDataModule, args=list(args), **kwargs)
    finally:
        sys.argv = argv
