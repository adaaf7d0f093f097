"""Shared fixtures: a tiny LoRA zoo and a tiny trained generator, built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One intra-op thread for the whole session: the tests run small ops, which are fastest on
    one thread, and on a shared 2-core machine more threads only oversubscribe it (a tiny fit runs
    5-10x slower). Session-scoped and autouse so it precedes the shared zoo/fit fixtures."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep text-embedding and sample caches out of the user's home during tests."""
    os.environ.setdefault("WEIGHTDIFF_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_lora_zoo(tmp_path_factory) -> Path:
    """The `tiny-rotdigits-lora` recipe built in-process (seconds)."""
    from weightdiff.zoo import build_zoo, load_recipe

    root = tmp_path_factory.mktemp("zoo")
    return build_zoo(load_recipe(REPO / "configs/zoo/tiny-rotdigits-lora.yaml"), root, workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_cordigits_zoo(tmp_path_factory) -> Path:
    """The `tiny-cordigits-lora` recipe (DigitsViT base, LoRA on q/v) built in-process (seconds)."""
    from weightdiff.zoo import build_zoo, load_recipe

    root = tmp_path_factory.mktemp("cordigits-zoo")
    return build_zoo(load_recipe(REPO / "configs/zoo/tiny-cordigits-lora.yaml"), root, workers=1, progress=False)


def fit_args(zoo: Path, out: Path, *extra: str) -> list[str]:
    """`weightdiff fit` arguments for the tiny config, with every output under ``out``."""
    return ["fit", "--config", str(REPO / "configs/tiny.yaml"), "--data.zoo", str(zoo),
            "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out),
            "--trainer.enable_progress_bar", "false", *extra]


def fit_tiny(zoo: Path, out: Path, *extra: str) -> Path:
    """Run the tiny `fit` (configs/tiny.yaml plus ``extra`` options) into ``out``; returns ``out``."""
    from weightdiff.training.lightning_cli import run_lightning_cli

    run_lightning_cli(fit_args(zoo, out, *extra))
    return out


def export_last(run: Path, out: Path) -> Path:
    """Export the last checkpoint of the fit run in ``run`` to the generator folder ``out``."""
    from weightdiff.training.export import export_checkpoint

    return export_checkpoint(next(run.glob("**/checkpoints/last.ckpt")), out)


@pytest.fixture(scope="session")
def tiny_run(tiny_lora_zoo, tmp_path_factory) -> Path:
    """A finished tiny `fit` run (its folder holds metrics.csv and checkpoints/last.ckpt)."""
    return fit_tiny(tiny_lora_zoo, tmp_path_factory.mktemp("fit"))


@pytest.fixture(scope="session")
def tiny_generator(tiny_run, tmp_path_factory) -> Path:
    """The tiny run exported (the artefact `sample` loads)."""
    return export_last(tiny_run, tmp_path_factory.mktemp("gen") / "generator")
