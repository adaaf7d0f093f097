"""What `weightdiff evaluate` takes: checkpoints of the task's family and base, float32, and its options.

Samples and zoo entries record their task family, kind and base network, and evaluation refuses
a task of another family, a base other than the recorded one, an exported generator, weights of
another dtype, ``--chunk`` below 1 and a ``--json`` location that cannot be written, each with one
``weightdiff: error:`` line naming the file and exit status 2.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from weightdiff.cli import main
from weightdiff.errors import WeightFileError
from weightdiff.io import load_weights, save_weights, sha256_file

TASK = "rotdigits:angle=-15"  # a training task of the tiny zoo: its text embedding is cached by the fit
ENTRY = "rotdigits_angle-15_flip0-s000-c0030"


def run_cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    """``weightdiff.cli.main(argv)``: (exit status, stdout, the ``weightdiff: error:`` lines of stderr)."""
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, [line for line in captured.err.splitlines() if line.startswith("weightdiff: error:")]


def assert_one_error_line(err: list[str], *needles: str) -> None:
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], f"{needle!r} not in {err[0]!r}"


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def rewrite(path: Path, drop: tuple[str, ...] = (), **fields) -> None:
    data = {k: v for k, v in read(path).items() if k not in drop}
    path.write_text(json.dumps({**data, **fields}))


@pytest.fixture(scope="module")
def samples(tiny_generator, tmp_path_factory) -> Path:
    """Two samples of the tiny generator for TASK (a folder of sample folders)."""
    from weightdiff.models.generator import load_generator
    from weightdiff.sampling import SamplerSettings, make_condition, sample

    gen = load_generator(tiny_generator)
    out = tmp_path_factory.mktemp("samples") / "out"
    sample(gen, make_condition(gen, task=TASK), 2, SamplerSettings(steps=2), out, use_cache=False, progress=False)
    return out


@pytest.fixture
def zoo(tiny_lora_zoo, tmp_path) -> Path:
    """A private copy of the tiny LoRA zoo (entries may be changed)."""
    return Path(shutil.copytree(tiny_lora_zoo, tmp_path / "zoo"))


@pytest.fixture
def sample_copy(samples, tmp_path) -> Path:
    """A private copy of one sample folder."""
    return Path(shutil.copytree(samples / "sample_0000", tmp_path / "sample"))


# ------------------------------------------------------------------------------- provenance
def test_samples_and_zoo_entries_record_family_kind_and_base(samples, tiny_generator, tiny_lora_zoo):
    base_sha = sha256_file(tiny_generator / "base" / "model.safetensors")
    info = read(samples / "sample_0000" / "sample.json")
    assert (info["family"], info["kind"], info["base_sha256"]) == ("rotdigits", "lora", base_sha)
    zoo_base = sha256_file(tiny_lora_zoo / "base" / "model.safetensors")
    row = read(tiny_lora_zoo / "entries" / ENTRY / "entry.json")
    assert (row["family"], row["kind"], row["base_sha256"]) == ("rotdigits", "lora", zoo_base)
    assert base_sha == zoo_base  # the generator copied the zoo's base byte for byte


@pytest.mark.parametrize("old", [False, True], ids=["recorded", "inferred"])
def test_evaluate_refuses_samples_of_another_family(capsys, sample_copy, old):
    if old:  # a sample written before family/base_sha256 were recorded: inferred from its condition
        rewrite(sample_copy / "sample.json", drop=("family", "base_sha256"))
    code, _, err = run_cli(capsys, "evaluate", "--task", "digits", "--weights", str(sample_copy))
    assert code == 2
    assert_one_error_line(err, str(sample_copy), "these are rotdigits LoRA samples", "with a rotdigits task",
                          "not 'digits'")
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(sample_copy))
    assert (code, err) == (0, []) and "1 lora checkpoints" in out


@pytest.mark.parametrize("old", [False, True], ids=["recorded", "inferred"])
def test_evaluate_refuses_zoo_entries_of_another_family(capsys, zoo, old):
    entry = zoo / "entries" / ENTRY
    if old:  # an entry of a zoo built before family/kind were recorded: inferred from its task
        rewrite(entry / "entry.json", drop=("family", "kind"))
    code, _, err = run_cli(capsys, "evaluate", "--task", "mnist1d", "--weights", str(entry))
    assert code == 2
    assert_one_error_line(err, str(entry), "these are rotdigits LoRA zoo entries", "with a rotdigits task")
    code, _, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(entry))
    assert (code, err) == (0, [])


def test_evaluate_refuses_a_base_network_other_than_the_recorded_one(capsys, zoo, samples, tmp_path):
    base = load_weights(zoo / "base" / "model.safetensors")
    other = tmp_path / "other-base" / "model.safetensors"
    save_weights(other, {k: v + 1e-3 if k == "fc1.weight" else v for k, v in base.items()})
    for weights in (zoo / "entries" / ENTRY, samples / "sample_0000"):
        code, _, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(weights), "--base", str(other))
        assert code == 2
        assert_one_error_line(err, str(other), sha256_file(other)[:12], "base_sha256",
                              sha256_file(zoo / "base" / "model.safetensors")[:12])
    # the right base, given explicitly, is accepted
    code, _, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(zoo / "entries" / ENTRY),
                           "--base", str(zoo / "base"))
    assert (code, err) == (0, [])


def test_evaluate_refuses_checkpoints_recording_different_bases(capsys, samples, tmp_path):
    mixed = Path(shutil.copytree(samples, tmp_path / "mixed"))
    rewrite(mixed / "sample_0001" / "sample.json", base_sha256="0" * 64)
    code, _, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(mixed))
    assert code == 2
    assert_one_error_line(err, str(mixed / "sample_0001" / "sample.json"), "000000000000", "one base network")


# ----------------------------------------------------------------------------- what is weights
def test_evaluate_refuses_an_exported_generator(capsys, tiny_generator):
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(tiny_generator))
    assert (code, out) == (2, "")
    assert_one_error_line(err, f"{tiny_generator} is an exported generator, not weights",
                          f"weightdiff sample --model {tiny_generator}")
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(tiny_generator / "base"))
    assert (code, out) == (2, "")
    assert_one_error_line(err, str(tiny_generator / "base"), f"the base network of the exported generator "
                                                              f"{tiny_generator}")


def test_evaluate_refuses_a_sample_without_its_weight_file(capsys, sample_copy):
    (sample_copy / "adapter_model.safetensors").unlink()
    code, _, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(sample_copy))
    assert code == 2
    assert_one_error_line(err, str(sample_copy), "holds sample.json but no weight file")


def test_evaluate_still_takes_bare_checkpoints_and_zoo_folders(capsys, zoo, tmp_path):
    """Folders without sample.json / entry.json and single .safetensors files keep working (here the
    zoo's base network, a whole network of the adapters' base architecture)."""
    bare = Path(shutil.copytree(zoo / "base", tmp_path / "bare"))
    (bare / "entry.json").unlink()
    for weights in (bare, bare / "model.safetensors", zoo / "base"):
        code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(weights))
        assert (code, err) == (0, []) and "1 full checkpoints" in out
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(zoo))
    entries = len([p for p in (zoo / "entries").iterdir() if not p.name.startswith(".")])
    assert (code, err) == (0, []) and f"{entries} lora checkpoints" in out


# ------------------------------------------------------------------------------------- dtypes
DTYPES = [torch.float16, torch.int8, torch.bool]


def test_zoo_verify_and_load_refuse_entries_of_another_dtype(zoo):
    from weightdiff.zoo import Zoo

    ids = sorted(p.name for p in (zoo / "entries").iterdir())[:len(DTYPES)]
    for entry_id, dtype in zip(ids, DTYPES):
        entry = zoo / "entries" / entry_id
        weights = entry / "adapter_model.safetensors"
        save_weights(weights, {k: v.to(dtype) for k, v in load_weights(weights).items()})
        size = {"file_size": weights.stat().st_size} if "file_size" in read(entry / "entry.json") else {}
        rewrite(entry / "entry.json", sha256=sha256_file(weights), **size)  # an intact file of another dtype
    opened = Zoo.open(zoo)
    problems = dict(opened.verify())
    for entry_id, dtype in zip(ids, DTYPES):
        name = str(dtype).removeprefix("torch.")
        assert f"has dtype {name}, expected float32" in problems[entry_id]
        assert str(zoo / "entries" / entry_id / "adapter_model.safetensors") in problems[entry_id]
        with pytest.raises(WeightFileError, match=f"has dtype {name}, expected float32"):
            opened.load(entry_id)  # what fit, benchmark and diagnose read entries with
    assert len(problems) == len(DTYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_evaluate_refuses_samples_of_another_dtype(capsys, sample_copy, dtype):
    weights = sample_copy / "adapter_model.safetensors"
    save_weights(weights, {k: v.to(dtype) for k, v in load_weights(weights).items()})
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(sample_copy))
    assert (code, out) == (2, "")
    assert_one_error_line(err, str(weights), f"has dtype {str(dtype).removeprefix('torch.')}, expected float32")


# ------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("chunk", ["0", "-1"])
def test_evaluate_chunk_below_one_is_a_user_error(capsys, zoo, chunk):
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(zoo / "entries" / ENTRY),
                             "--chunk", chunk)
    assert (code, out) == (2, "")
    assert_one_error_line(err, "--chunk must be at least 1", f"got {chunk}")


@pytest.fixture
def no_evaluation(monkeypatch):
    """Fail the test if the evaluation runs."""
    import weightdiff.evaluate.weights as weights_module

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated although --json cannot be written")

    monkeypatch.setattr(weights_module, "evaluate_weights", refuse)


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_evaluate_json_location_is_checked_before_evaluating(capsys, zoo, tmp_path, no_evaluation, where):
    (tmp_path / "file.txt").write_text("not a folder")
    (tmp_path / "folder").mkdir()
    target = tmp_path / "file.txt" / "eval.json" if where == "under_a_file" else tmp_path / "folder"
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(zoo / "entries" / ENTRY),
                             "--json", str(target))
    assert (code, out) == (2, "")
    assert_one_error_line(err, "--json", str(target))
    assert (tmp_path / "file.txt").read_text() == "not a folder" and list((tmp_path / "folder").iterdir()) == []


def test_evaluate_json_write_that_fails_on_a_full_disk_is_one_line(capsys, zoo, tmp_path, monkeypatch):
    """The location passes the check, then the disk fills during the evaluation."""
    import weightdiff.evaluate.weights as weights_module

    real = weights_module.evaluate_weights

    def replace_on_a_full_disk(src, dst, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))

    def evaluate_then_fill_the_disk(*args, **kwargs):
        result = real(*args, **kwargs)
        monkeypatch.setattr(os, "replace", replace_on_a_full_disk)
        return result

    monkeypatch.setattr(weights_module, "evaluate_weights", evaluate_then_fill_the_disk)
    target = tmp_path / "out" / "eval.json"
    code, out, err = run_cli(capsys, "evaluate", "--task", TASK, "--weights", str(zoo / "entries" / ENTRY),
                             "--json", str(target))
    monkeypatch.undo()
    assert code == 2
    assert_one_error_line(err, str(target), os.strerror(errno.ENOSPC))
    assert f"{ENTRY}  " in out and "best" in out  # the results are not lost
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []  # no half-written or temporary file
