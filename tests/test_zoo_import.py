"""`weightdiff zoo import`: zoos of existing PEFT adapter folders and safetensors state dicts.

The LoRA sources are adapters of the tiny zoo fixture loaded with ``PeftModel.from_pretrained``
and written again with PEFT's own ``save_pretrained``; the full sources are state dicts of the
``digits`` network. Imports are checked against their sources (same tensors, same PEFT forward),
against ``zoo verify``/``zoo info`` and the datamodule, each bad row against its one-line error,
and a killed import against its resumption.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from weightdiff.cli import main as cli_main
from weightdiff.errors import ManifestError
from weightdiff.io import load_weights, save_weights, sha256_file
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo, import_zoo
from weightdiff.zoo.training import evaluate_module

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_HELDOUT = 4, 1


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def peft_sources(tiny_lora_zoo, tmp_path_factory) -> dict:
    """PEFT adapter folders written by ``save_pretrained``, the base network, and their manifest rows."""
    from peft import PeftModel

    zoo = Zoo.open(tiny_lora_zoo)
    out = tmp_path_factory.mktemp("peft_sources")
    shutil.copy(zoo.base_file(), out / "base.safetensors")
    picked = zoo.rows("train")[:N_TRAIN] + zoo.rows("heldout")[:N_HELDOUT]
    rows = []
    for i, built in enumerate(picked):
        model = PeftModel.from_pretrained(zoo.base_module(), str(zoo.entry_dir(built["id"])))
        model.save_pretrained(str(out / f"adapter{i}"))
        row = {"path": f"adapter{i}", "task": built["task"], "split": built["split"],
               "descriptions": [f"my own words for {built['task']}", "a second phrasing"]}
        if built["split"] == "heldout":
            row["heldout_kind"] = built["heldout_kind"]
        if i % 2 == 0:  # half the rows bring their metrics; the others' are measured on import
            row["metrics"] = {"test_acc": 0.5, "train_acc": 0.25, "val_acc": 0.75, "loss": 1.5}
        rows.append(row)
    return {"dir": out, "base": out / "base.safetensors", "rows": rows, "built": picked, "zoo": zoo}


def _sources_copy(peft_sources, tmp_path: Path) -> tuple[Path, list[dict]]:
    """A private copy of the source folders (tests that damage one), and the manifest rows."""
    src = tmp_path / "src"
    shutil.copytree(peft_sources["dir"], src)
    return src, [dict(r) for r in peft_sources["rows"]]


@pytest.fixture(scope="module")
def imported_lora(peft_sources, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imported")
    manifest = _write_jsonl(peft_sources["dir"] / "adapters.jsonl", peft_sources["rows"])
    assert cli_main(["zoo", "import", str(manifest), "--base", str(peft_sources["base"]), "--root", str(root),
                     "--no-progress"]) == 0
    return root / "adapters"


# ------------------------------------------------------------------------------------ good imports
def test_imported_adapters_equal_their_sources_and_load_back_in_peft(peft_sources, imported_lora):
    from peft import PeftModel

    zoo = Zoo.open(imported_lora)
    assert zoo.kind == "lora" and zoo.family == "rotdigits"
    rows = {r["task"]: r for r in zoo.rows()}
    assert len(zoo.rows()) == N_TRAIN + N_HELDOUT
    x = get_task(peft_sources["built"][0]["task"]).data().x_test[:64]
    for i, (src, built) in enumerate(zip(peft_sources["rows"], peft_sources["built"])):
        row = rows[built["task"]]
        assert row["split"] == built["split"] and row.get("heldout_kind") == built.get("heldout_kind")
        assert row["descriptions"] == src["descriptions"]
        assert row["code"] == built["code"]  # the task's own code when the manifest gives none
        assert row["source_sha256"] == sha256_file(peft_sources["dir"] / f"adapter{i}" / "adapter_model.safetensors")
        source = load_weights(peft_sources["dir"] / f"adapter{i}" / "adapter_model.safetensors")
        stored = zoo.load(row["id"])
        assert stored.keys() == source.keys() and all(torch.equal(stored[k], source[k]) for k in source)
        theirs = PeftModel.from_pretrained(zoo.base_module(), str(peft_sources["dir"] / f"adapter{i}")).eval()
        ours = PeftModel.from_pretrained(zoo.base_module(), str(zoo.entry_dir(row["id"]))).eval()
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x))


def test_given_metrics_are_kept_and_missing_accuracies_are_measured(peft_sources, imported_lora):
    zoo = Zoo.open(imported_lora)
    rows = {r["task"]: r for r in zoo.rows()}
    for src, built in zip(peft_sources["rows"], peft_sources["built"]):
        metrics = rows[built["task"]]["metrics"]
        if "metrics" in src:
            assert metrics == src["metrics"]
            continue
        # measured with the zoo's batched forward, recorded at build time through PEFT's: equal up to
        # an argmax flipped by float rounding, i.e. one example of the split
        data = get_task(built["task"]).data()
        for split in ("train", "val", "test"):
            n = data.split(split)[1].numel()
            assert abs(metrics[f"{split}_acc"] - built["metrics"][f"{split}_acc"]) <= 1 / n + 1e-12


def test_imported_zoo_verifies_and_reports_its_manifest(peft_sources, imported_lora, capsys):
    meta = json.loads((imported_lora / "zoo.json").read_text())
    manifest = peft_sources["dir"] / "adapters.jsonl"
    assert meta["imported"]["manifest"] == str(manifest.resolve())
    assert meta["imported"]["manifest_sha256"] == sha256_file(manifest)
    assert meta["imported"]["base"]["sha256"] == sha256_file(peft_sources["base"])
    assert Zoo.open(imported_lora).verify() == []
    capsys.readouterr()
    assert cli_main(["zoo", "verify", str(imported_lora)]) == 0
    assert f"{N_TRAIN + N_HELDOUT} entries verified" in capsys.readouterr().out
    assert cli_main(["zoo", "info", str(imported_lora)]) == 0
    info = capsys.readouterr().out
    assert f"{N_TRAIN + N_HELDOUT} of {N_TRAIN + N_HELDOUT} planned entries" in info
    assert f"split heldout: {N_HELDOUT} entries" in info
    row = next(r for r in Zoo.open(imported_lora).rows("train") if "loss" not in r["metrics"])  # measured ones
    assert cli_main(["evaluate", "--task", row["task"], "--weights", str(imported_lora / "entries" / row["id"])]) == 0
    assert f"{row['id']}  {row['metrics']['test_acc']:.4f}" in capsys.readouterr().out


def test_verify_finds_a_swapped_entry_of_an_imported_zoo(imported_lora, tmp_path):
    copy = tmp_path / "zoo"
    shutil.copytree(imported_lora, copy)
    a, b = sorted(p for p in (copy / "entries").iterdir())[:2]
    shutil.copy(a / "adapter_model.safetensors", b / "adapter_model.safetensors")
    problems = Zoo.open(copy).verify()
    assert [eid for eid, _ in problems] == [b.name] and "sha256" in problems[0][1]


def test_imported_zoo_feeds_the_datamodule_and_its_target(imported_lora):
    from weightdiff.training.datamodule import ZooDataModule

    dm = ZooDataModule(zoo=str(imported_lora), token_size=32, condition="code", functional_batch=0)
    dm.setup("fit")
    assert len(dm._train) == N_TRAIN and len(dm._val) == N_HELDOUT
    row = dm.train_rows[1]
    assert torch.equal(dm._train.tokens[1], dm.tokenizer.encode(dm.prepared(row))[0])
    zoo = Zoo.open(imported_lora)
    data = get_task(row["task"]).data()
    acc = zoo.target().accuracy({k: v[None] for k, v in zoo.load(row["id"]).items()}, data.x_test, data.y_test)
    assert float(acc[0]) == row["metrics"]["test_acc"]


def test_state_dicts_of_a_full_family_import_from_csv(tmp_path, capsys):
    nets = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = get_task("digits").build_network()
        save_weights(tmp_path / f"net{seed}.safetensors", net.state_dict())
        nets.append(net)
    (tmp_path / "nets.csv").write_text(
        "path,task,split,descriptions,metrics.test_acc,seed\n"
        "net0.safetensors,digits,train,plain digits | eight by eight digits,0.5,\n"
        "net1.safetensors,digits,train,plain digits,,\n"
        f"{tmp_path / 'net2.safetensors'},digits,heldout,held-out digits,,7\n")
    root = tmp_path / "zoos"
    assert cli_main(["zoo", "import", str(tmp_path / "nets.csv"), "--root", str(root), "--no-progress"]) == 0
    zoo = Zoo.open(root / "nets")
    assert zoo.kind == "full" and zoo.verify() == []
    rows = zoo.rows()
    assert [r["id"] for r in rows] == ["digits-s000-c0000", "digits-s001-c0000", "digits-s007-c0000"]
    assert rows[0]["descriptions"] == ["plain digits", "eight by eight digits"]
    assert rows[0]["metrics"]["test_acc"] == 0.5
    assert rows[2]["split"] == "heldout" and rows[2]["heldout_kind"] == "far"
    data = get_task("digits").data()
    for row, net in zip(rows, nets):
        stored = zoo.load(row["id"])
        assert all(torch.equal(stored[k], v) for k, v in net.state_dict().items())
        measured = evaluate_module(net, data)
        for name in ("train_acc", "val_acc") + (() if row is rows[0] else ("test_acc",)):
            n = data.split(name.removesuffix("_acc"))[1].numel()
            assert abs(row["metrics"][name] - measured[name]) <= 1 / n + 1e-12  # batched vs module forward


# ---------------------------------------------------------------------------------------- bad rows
def _pickle_adapter(src: Path, rows: list[dict]) -> str:
    weights = src / "adapter2" / "adapter_model.safetensors"
    torch.save({k: v.clone() for k, v in load_weights(weights).items()}, src / "adapter2" / "adapter_model.bin")
    weights.unlink()
    return "pickle adapter_model.bin"


def _pickle_named_safetensors(src: Path, rows: list[dict]) -> str:
    weights = src / "adapter2" / "adapter_model.safetensors"
    tensors = {k: v.clone() for k, v in load_weights(weights).items()}  # not views of the file replaced next
    weights.unlink()
    torch.save(tensors, weights)
    return "pickle"


def _shapes(src: Path, rows: list[dict]) -> str:
    weights = src / "adapter2" / "adapter_model.safetensors"
    save_weights(weights, {k: v[:4] if "lora_A" in k else v for k, v in load_weights(weights).items()})
    return "has shape (4,"


def _config(src: Path, rows: list[dict]) -> str:
    cfg_file = src / "adapter2" / "adapter_config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), use_rslora=True)))
    return "'use_rslora' = True, line 1's adapter has False"


def _edit(change: dict, needle: str):
    def apply(src: Path, rows: list[dict]) -> str:
        rows[2].update(change)
        for key, value in change.items():
            if value is None:
                del rows[2][key]
        return needle
    return apply


def _duplicate_path(src: Path, rows: list[dict]) -> str:
    rows[2]["path"] = rows[0]["path"]
    return "the same checkpoint as line 1 (duplicate row)"


def _duplicate_contents(src: Path, rows: list[dict]) -> str:
    shutil.copytree(src / "adapter0", src / "again")
    rows[2]["path"] = "again"
    return "the same contents"


BAD_ROWS = {
    "missing field": ("split", _edit({"split": None}, "is missing")),
    "bad split": ("split", _edit({"split": "validation"}, "expected one of ('train', 'heldout')")),
    "unknown task": ("task", _edit({"task": "cifar10"}, "unknown family 'cifar10'")),
    "task of another family": ("task", _edit({"task": "digits"}, "family 'digits'")),
    "unknown field": ("descripton", _edit({"descripton": "typo"}, "is unknown")),
    "no descriptions": ("descriptions", _edit({"descriptions": []}, "non-empty")),
    "code of the wrong length": ("code", _edit({"code": [1.0]}, "list of 3 finite numbers")),
    "metric not a number": ("metrics.test_acc", _edit({"metrics": {"test_acc": "high"}}, "finite number")),
    "held-out kind on a training row": ("heldout_kind", _edit({"heldout_kind": "near"}, "only for split")),
    "missing file": ("path", _edit({"path": "nowhere"}, "not found")),
    "pickle adapter": ("path", _pickle_adapter),
    "pickle named .safetensors": ("path", _pickle_named_safetensors),
    "mismatched shapes": ("path", _shapes),
    "disagreeing adapter config": ("path", _config),
    "duplicate path": ("path", _duplicate_path),
    "duplicate contents": ("path", _duplicate_contents),
    "duplicate entry id": ("seed", _edit({"task": "rotdigits:angle=40,flip=0", "seed": 0}, "duplicate row")),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_is_one_line_naming_line_and_field_and_nothing_is_written(case, peft_sources, tmp_path,
                                                                            capsys):
    src, rows = _sources_copy(peft_sources, tmp_path)
    field, damage = BAD_ROWS[case]
    needle = damage(src, rows)
    if case == "duplicate entry id":
        rows[1]["task"], rows[1]["seed"] = "rotdigits:angle=40,flip=0", 0
    manifest = _write_jsonl(src / "m.jsonl", rows)
    root = tmp_path / "zoos"
    capsys.readouterr()
    assert cli_main(["zoo", "import", str(manifest), "--base", str(src / "base.safetensors"),
                     "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("weightdiff: error: "), err
    assert f"{manifest}: line 3: field '{field}'" in err and needle in err, err
    assert not root.exists()


def test_pickle_state_dict_and_missing_base_are_refused(peft_sources, tmp_path):
    torch.save(get_task("digits").build_network().state_dict(), tmp_path / "net.pt")
    manifest = _write_jsonl(tmp_path / "m.jsonl", [{"path": "net.pt", "task": "digits", "split": "train",
                                                    "descriptions": "digits"}])
    with pytest.raises(ManifestError, match=r"line 1: field 'path' .* is a pickle file"):
        import_zoo(manifest, root=tmp_path / "zoos")
    lora = _write_jsonl(peft_sources["dir"] / "no-base.jsonl", peft_sources["rows"])
    with pytest.raises(ManifestError, match="LoRA family: give its base network with --base"):
        import_zoo(lora, root=tmp_path / "zoos")
    assert not (tmp_path / "zoos").exists()


def test_a_base_of_another_network_is_refused_naming_the_key(peft_sources, tmp_path):
    save_weights(tmp_path / "wrong.safetensors", get_task("mnist1d").build_network().state_dict())
    manifest = _write_jsonl(peft_sources["dir"] / "base-check.jsonl", peft_sources["rows"])
    with pytest.raises(Exception, match=r"base weights .*wrong.safetensors: (missing|unexpected) key"):
        import_zoo(manifest, tmp_path / "wrong.safetensors", root=tmp_path / "zoos")
    assert not (tmp_path / "zoos").exists()


# ------------------------------------------------------------------------------------------ resume
KILL_AFTER = 2
_KILLER = textwrap.dedent("""
    import os, signal, sys
    import weightdiff.zoo.importer as importer
    real, calls = importer.write_entry, []
    def write_entry(*args, **kwargs):
        if len(calls) == {k}:
            os.kill(os.getpid(), signal.SIGKILL)
        calls.append(1)
        return real(*args, **kwargs)
    importer.write_entry = write_entry
    importer.import_zoo(sys.argv[1], sys.argv[2], root=sys.argv[3], progress=False)
""")


def test_a_killed_import_resumes_and_skips_the_entries_already_imported(peft_sources, tmp_path):
    src, rows = _sources_copy(peft_sources, tmp_path)
    manifest = _write_jsonl(src / "m.jsonl", rows)
    root = tmp_path / "zoos"
    proc = subprocess.run([sys.executable, "-c", _KILLER.replace("{k}", str(KILL_AFTER)), str(manifest),
                           str(src / "base.safetensors"), str(root)], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == -9, proc.stderr
    zoo_dir = root / "m"
    done = sorted(p.name for p in (zoo_dir / "entries").iterdir() if not p.name.startswith("."))
    assert len(done) == KILL_AFTER
    problems = Zoo.open(zoo_dir).verify()
    assert len(problems) == len(rows) - KILL_AFTER and all("missing" in why for _, why in problems)
    stamps = {name: (zoo_dir / "entries" / name / "entry.json").stat().st_mtime_ns for name in done}

    report = import_zoo(manifest, src / "base.safetensors", root=root, progress=False)
    assert (report.skipped, report.written) == (KILL_AFTER, len(rows) - KILL_AFTER)
    assert {n: (zoo_dir / "entries" / n / "entry.json").stat().st_mtime_ns for n in done} == stamps
    assert Zoo.open(zoo_dir).verify() == []

    # a source changed since: its entry is imported again, the others are kept
    changed = src / rows[0]["path"] / "adapter_model.safetensors"
    save_weights(changed, {k: 2 * v for k, v in load_weights(changed).items()})
    report = import_zoo(manifest, src / "base.safetensors", root=root, progress=False)
    assert (report.skipped, report.written) == (len(rows) - 1, 1)
    zoo = Zoo.open(zoo_dir)
    assert zoo.verify() == []
    entry = next(r for r in zoo.rows() if r["task"] == rows[0]["task"])
    assert entry["source_sha256"] == sha256_file(changed)

    # so are descriptions edited in the manifest: the entry takes the new ones
    rows[1] = {**rows[1], "descriptions": ["digits as the manifest now describes them"]}
    manifest = _write_jsonl(src / "m.jsonl", rows)
    report = import_zoo(manifest, src / "base.safetensors", root=root, progress=False)
    assert (report.skipped, report.written) == (len(rows) - 1, 1)
    new = [r for r in Zoo.open(zoo_dir).rows() if r["descriptions"] == rows[1]["descriptions"]]
    assert [r["task"] for r in new] == [rows[1]["task"]]


def test_an_import_never_mixes_into_a_built_zoo_or_another_base(tiny_lora_zoo, peft_sources, imported_lora,
                                                               tmp_path):
    manifest = _write_jsonl(peft_sources["dir"] / "again.jsonl", peft_sources["rows"])
    with pytest.raises(ManifestError, match="built by `weightdiff zoo build`"):
        import_zoo(manifest, peft_sources["base"], name=tiny_lora_zoo.name, root=tiny_lora_zoo.parent)
    other = tmp_path / "base.safetensors"
    base = load_weights(peft_sources["base"])
    save_weights(other, {k: v + 1 for k, v in base.items()})
    with pytest.raises(ManifestError, match="field 'imported.base'"):
        import_zoo(manifest, other, name=imported_lora.name, root=imported_lora.parent)
    assert Zoo.open(imported_lora).verify() == []
