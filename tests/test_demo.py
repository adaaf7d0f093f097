"""A fast version of the main job (`weightdiff demo --quick`): every stage's outputs exist and load."""

from __future__ import annotations

import json

import numpy as np

from weightdiff.demo import run_demo
from weightdiff.models.generator import load_generator
from tests.conftest import REPO


def test_quick_demo_end_to_end(tiny_lora_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    run = tmp_path / "run"
    results = run_demo(run, zoo_config=REPO / "configs/zoo/tiny-rotdigits-lora.yaml",
                       fit_config=REPO / "configs/tiny.yaml", workers=1, quick=True, zoo_root=tiny_lora_zoo.parent,
                       bench_kwargs=dict(num=4, steps=5, max_seen_tasks=2, max_unseen_tasks=3, sgd_tasks=2,
                                         sgd_ks=(1, 10), hypernet_steps=100, progress=False))
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
