"""The README's "Use it on your own models" walk-through, run in miniature.

``scripts/own_models_example.py all --tiny`` generates its synthetic text tasks, trains PEFT LoRA
adapters of all-MiniLM-L6-v2 with a frozen classification head, imports them with ``zoo import``,
fits and exports a generator, samples adapters from descriptions and evaluates them. The test then
loads a sample with plain ``PeftModel.from_pretrained`` and checks that its logits on padded
sentences (``[PAD]`` masked) and its accuracy are the ones weightdiff computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from tests._tolerance import network_tol
from weightdiff.tasks import dataset
from weightdiff.tasks.dataset import register_task_file
from weightdiff.zoo import Zoo

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "own_models_example.py"


@pytest.fixture(scope="module")
def walkthrough(tmp_path_factory) -> Iterator[Path]:
    """The tiny walk-through's output folder (run in a fresh process, as the README runs it).

    Its task file is registered here while the module's tests run, then forgotten again.
    """
    out = tmp_path_factory.mktemp("own") / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "all", "--tiny", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = register_task_file(out / "tasks.json")
    yield out
    for name in names:
        dataset._SPECS.pop(name.removeprefix("dataset:name="), None)


@pytest.mark.slow
def test_adapters_are_imported_as_a_zoo_with_the_base_folder_and_the_heldout_task(walkthrough):
    rows = [json.loads(line) for line in (walkthrough / "manifest.jsonl").read_text().splitlines()]
    zoo = Zoo.open(walkthrough / "zoos" / "own-minilm")
    assert zoo.verify() == []
    assert sorted(r["task"] for r in zoo.rows()) == sorted(r["task"] for r in rows)
    assert {r["task"] for r in zoo.rows() if r["split"] == "heldout"} == {"dataset:name=taste"}
    spec = json.loads((zoo.path / "base" / "base_spec.json").read_text())
    assert spec == {"pretrained": ".", "auto_class": "AutoModelForSequenceClassification"}
    for row in zoo.rows():  # accuracies measured by weightdiff on import (the manifest gives none)
        assert 0.0 <= row["metrics"]["test_acc"] <= 1.0
    # the base's own accuracy too, scored on the logits of its SequenceClassifierOutput
    assert 0.0 <= zoo.info()["base"]["test_acc"] <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["size", "taste"])
def test_a_sampled_adapter_loads_in_plain_peft_with_weightdiffs_logits_and_accuracy(walkthrough, kind):
    samples = sorted(p for p in (walkthrough / "samples" / kind).iterdir() if p.is_dir())
    assert len(samples) == 4
    data = load_file(str(walkthrough / "data" / f"{kind}.safetensors"))
    x, y = data["x_test"], data["y_test"]  # padded token ids (N, L), labels (N,)
    assert (x == 0).sum(-1).unique().numel() > 1  # sentences of different lengths, padded with [PAD] (id 0)
    zoo = Zoo.open(walkthrough / "zoos" / "own-minilm")
    base_dir = str((zoo.path / "base").resolve())
    report = json.loads((walkthrough / f"eval-{kind}.json").read_text())
    reported = [w["accuracy"] for w in report["weights"]]
    assert len(reported) == len(samples)
    for sample, got_acc in zip(samples, reported):
        base = AutoModelForSequenceClassification.from_pretrained(base_dir, local_files_only=True).eval()
        model = PeftModel.from_pretrained(base, str(sample)).eval()
        with torch.no_grad():
            want = model(x, attention_mask=(x != base.config.pad_token_id).long()).logits  # (N, 2), [PAD] masked
            params = {k: v[None] for k, v in zoo.target().load_params(sample).items()}
            got = zoo.target().forward_batched(params, x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(base, want))
        peft_acc = float((want.argmax(-1) == y).float().mean())
        assert abs(got_acc - peft_acc) <= 1 / len(y), sample  # one near-tie may round the other way
    assert f"dataset:name={kind}" in report.get("task", f"dataset:name={kind}")


@pytest.mark.slow
def test_samples_evaluate_without_base_the_generator_carries_the_bases_record(walkthrough, capsys):
    """The export's base/ holds the zoo's base_spec.json and config.json, so `evaluate` finds the
    base architecture from the samples' own record (sample.json -> generator -> base/)."""
    from weightdiff.cli import main

    zoo_base = walkthrough / "zoos" / "own-minilm" / "base"
    gen_base = walkthrough / "gen" / "base"
    for name in ("base_spec.json", "config.json"):
        assert (gen_base / name).read_bytes() == (zoo_base / name).read_bytes()
    out = walkthrough / "eval-taste-nobase.json"
    assert main(["evaluate", "--task", "dataset:name=taste", "--weights", str(walkthrough / "samples" / "taste"),
                 "--json", str(out)]) == 0
    with_base = json.loads((walkthrough / "eval-taste.json").read_text())["weights"]
    assert [w["accuracy"] for w in json.loads(out.read_text())["weights"]] == [w["accuracy"] for w in with_base]
