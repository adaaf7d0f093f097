"""``base_model_name_or_path`` is written relative to the adapter folder, so folder trees can move.

An exported generator's ``base/adapter_config.json`` names its own folder (``"."``); a sample
names the generator's ``base/`` relative to itself; a zoo entry written by ``Target.save`` names
the zoo's ``base/`` the same way. A tree holding a generator and its samples is moved: ``evaluate``
still finds the base from the samples alone, with the same scores, and plain
``PeftModel.from_pretrained`` still loads a sample. Absolute paths (older files) are still read.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests._tolerance import network_tol
from weightdiff.cli import main
from weightdiff.errors import WeightFileError
from weightdiff.evaluate.weights import evaluate_weights, find_base, find_weight_paths, load_weight_sets, target_for
from weightdiff.io import load_weights
from weightdiff.targets import BASE_PATH_FIELD, Target, base_path_for, resolve_base_path
from weightdiff.tasks import get_task

TASK = "rotdigits:angle=10"


def _config(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())


@pytest.fixture
def tree(tiny_generator, tmp_path) -> Path:
    """``tree/gen`` (a copy of the exported tiny generator) and ``tree/samples`` (two samples of it)."""
    root = tmp_path / "tree"
    shutil.copytree(tiny_generator, root / "gen")
    assert main(["sample", "--model", str(root / "gen"), "--out", str(root / "samples"), "--task", TASK,
                 "--num", "2", "--steps", "2", "--no-cache"]) == 0
    return root


def test_export_and_samples_record_the_base_relative_to_themselves(tree):
    assert _config(tree / "gen" / "base")[BASE_PATH_FIELD] == "."
    for sample in sorted((tree / "samples").iterdir()):
        assert _config(sample)[BASE_PATH_FIELD] == os.path.join("..", "..", "gen", "base")
        assert find_base(sample).resolve() == (tree / "gen" / "base" / "model.safetensors").resolve()


def test_a_moved_tree_still_evaluates_without_base_and_loads_in_plain_peft(tree, tmp_path):
    before = evaluate_weights(TASK, [str(tree / "samples")])
    moved = tmp_path / "elsewhere" / "moved-tree"
    moved.parent.mkdir()
    shutil.move(str(tree), str(moved))
    assert not tree.exists()
    samples = sorted((moved / "samples").iterdir())
    assert json.loads((samples[0] / "sample.json").read_text())["model_dir"].startswith(str(tree))  # stale now
    for sample in samples:
        assert find_base(sample).resolve() == (moved / "gen" / "base" / "model.safetensors").resolve()

    after = evaluate_weights(TASK, [str(moved / "samples")])
    assert [w["accuracy"] for w in after["weights"]] == [w["accuracy"] for w in before["weights"]]

    task = get_task(TASK)
    x = task.data().x_test[:50]
    weights = load_weight_sets(find_weight_paths(moved / "samples"))
    target = target_for(weights, task)
    for i, sample in enumerate(samples):
        base = task.build_network()
        base.load_state_dict(load_weights(moved / "gen" / "base" / "model.safetensors"), strict=True)
        model = PeftModel.from_pretrained(base, str(sample)).eval()
        with torch.no_grad():
            want = model(x)
            got = target.forward_batched({k: v[i:i + 1] for k, v in weights.params.items()}, x)[0]
        torch.testing.assert_close(got, want, rtol=0, atol=network_tol(task.build_network(), want))


def test_absolute_paths_of_older_files_are_still_read(tree, tmp_path):
    sample = min((tree / "samples").iterdir())
    config = _config(sample)
    base_dir = (tree / "gen" / "base").resolve()
    (sample / "adapter_config.json").write_text(json.dumps({**config, BASE_PATH_FIELD: str(base_dir)}))
    info = json.loads((sample / "sample.json").read_text())
    (sample / "sample.json").write_text(json.dumps({**info, "model_dir": str(tmp_path / "gone")}))
    assert find_base(sample) == base_dir / "model.safetensors"  # the absolute path, not the stale model_dir

    (sample / "adapter_config.json").write_text(json.dumps({**config, BASE_PATH_FIELD: str(tmp_path / "gone")}))
    assert find_base(sample) is None  # nothing names an existing base: a clear error, not a wrong base
    with pytest.raises(WeightFileError, match="no base network found.*pass --base"):
        target_for(load_weight_sets([sample]), get_task(TASK))


def test_zoo_entries_name_the_zoo_base_relative_to_themselves(tmp_path):
    task = get_task(TASK)
    zoo = tmp_path / "zoo"
    target = Target.lora(task.build_network(), {**task.default_lora_config(),
                                                BASE_PATH_FIELD: str((zoo / "base").resolve())})
    torch.manual_seed(0)
    params = {k: torch.randn(*s) for k, s in target.param_shapes().items()}
    (zoo / "base").mkdir(parents=True)
    target.save(params, zoo / "entries" / "e0")
    assert _config(zoo / "entries" / "e0")[BASE_PATH_FIELD] == os.path.join("..", "..", "base")
    moved = tmp_path / "moved"
    shutil.move(str(zoo), str(moved))
    named = resolve_base_path(_config(moved / "entries" / "e0")[BASE_PATH_FIELD], moved / "entries" / "e0")
    assert named is not None and named.resolve() == (moved / "base").resolve()


def test_only_local_paths_on_one_tree_become_relative(tmp_path):
    folder = tmp_path / "samples" / "sample_0000"
    assert base_path_for(str(tmp_path / "gen" / "base"), folder) == os.path.join("..", "..", "gen", "base")
    assert base_path_for("sentence-transformers/all-MiniLM-L6-v2", folder) == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_path_for(None, folder) is None
    elsewhere = str(Path(tmp_path.anchor) / "weightdiff-no-such-tree" / "base")  # shares only the root
    assert base_path_for(elsewhere, folder) == elsewhere
    assert resolve_base_path("sentence-transformers/all-MiniLM-L6-v2", folder) is None
