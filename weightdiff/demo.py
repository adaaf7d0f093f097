"""The main job (``make demo``): zoo → generator → adapters from free text → honest benchmark.

Stages, each reusing what an earlier run built (so a second run, or a run after a kill, goes
straight to the first unfinished stage):

1. build the default LoRA zoo (``configs/zoo/rotdigits-lora.yaml``) with one worker per core;
2. train the generator with the Lightning CLI (``configs/rotdigits-lora.yaml``), resuming from
   ``last.ckpt`` when a previous run was interrupted;
3. export the EMA generator (safetensors + JSON);
4. sample adapters for held-out tasks from *free-text descriptions* and run the benchmark with
   every baseline of the honest protocol; write JSON / Markdown / PNG under the run folder.

``quick`` shrinks every stage, the benchmark included (:data:`QUICK_BENCHMARK`): the whole run
takes seconds to a minute on a CPU.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from weightdiff.errors import WeightDiffError
from weightdiff.evaluate.benchmark import run_benchmark
from weightdiff.models.generator import MODEL_INDEX_FILE
from weightdiff.training.export import export_checkpoint
from weightdiff.training.lightning_cli import run_lightning_cli
from weightdiff.zoo import Zoo, build_zoo, load_recipe

log = logging.getLogger("weightdiff.demo")

QUICK_ZOO = Path("configs/zoo/tiny-rotdigits-lora.yaml")
QUICK_FIT = Path("configs/tiny.yaml")
#: The benchmark protocol of ``--quick``, sized like its zoo and fit (seconds, not minutes): a few
#: samples on a few seen and unseen tasks, a short MLP hypernetwork fit, and few-shot SGD at two
#: k on two tasks (each fit takes the tiny zoo's own step budget).
QUICK_BENCHMARK: dict[str, Any] = dict(num=4, max_seen_tasks=2, max_unseen_tasks=3, hypernet_steps=100,
                                       sgd_tasks=2, sgd_ks=(1, 10))


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/4] {title}", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"      {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def run_demo(run_dir: Path, *, zoo_config: Path, fit_config: Path, workers: int = 2, quick: bool = False,
             zoo_root: Path = Path("checkpoints_zoo"), bench_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the four stages; returns the benchmark results dict.

    Args:
        run_dir: run folder for every output (training, generator, benchmark).
        zoo_config, fit_config: zoo recipe and LightningCLI fit config (ignored with ``quick``).
        workers: zoo build processes.
        quick: every stage at test size: the tiny zoo and fit, and the benchmark protocol
            :data:`QUICK_BENCHMARK`.
        zoo_root: folder the zoo is built in (or reused from).
        bench_kwargs: keyword arguments of :func:`run_benchmark`; with ``quick`` they override
            single entries of :data:`QUICK_BENCHMARK`.
    """
    if quick:
        zoo_config, fit_config = QUICK_ZOO, QUICK_FIT
        bench_kwargs = {**QUICK_BENCHMARK, **(bench_kwargs or {})}
    for p in (zoo_config, fit_config):
        if not p.is_file():
            raise WeightDiffError(f"config not found: {p} (run from the repository root)")
    run_dir.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()

    t0 = _stage(1, f"zoo: {zoo_config}")
    recipe = load_recipe(zoo_config)
    zoo_path = build_zoo(recipe, zoo_root, workers=workers)
    zoo = Zoo.open(zoo_path)
    _done(t0, f"{len(zoo.rows('train'))} training adapters, {len(zoo.rows('heldout'))} held-out oracle "
              f"adapters in {zoo_path}")

    gen_dir = run_dir / "generator"
    t0 = _stage(2, f"train the generator: {fit_config}")
    if (gen_dir / MODEL_INDEX_FILE).exists():
        _done(t0, f"reusing the exported generator in {gen_dir}")
    else:
        train_dir = run_dir / "train"
        last = _find_last(train_dir)
        # Checkpoints follow the logger's folder: keep both inside the run folder.
        args = ["fit", "--config", str(fit_config), "--data.zoo", str(zoo_path),
                "--trainer.default_root_dir", str(train_dir), "--trainer.logger.init_args.save_dir", str(train_dir)]
        if last is not None:
            print(f"      resuming from {last}", flush=True)
            args += ["--ckpt_path", str(last)]
        run_lightning_cli(args)
        last = _find_last(train_dir)
        if last is None:
            raise WeightDiffError(f"training wrote no checkpoint under {train_dir}")
        _done(t0, f"trained; checkpoint {last}")
        t0 = _stage(3, "export the EMA generator")
        export_checkpoint(last, gen_dir)
        _done(t0, f"exported to {gen_dir}")

    t0 = _stage(4, "sample adapters for held-out tasks from free-text descriptions, and benchmark")
    bench_dir = run_dir / "benchmark"
    results = run_benchmark(suite="adapt-lora", model=gen_dir, zoo=zoo_path, out=bench_dir,
                            from_description=True, **(bench_kwargs or {}))  # sampler and steps: the generator's
    _done(t0, f"benchmark written to {bench_dir}")
    print("\n" + (bench_dir / "results.md").read_text(), flush=True)
    print(f"Run folder: {run_dir.resolve()}  (total {time.perf_counter() - t_all:.0f} s)", flush=True)
    return results


def _find_last(train_dir: Path) -> Path | None:
    hits = sorted(train_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return hits[-1] if hits else None
