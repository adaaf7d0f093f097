"""Text conditions from the descriptions a zoo carries: imported zoos train on their own.

The imported zoo is made of adapters of the tiny zoo fixture, written again as PEFT folders by
``save_pretrained`` and listed in a JSONL manifest whose descriptions are unlike the family's:
two rows of one task (their descriptions overlap), one row of a second task with a single
description, and one held-out row. The datamodule's text conditions, a short fit, its export
(``descriptions.json``), ``sample --task`` and the benchmark's held-out paraphrases are checked
against those descriptions; a built zoo keeps its family's, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import fit_args

from weightdiff.cli import main as cli_main
from weightdiff.errors import ConditionError, ModelDirError, WeightDiffError
from weightdiff.evaluate.benchmark import heldout_description
from weightdiff.models.conditioning import TextEncoder, text_condition
from weightdiff.models.generator import DESCRIPTIONS_FILE, load_generator
from weightdiff.sampling import make_condition
from weightdiff.tasks import get_task
from weightdiff.training.datamodule import ZooDataModule, zoo_descriptions
from weightdiff.training.export import export_checkpoint, read_lightning_checkpoint
from weightdiff.training.lightning_cli import run_lightning_cli
from weightdiff.zoo import Zoo, import_zoo

GIVEN_METRICS = {"train_acc": 0.5, "val_acc": 0.5, "test_acc": 0.5}  # given: nothing is measured on import


def _turned(task: str, words: str) -> str:
    """A description in the manifest's own words that names the task's angle (rotdigits needs one)."""
    angle = get_task(task).angle
    way = " anticlockwise" if angle > 0 else " clockwise" if angle < 0 else ""
    return f"{words}: the scans were turned {abs(angle):g} degrees{way}"


@pytest.fixture(scope="module")
def imported(tiny_lora_zoo, tmp_path_factory) -> dict:
    """An imported zoo of four PEFT folders, and the descriptions its manifest gives each task."""
    from peft import PeftModel

    built = Zoo.open(tiny_lora_zoo)
    src = tmp_path_factory.mktemp("descr_sources")
    shutil.copy(built.base_file(), src / "base.safetensors")
    train, held = built.rows("train"), built.rows("heldout")
    a, b, c = train[0]["task"], train[2]["task"], held[0]["task"]
    listed = [  # (source row, task, split, descriptions)
        (train[0], a, "train", [_turned(a, "first of A"), _turned(a, "shared by A")]),
        (train[1], a, "train", [_turned(a, "shared by A"), _turned(a, "second of A"), _turned(a, "last of A")]),
        (train[2], b, "train", [_turned(b, "only B")]),
        (held[0], c, "heldout", [_turned(c, "one of C"), _turned(c, "two of C")]),
    ]
    rows = []
    for i, (row, task, split, descriptions) in enumerate(listed):
        model = PeftModel.from_pretrained(built.base_module(), str(built.entry_dir(row["id"])))
        model.save_pretrained(str(src / f"adapter{i}"))
        rows.append({"path": f"adapter{i}", "task": task, "split": split, "descriptions": descriptions,
                     "metrics": GIVEN_METRICS, **({"heldout_kind": "far"} if split == "heldout" else {})})
    manifest = src / "own.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    zoo = import_zoo(manifest, src / "base.safetensors", root=tmp_path_factory.mktemp("descr_zoo"),
                     progress=False).zoo_dir
    d = lambda i: listed[i][3]  # noqa: E731
    expect = {  # union in manifest order, duplicates dropped; the last of two or more is held out
        a: (d(0) + d(1)[1:2], d(1)[2]),
        b: (d(2), None),
        c: (d(3)[:1], d(3)[1]),
    }
    return {"zoo": zoo, "expect": expect, "tasks": (a, b, c)}


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory) -> dict:
    """A 5-step fit on the imported zoo (tiny config), its last checkpoint and its export."""
    out = tmp_path_factory.mktemp("descr_fit")
    run_lightning_cli(fit_args(imported["zoo"], out, "--trainer.max_steps", "5",
                               "--trainer.check_val_every_n_epoch", "100"))
    ckpt = next(out.glob("**/checkpoints/last.ckpt"))
    return {"ckpt": ckpt, "gen": export_checkpoint(ckpt, out / "generator")}


def _text_dm(zoo: Path) -> ZooDataModule:
    return ZooDataModule(zoo=str(zoo), token_size=32, condition="text", functional_batch=0)


# ----------------------------------------------------------------------------------- conditions
def test_imported_zoo_conditions_are_the_embeddings_of_its_own_descriptions(imported):
    dm = _text_dm(imported["zoo"])
    conds = dm.conditions
    assert set(conds.text) == set(imported["expect"])
    for task, (train, heldout) in imported["expect"].items():
        assert torch.equal(conds.text[task], text_condition(train)), task
        assert conds.text[task].shape[0] != len(get_task(task).descriptions())  # not the family's seven
        assert conds.descriptions[task].heldout == heldout
    assert dm.descriptions_record == {"source": "zoo", "tasks": {
        t: {"train": train, "heldout": held} for t, (train, held) in sorted(imported["expect"].items())}}
    # the new descriptions are in the on-disk embedding cache: a fresh encoder runs no forward pass
    fresh = TextEncoder()
    fresh.encode([text for train, held in imported["expect"].values() for text in train])
    assert fresh.model_calls == 0
    # every training item's condition is one of its task's own description embeddings
    dm.setup("fit")
    for i in range(len(dm._train)):
        item, task = dm._train[i], dm._train.rows[i]["task"]
        assert any(torch.equal(item["cond"], row) for row in text_condition(imported["expect"][task][0]))


def test_built_zoo_conditions_are_the_family_descriptions_bit_for_bit(tiny_lora_zoo):
    dm = _text_dm(tiny_lora_zoo)
    assert zoo_descriptions(dm.zoo) is None
    names = sorted({r["task"] for r in dm.zoo.rows()})
    assert sorted(dm.conditions.text) == names
    for name in names:
        assert torch.equal(dm.conditions.text[name], text_condition(get_task(name).descriptions()))
    record = dm.descriptions_record
    assert record["source"] == "family"
    assert record["tasks"] == {n: {"train": get_task(n).descriptions(), "heldout": None} for n in names}
    assert ZooDataModule(zoo=str(tiny_lora_zoo), condition="code").descriptions_record is None


def test_a_description_the_encoder_refuses_names_the_entry_file(imported, tmp_path):
    zoo = tmp_path / "zoo"
    shutil.copytree(imported["zoo"], zoo)
    entry = next(p for p in sorted((zoo / "entries").iterdir()) if p.is_dir())
    row = json.loads((entry / "entry.json").read_text())
    row["descriptions"] = ["x" * 100_000]
    (entry / "entry.json").write_text(json.dumps(row))
    with pytest.raises(ConditionError) as err:
        _ = _text_dm(zoo).conditions
    assert str(entry / "entry.json") in str(err.value) and "'descriptions'" in str(err.value)
    assert "100000 characters" in str(err.value)


# ------------------------------------------------------------------------------- fit and export
def test_fit_saves_and_export_records_the_descriptions(imported, exported):
    dm = _text_dm(imported["zoo"])
    state = read_lightning_checkpoint(exported["ckpt"])[ZooDataModule.__qualname__]
    assert state["descriptions"] == dm.descriptions_record
    on_disk = json.loads((exported["gen"] / DESCRIPTIONS_FILE).read_text())
    assert on_disk == dm.descriptions_record
    gen = load_generator(exported["gen"])
    assert gen.descriptions == on_disk
    a = imported["tasks"][0]
    card = (exported["gen"] / "README.md").read_text()
    assert imported["expect"][a][0][0] in card and "the zoo's own (5 trained on" in card


def test_resume_refuses_descriptions_other_than_the_checkpoints(imported, exported):
    state = read_lightning_checkpoint(exported["ckpt"])[ZooDataModule.__qualname__]
    _text_dm(imported["zoo"]).load_state_dict(state)  # the same descriptions: resumes
    b = imported["tasks"][1]
    state["descriptions"]["tasks"][b]["train"] = ["another phrasing, 0 degrees"]
    with pytest.raises(WeightDiffError) as err:
        _text_dm(imported["zoo"]).load_state_dict(state)
    assert repr(b) in str(err.value) and "another phrasing" in str(err.value)


def test_sample_task_uses_the_zoos_first_description(imported, exported, tmp_path, capsys):
    gen = load_generator(exported["gen"])
    for task, (train, _) in imported["expect"].items():
        cond = make_condition(gen, task=task)
        assert cond.info["description"] == train[0]
        assert torch.equal(cond.raw, text_condition(train[:1]))
    a = imported["tasks"][0]
    out = tmp_path / "samples"
    assert cli_main(["sample", "--model", str(exported["gen"]), "--task", a, "--num", "1", "--steps", "1",
                     "--out", str(out)]) == 0
    (sample_json,) = out.glob("*/sample.json")
    assert json.loads(sample_json.read_text())["condition"]["description"] == imported["expect"][a][0][0]
    # a task the generator has no record of falls back to its family's first description
    other = "rotdigits:angle=5,flip=0"
    assert other not in imported["expect"]
    assert make_condition(gen, task=other).info["description"] == get_task(other).descriptions()[0]


def test_exports_without_a_descriptions_record_still_load_and_use_the_family(imported, exported, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(exported["gen"], old)
    (old / DESCRIPTIONS_FILE).unlink()
    gen = load_generator(old)
    assert gen.descriptions is None
    a = imported["tasks"][0]
    assert make_condition(gen, task=a).info["description"] == get_task(a).descriptions()[0]
    assert heldout_description(get_task(a), gen.descriptions) == get_task(a).heldout_description()
    (old / DESCRIPTIONS_FILE).write_text(json.dumps({"source": "zoo", "tasks": {a: {"train": []}}}))
    with pytest.raises(ModelDirError) as err:
        load_generator(old)
    assert str(old / DESCRIPTIONS_FILE) in str(err.value) and f"'tasks.{a}.train'" in str(err.value)


def test_benchmark_held_out_paraphrases_come_from_the_record(imported, exported):
    record = load_generator(exported["gen"]).descriptions
    for task, (train, heldout) in imported["expect"].items():
        got = heldout_description(get_task(task), record)
        assert got == (heldout if heldout is not None else get_task(task).heldout_description())
        assert got not in train  # never a description the generator was trained on



def test_benchmark_from_description_conditions_on_the_recorded_paraphrases(imported, exported, tmp_path):
    from weightdiff.evaluate.benchmark import run_benchmark

    r = run_benchmark("adapt-lora", exported["gen"], imported["zoo"], tmp_path / "bench", num=1, steps=1,
                      from_description=True, sgd_tasks=0, hypernet_steps=2, select_per_class=None, progress=False)
    want = {t: held if held is not None else get_task(t).heldout_description()
            for t, (_, held) in imported["expect"].items()}
    assert r["settings"]["descriptions"] == want
