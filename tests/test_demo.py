"""A fast version of the main job (`weightdiff demo --quick`): every stage's outputs exist and load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from weightdiff.demo import run_demo
from weightdiff.models.generator import load_generator
from tests.conftest import REPO


@pytest.fixture(scope="module")
def quick_demo(tiny_lora_zoo, tmp_path_factory) -> tuple[Path, dict]:
    """`weightdiff demo --quick` as the CLI runs it (no benchmark settings given): run folder and results."""
    run = tmp_path_factory.mktemp("demo") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        results = run_demo(run, zoo_config=REPO / "configs/zoo/rotdigits-lora.yaml",
                           fit_config=REPO / "configs/rotdigits-lora.yaml", workers=1, quick=True,
                           zoo_root=tiny_lora_zoo.parent)
    return run, results


def test_quick_demo_benchmarks_with_the_quick_protocol(quick_demo):
    """Quick means quick in every stage: the benchmark too runs a few samples on a few tasks, a short
    hypernetwork fit and few-shot SGD at small k on two tasks, not the full protocol."""
    _, on_disk = quick_demo  # what results.json holds (test_quick_demo_end_to_end compares the two)
    settings = on_disk["settings"]
    assert settings["num"] == 4
    assert len(settings["seen_tasks"]) == 2 and len(settings["unseen_tasks"]) == 3
    assert on_disk["hypernetworks"]["mlp_steps"] == 100
    assert len(settings["sgd_tasks"]) == 2 and settings["sgd_ks"] == ["1", "10"]
    assert len(on_disk["per_task"]["seen"]) == 2 and len(on_disk["per_task"]["unseen"]) == 3
    assert on_disk["sgd"].keys() == {"1", "10"}


def test_quick_demo_end_to_end(quick_demo, tiny_lora_zoo, monkeypatch):
    monkeypatch.chdir(REPO)
    run, results = quick_demo
    gen = load_generator(run / "generator")
    assert gen.kind == "lora"
    bench = run / "benchmark"
    on_disk = json.loads((bench / "results.json").read_text())
    assert on_disk["suite"] == "adapt-lora" and on_disk == json.loads(json.dumps(results))
    unseen = on_disk["unseen"]
    for row in ("generated", "retrieval", "floor", "base without adapter"):
        assert row in unseen, row
    # generated adapters must beat the majority-class floor even after a seconds-long fit
    assert unseen["generated"]["mean"] > unseen["floor"]["mean"] + 0.05
    assert (bench / "results.md").read_text().count("|") > 20
    assert list(bench.glob("*.png"))
    npz = next((bench / "predictions").glob("*.npz"))
    assert np.load(npz)["predictions"].ndim == 2
    # a second run reuses what was built (generator not retrained)
    mtime = (run / "generator" / "generator" / "diffusion_pytorch_model.safetensors").stat().st_mtime
    run_demo(run, zoo_config=REPO / "configs/zoo/tiny-rotdigits-lora.yaml", fit_config=REPO / "configs/tiny.yaml",
             workers=1, quick=True, zoo_root=tiny_lora_zoo.parent,
             bench_kwargs=dict(num=2, steps=3, max_seen_tasks=1, max_unseen_tasks=1, sgd_tasks=1, sgd_ks=(1,),
                               hypernet_steps=20, progress=False))
    assert (run / "generator" / "generator" / "diffusion_pytorch_model.safetensors").stat().st_mtime == mtime
