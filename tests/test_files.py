"""Files: every output honours the umask, unwritable or full locations are one error line naming the
path with nothing left half-written, malformed or huge zoo files are refused without crashing or
hashing them, and concurrent publishes of one folder all succeed.
"""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import weightdiff.io as wio
from tests.conftest import REPO
from weightdiff.cli import main
from weightdiff.errors import WeightDiffError, WeightFileError
from weightdiff.evaluate.report import save_predictions
from weightdiff.models.generator import load_generator
from weightdiff.sampling import SamplerSettings, make_condition, sample
from weightdiff.training.export import export_checkpoint
from weightdiff.zoo import Zoo, load_recipe, run_build
from weightdiff.zoo.manifest import ENTRIES_DIR, ENTRY_FILE, ZOO_FILE, entry_problem

TINY_RECIPE = REPO / "configs/zoo/tiny-rotdigits-lora.yaml"
TASK = "rotdigits:angle=-15"  # a training task of the tiny zoo
ENTRY = "rotdigits_angle-15_flip0-s000-c0030"
OTHER_ENTRY = "rotdigits_angle0_flip0-s000-c0030"
THIRD_ENTRY = "rotdigits_angle60_flip0-s000-c0030"
DEEP = 100_000  # JSON nesting far beyond any parser's recursion limit
HUGE = 20 * 2**30  # a sparse file: costs no disk
PUBLISHERS, PUBLISHES = 4, 200  # processes and publishes each in the race test


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture
def zoo_copy(tiny_lora_zoo, tmp_path) -> Path:
    """A private copy of the tiny zoo (same folder name, so the tiny recipe builds into it)."""
    return Path(shutil.copytree(tiny_lora_zoo, tmp_path / "zoos" / tiny_lora_zoo.name, symlinks=True))


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(paths) -> dict[str, str]:
    return {str(p): oct(p.stat().st_mode & 0o777) for p in paths}


def _expect_modes(root: Path, mask: int) -> None:
    """``root`` and everything under it have the modes ``open``/``mkdir`` give under ``mask``."""
    paths = [root, *root.rglob("*")]
    assert paths[1:] or root.is_file()
    want = {str(p): oct((0o777 if p.is_dir() else 0o666) & ~mask) for p in paths}
    assert _modes(paths) == want


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def _one_error_line(err: str, *needles: str) -> None:
    """stderr ends with one ``weightdiff: error:`` line holding ``needles`` (progress lines may precede it)."""
    errors = [line for line in err.splitlines() if line.startswith("weightdiff: error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def _full_disk_under(monkeypatch, folder: Path, when=lambda dst: True) -> None:
    """Every rename into ``folder`` (where ``when(dst)``) fails as on a full disk."""
    real = os.replace

    def replace(src, dst, *args, **kwargs):
        if folder in Path(dst).parents and when(Path(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)


# ------------------------------------------------------------------------------------ umask
@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_atomic_writes_honour_the_umask(umask, tmp_path):
    wio.save_weights(tmp_path / "w.safetensors", {"a": torch.zeros(3)})
    wio.write_json(tmp_path / "row.json", {"a": 1})
    with wio.atomic_path(tmp_path / "folder", directory=True) as tmp:
        (tmp / "sub").mkdir()
        wio.write_json(tmp / "sub" / "x.json", [])
    save_predictions(tmp_path / "benchmark", "seen", TASK, "generated", ["s0"], torch.zeros(1, 3, dtype=torch.long),
                     torch.zeros(3, dtype=torch.long))
    for path in ("w.safetensors", "row.json", "folder", "benchmark"):
        _expect_modes(tmp_path / path, umask)


@pytest.mark.parametrize("umask", [0o022, 0o027], indirect=True)
def test_zoo_build_export_and_sample_honour_the_umask(umask, zoo_copy, tiny_run, tiny_generator, tmp_path):
    (zoo_copy / ZOO_FILE).unlink()
    shutil.rmtree(zoo_copy / ENTRIES_DIR / ENTRY)
    assert run_build(load_recipe(TINY_RECIPE), zoo_copy.parent, progress=False).entries_written == 1
    _expect_modes(zoo_copy / ZOO_FILE, umask)
    _expect_modes(zoo_copy / ENTRIES_DIR / ENTRY, umask)

    ckpt = next(tiny_run.glob("**/checkpoints/last.ckpt"))
    _expect_modes(export_checkpoint(ckpt, tmp_path / "generator"), umask)

    gen = load_generator(tiny_generator)
    settings = SamplerSettings(steps=2, sampler="ddim", seed=0)
    sample(gen, make_condition(gen, task=TASK), 2, settings, tmp_path / "samples", use_cache=False, progress=False)
    _expect_modes(tmp_path / "samples", umask)


# ------------------------------------------------------------------- unwritable, full disks
def _not_reached(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} started before the output location was checked")
    return fail


@pytest.mark.parametrize("command", ["zoo build", "export", "benchmark", "diagnose"])
def test_an_output_under_a_regular_file_is_one_line_naming_it(command, tiny_lora_zoo, tiny_generator, tmp_path,
                                                               capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "out"
    argv = {
        "zoo build": ["zoo", "build", "--config", str(TINY_RECIPE), "--root", str(out), "--no-progress"],
        "export": ["export", "--ckpt", str(tmp_path / "last.ckpt"), "--out", str(out)],
        "benchmark": ["benchmark", "--suite", "adapt-lora", "--zoo", str(tiny_lora_zoo), "--out", str(out)],
        "diagnose": ["diagnose", "--model", str(tiny_generator), "--zoo", str(tiny_lora_zoo), "--out", str(out)],
    }[command]
    monkeypatch.setattr("weightdiff.zoo.build._prepare_networks", _not_reached("zoo build"))
    monkeypatch.setattr("weightdiff.training.export.read_lightning_checkpoint", _not_reached("export"))
    monkeypatch.setattr("weightdiff.evaluate.benchmark.run_benchmark", _not_reached("benchmark"))
    monkeypatch.setattr("weightdiff.models.generator.load_generator", _not_reached("diagnose"))
    capsys.readouterr()
    assert main(argv) == 2
    _one_error_line(capsys.readouterr().err, str(out), "not a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_a_disk_filling_up_during_export_is_one_line_and_leaves_nothing(tiny_run, tmp_path, capsys, monkeypatch):
    ckpt = next(tiny_run.glob("**/checkpoints/last.ckpt"))
    out = tmp_path / "exports" / "generator"
    out.parent.mkdir()
    _full_disk_under(monkeypatch, out.parent)
    capsys.readouterr()
    assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 2
    _one_error_line(capsys.readouterr().err, str(out), os.strerror(errno.ENOSPC))
    assert list(out.parent.iterdir()) == []


def test_a_disk_filling_up_during_a_zoo_build_is_one_line_and_leaves_no_half_entry(zoo_copy, capsys, monkeypatch):
    shutil.rmtree(zoo_copy / ENTRIES_DIR / ENTRY)
    entries = zoo_copy / ENTRIES_DIR
    # the base and zoo.json exist: the disk fills up after training, when the entry is written
    _full_disk_under(monkeypatch, entries, when=lambda dst: dst.name == ENTRY_FILE)
    capsys.readouterr()
    code = main(["zoo", "build", "--config", str(TINY_RECIPE), "--root", str(zoo_copy.parent), "--no-progress"])
    assert code == 2
    _one_error_line(capsys.readouterr().err, str(entries / ENTRY), os.strerror(errno.ENOSPC))
    assert not (entries / ENTRY).exists() and _hidden(entries) == []


def test_safetensors_reporting_a_full_disk_becomes_one_output_error(tmp_path, monkeypatch):
    # what safetensors raises when the disk fills up (an I/O error inside its Rust writer)
    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(wio, "save_file", full)
    dest = tmp_path / "w.safetensors"
    with pytest.raises(WeightDiffError, match=f"cannot write {re.escape(str(dest))}: No space left on device"):
        wio.save_weights(dest, {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_a_write_under_a_regular_file_is_an_output_error_naming_both(tmp_path):
    (tmp_path / "f").write_text("")
    file = tmp_path / "f"
    with pytest.raises(WeightDiffError, match=f"cannot write {re.escape(str(file / 'x.json'))}: Not a directory "
                                              f"\\({re.escape(str(file))}\\)"):
        wio.write_json(file / "x.json", {})
    with pytest.raises(WeightDiffError, match="Not a directory"), wio.atomic_path(file / "sub" / "d", directory=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


# ------------------------------------------------------------------ malformed and huge JSON
def _deep(path: Path) -> None:
    path.write_text("[" * DEEP + "]" * DEEP)


def test_read_json_refuses_deeply_nested_json_naming_the_file(tmp_path):
    deep = tmp_path / "deep.json"
    _deep(deep)
    with pytest.raises(WeightFileError, match=f"manifest row {re.escape(str(deep))} is nested too deeply"):
        wio.read_json(deep, "manifest row")


def test_read_json_refuses_a_huge_file_before_parsing_it(tmp_path, monkeypatch):
    huge = tmp_path / "huge.json"
    huge.write_bytes(b'"' + b"a" * (wio.MAX_JSON_BYTES - 1) + b'"')  # valid JSON, one byte over the cap
    message = f"{re.escape(str(huge))} is larger than {wio.MAX_JSON_BYTES} bytes"
    with monkeypatch.context() as m, pytest.raises(WeightFileError, match=message):
        m.setattr(json, "loads", _not_reached("parsing"))
        wio.read_json(huge)


@pytest.mark.parametrize("command", ["info", "verify", "build"])
def test_a_deeply_nested_zoo_json_is_one_line_naming_it(command, zoo_copy, capsys):
    _deep(zoo_copy / ZOO_FILE)
    argv = {"info": [str(zoo_copy)], "verify": [str(zoo_copy)],
            "build": ["--config", str(TINY_RECIPE), "--root", str(zoo_copy.parent), "--no-progress"]}[command]
    capsys.readouterr()
    assert main(["zoo", command, *argv]) == 2
    _one_error_line(capsys.readouterr().err, str(zoo_copy / ZOO_FILE), "nested too deeply")


def test_a_deeply_nested_entry_json_is_a_verify_problem_and_rebuilt(zoo_copy):
    row_file = zoo_copy / ENTRIES_DIR / ENTRY / ENTRY_FILE
    _deep(row_file)
    problems = dict(Zoo.open(zoo_copy).verify())
    assert list(problems) == [ENTRY] and str(row_file) in problems[ENTRY] and "nested too deeply" in problems[ENTRY]
    report = run_build(load_recipe(TINY_RECIPE), zoo_copy.parent, progress=False)
    assert report.entries_written == 1
    assert Zoo.open(zoo_copy).verify() == [] and _hidden(zoo_copy / ENTRIES_DIR) == []


# ---------------------------------------------------------------- huge and foreign weights
def _sparse_safetensors(path: Path, params: int) -> None:
    """A valid safetensors file of one float32 tensor of ``params`` zeros (sparse: costs no disk)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [params], "data_offsets": [0, 4 * params]}}).encode()
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + 4 * params)


def test_verify_and_build_refuse_huge_or_outside_weight_files_without_reading_them(zoo_copy, tmp_path,
                                                                                   monkeypatch):
    entries = zoo_copy / ENTRIES_DIR
    name = json.loads((entries / ENTRY / ENTRY_FILE).read_text())["file"]
    # 1. a link out of the zoo, to a disk image
    outside = tmp_path / "elsewhere" / "disk.img"
    outside.parent.mkdir()
    with open(outside, "wb") as fh:
        fh.truncate(HUGE)
    (entries / ENTRY / name).unlink()
    (entries / ENTRY / name).symlink_to(outside)
    # 2. the entry's own file, grown to 20 GB
    with open(entries / OTHER_ENTRY / name, "r+b") as fh:
        fh.truncate(HUGE)
    # 3. a link inside the zoo, to a valid 20 GB safetensors file of another network
    other_model = zoo_copy / "other-model.safetensors"
    _sparse_safetensors(other_model, HUGE // 4)
    (entries / THIRD_ENTRY / name).unlink()
    (entries / THIRD_ENTRY / name).symlink_to(other_model)

    real_sha = wio.sha256_file

    def sha256_file(path, *args, **kwargs):
        assert Path(path).stat().st_size < HUGE, f"hashed {path} ({Path(path).stat().st_size} bytes)"
        return real_sha(path, *args, **kwargs)

    monkeypatch.setattr("weightdiff.zoo.manifest.sha256_file", sha256_file)
    problems = dict(Zoo.open(zoo_copy).verify())
    assert sorted(problems) == sorted([ENTRY, OTHER_ENTRY, THIRD_ENTRY])
    assert "outside the zoo" in problems[ENTRY] and str(outside) in problems[ENTRY]
    assert f"{HUGE} bytes, its safetensors header declares" in problems[OTHER_ENTRY]
    assert f"declares {HUGE} bytes of tensors" in problems[THIRD_ENTRY]

    report = run_build(load_recipe(TINY_RECIPE), zoo_copy.parent, progress=False)
    assert report.entries_written == 3
    assert [entry_problem(entries / e) for e in (ENTRY, OTHER_ENTRY, THIRD_ENTRY)] == [None] * 3
    assert not (entries / ENTRY / name).is_symlink() and outside.stat().st_size == HUGE  # the link went, not its target
    assert other_model.stat().st_size > HUGE and _hidden(entries) == []


# ------------------------------------------------------------------------ concurrent publish
def _publish_many(dest: Path, token: str, count: int, start) -> None:
    """Publish ``dest`` ``count`` times once every process is ready (an exception ends the process
    with exit code 1)."""
    start.wait()
    for i in range(count):
        with wio.atomic_path(dest, directory=True) as tmp:
            (tmp / "a").write_text(f"{token}-{i}")
            (tmp / "b").write_text(f"{token}-{i}")


@pytest.mark.parametrize("swap", ["exchange", "rename"])
def test_concurrent_publishes_of_one_folder_all_succeed(swap, tmp_path, monkeypatch):
    if swap == "rename":  # systems or file systems without an atomic exchange of two names
        monkeypatch.setattr(wio, "_exchange", lambda a, b: False, raising=False)
    dest = tmp_path / "published"
    ctx = mp.get_context("fork")  # the children only write files; fork keeps the patch above
    start = ctx.Barrier(PUBLISHERS)
    tokens = [f"p{k}" for k in range(PUBLISHERS)]
    procs = [ctx.Process(target=_publish_many, args=(dest, token, PUBLISHES, start)) for token in tokens]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * PUBLISHERS
    a, b = (dest / "a").read_text(), (dest / "b").read_text()
    assert a == b and a in [f"{token}-{PUBLISHES - 1}" for token in tokens]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["published"]
