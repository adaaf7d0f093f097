"""Task families from entry points, literal held-out tasks in recipes, benchmark suites in YAML files.

The plug-in tests install tiny packages the way pip would lay them out (a module beside a
``<name>-0.1.dist-info`` folder holding ``METADATA`` and ``entry_points.txt``) in a temporary
folder put on ``sys.path``; ``importlib.metadata`` then finds their entry points.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from weightdiff.errors import BenchmarkError, RecipeError, TaskFamilyError, TaskStringError
from weightdiff.tasks import base
from weightdiff.tasks import get_family, get_task, list_families, make_task
from weightdiff.tasks.suites import Suite, list_suites, load_suite

REPO = Path(__file__).resolve().parents[1]
BUILTIN = ["cordigits", "dataset", "dataset-net", "digits", "digits-mlp", "mnist1d", "rotdigits"]

TINYFAM = '''
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from weightdiff.tasks import Factor, Task, TaskData, register_family


@dataclass(frozen=True)
class TinyTask(Task):
    """Is input feature k positive? Four features, two classes."""

    family_name: ClassVar[str] = "tinyfam"
    factor_specs: ClassVar[tuple[Factor, ...]] = (Factor("k", "int", default=None, choices=(0, 1, 2, 3)),)
    NUM_CLASSES: ClassVar[int] = 2
    INPUT_SHAPE: ClassVar[tuple[int, ...]] = (4,)

    def descriptions(self) -> list[str]:
        return [f"Tell whether feature {self.factors['k']} is positive."]

    def data(self) -> TaskData:
        x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
        y = (x[:, self.factors["k"]] > 0).long()
        return TaskData(x[:10], y[:10], x[10:20], y[10:20], x[20:], y[20:])

    def build_network(self) -> nn.Module:
        return nn.Linear(4, 2)


@dataclass(frozen=True)
class TinyFnTask(TinyTask):
    family_name: ClassVar[str] = "tinyfn"


def register() -> None:
    register_family(TinyFnTask)


@dataclass(frozen=True)
class FakeDigits(TinyTask):
    family_name: ClassVar[str] = "digits"


NOT_A_TASK = 3


def register_nothing() -> None:
    pass


def register_and_fail() -> None:
    raise RuntimeError("no data\\nfolder configured")
'''


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the family registry, and the plug-in modules forgotten afterwards."""
    monkeypatch.setattr(base, "_FAMILIES", dict(base._FAMILIES))
    monkeypatch.setattr(base, "_LOADED_ENTRY_POINTS", set())
    monkeypatch.setattr(base, "_SCANNED_ALL", False)
    yield base._FAMILIES
    for name in [m for m in sys.modules if m.split(".")[0] in ("tinyfam", "tinyother")]:
        del sys.modules[name]


@pytest.fixture
def install(tmp_path, monkeypatch, registry):
    """``install(dist, {name: "module:attr"})``: a package ``dist`` declaring those entry points."""
    site = tmp_path / "site"
    (site / "tinyfam").mkdir(parents=True)
    (site / "tinyfam" / "__init__.py").write_text(TINYFAM)

    def _install(dist: str, entry_points: dict[str, str]) -> None:
        info = site / f"{dist}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
        lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[{base.ENTRY_POINT_GROUP}]\n{lines}")
        monkeypatch.syspath_prepend(str(site))  # also invalidates importlib's path caches

    return _install


# ------------------------------------------------------------------------------ plug-in families
def test_entry_point_family_builds_tasks_and_loads_lazily(install):
    install("tinyfam", {"tinyfam": "tinyfam:TinyTask"})
    get_task("digits")
    assert "tinyfam" not in sys.modules  # known families never import plug-ins

    task = get_task("tinyfam:k=2")
    assert type(task).__module__ == "tinyfam" and task.name == "tinyfam:k=2" and dict(task.factors) == {"k": 2}
    assert make_task("tinyfam", k=3) == get_task("tinyfam:k=3")
    assert get_family("tinyfam") is type(task)
    x, y = task.data().split("train")
    assert task.build_network()(x).shape == (10, 2) and set(y.tolist()) <= {0, 1}
    with pytest.raises(TaskStringError, match=r"factor 'k' = 7 is not allowed; expected one of 0, 1, 2, 3"):
        get_task("tinyfam:k=7")


def test_list_families_includes_class_and_function_entry_points(install):
    install("tinyfam", {"tinyfam": "tinyfam:TinyTask", "tinyfn": "tinyfam:register"})
    assert list_families() == sorted(BUILTIN + ["tinyfam", "tinyfn"])
    assert get_task("tinyfn:k=0").family == "tinyfn"


def test_unknown_family_error_lists_plugin_families(install):
    install("tinyfam", {"tinyfam": "tinyfam:TinyTask"})
    with pytest.raises(TaskStringError, match=r"unknown family 'nofam'; expected one of "
                                              r"\['cordigits', 'dataset', 'dataset-net', 'digits', 'digits-mlp', "
                                              r"'mnist1d', 'rotdigits', 'tinyfam'\]"):
        get_task("nofam:k=1")


@pytest.mark.parametrize("value, why", [
    ("tinyother.missing:Task", "cannot be loaded: ModuleNotFoundError: No module named 'tinyother'"),
    ("tinyfam:Absent", "cannot be loaded: AttributeError"),
    ("tinyfam:NOT_A_TASK", "names a int; expected a Task subclass or a function registering one"),
    ("tinyfam:TinyTask", "names tinyfam.TinyTask of family_name 'tinyfam'; expected the entry-point name 'broken'"),
    ("tinyfam:register_nothing", "registered no family named 'broken'"),
    ("tinyfam:register_and_fail", "failed while registering: RuntimeError: no data folder configured"),
])
def test_broken_plugin_is_one_error_naming_entry_point_and_package(install, value, why):
    install("tinybroken", {"broken": value})
    with pytest.raises(TaskFamilyError) as exc:
        get_task("broken:k=1")
    message = str(exc.value)
    assert message.startswith(f"task family plug-in 'broken = {value}' (entry point group 'weightdiff.tasks' of "
                              "package 'tinybroken 0.1')"), message
    assert why in message and "\n" not in message
    with pytest.raises(TaskFamilyError, match="tinybroken 0.1"):
        list_families()
    assert get_task("rotdigits:angle=40").name == "rotdigits:angle=40,flip=0"  # the others still work
    with pytest.raises(TaskStringError, match=r"expected one of \['cordigits', 'dataset', 'dataset-net', "
                                                r"'digits', 'digits-mlp', 'mnist1d', 'rotdigits'\]"):
        get_task("nofam")


def test_plugin_cannot_replace_a_builtin_family(install):
    install("tinyfam", {"digits": "tinyfam:FakeDigits"})
    with pytest.raises(TaskFamilyError, match=r"registers tinyfam.FakeDigits as family 'digits', which "
                                              r"weightdiff.tasks.digits.DigitsTask already is"):
        list_families()
    assert type(get_task("digits")).__name__ == "DigitsTask"


def test_broken_plugin_on_the_command_line_is_one_line(install, tmp_path, capsys):
    from weightdiff.cli import main

    install("tinybroken", {"broken": "tinyother.missing:Task"})
    assert main(["evaluate", "--task", "broken:k=1", "--weights", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("weightdiff: error: task family plug-in 'broken = "
                                                   "tinyother.missing:Task'") and "tinybroken 0.1" in err


def test_pyproject_entry_points_name_the_builtin_families(install):
    """The entry points weightdiff declares for itself load the classes registered in code."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["weightdiff.tasks"]
    assert sorted(declared) == BUILTIN
    install("weightdiff-copy", declared)
    assert list_families() == BUILTIN
    for name, value in declared.items():
        module, _, attr = value.partition(":")
        assert getattr(sys.modules[module], attr) is get_family(name)


# ------------------------------------------------------------------------- held-out tasks in recipes
# Plans of the shipped recipes as computed by the code before held-out tasks could be listed
# literally: (number of runs, sha256 of _plan_rows).
SHIPPED_PLANS = {
    "digits-cnn-parents.yaml": (60, "54f2c49618a5c18ae2fdb36ebb2d6f45323689e36b5963b09713854ba5d7c032"),
    "digits-cnn.yaml": (60, "8857271ab6c180f7dd00039a2e3af3663d01f00ed485dc3e20b9603f09dcc4cb"),
    "mnist1d-cnn.yaml": (60, "064bf464340e6ed46e8d3a4a103beaec1a6058dce0ef08b39c2654ea511f8bcd"),
    "rotdigits-lora.yaml": (712, "d33f86ce84e30aa43caac613d4533f0f9c448828e859a5f5628be9b1b1fa3ad7"),
    "tiny-digits-cnn-parents.yaml": (4, "67f22593d13f37a67aa9e2f51d32fddefc31c478acfd912059ec42968ffb01bb"),
    "tiny-digits-cnn.yaml": (3, "ef6625b3923293720aafc44d7a1d7e6e4f90fd4750e0c634bfc99e83ee651147"),
    "tiny-mnist1d-cnn.yaml": (3, "e49f8449984be91f4cce25eaccafdff8c9753af0158a8e23e233fad418f8b9bc"),
    "tiny-rotdigits-lora.yaml": (24, "eeee158526d814c6a0eec6b5912e3bc7fd1ff7d76c84409b8ab5cc2738ebda73"),
}


def _plan_rows(recipe) -> list[dict]:
    return [{"index": r.index, "task": r.task, "split": r.split, "heldout_kind": r.heldout_kind, "seed": r.seed,
             "parent": r.parent, "entries": r.entry_ids()} for r in recipe.plan()]


def _fingerprint(recipe) -> tuple[int, str]:
    rows = _plan_rows(recipe)
    return len(rows), hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


def test_shipped_recipes_plan_the_same_runs():
    from weightdiff.zoo import load_recipe

    found = {name: _fingerprint(load_recipe(REPO / "configs/zoo" / name)) for name in SHIPPED_PLANS}
    assert found == SHIPPED_PLANS


def test_literal_heldout_tasks_give_the_plan_of_the_grid():
    from weightdiff.zoo import Recipe, load_recipe

    grid = load_recipe(REPO / "configs/zoo/tiny-rotdigits-lora.yaml")
    train, held = grid.task_lists()
    by_kind: dict[str, list[str]] = {}
    for task, kind in held:
        by_kind.setdefault(kind, []).append(task)
    assert list(by_kind) == ["near", "far", "combo"]
    literal = Recipe.from_dict(dict(grid.to_dict(), generator=None, tasks=train, heldout_tasks=by_kind))
    assert literal.plan() == grid.plan()
    assert Recipe.from_dict(literal.to_dict()) == literal  # the zoo.json round trip


def _tiny_recipe(**fields) -> dict:
    return {"name": "tiny-plugin", "kind": "full", "family": "tinyfam", "tasks": ["tinyfam:k=0", "tinyfam:k=1"],
            "heldout_tasks": {"far": ["tinyfam:k=3"], "near": ["tinyfam:k=2"]}, "runs": 2, "heldout_runs": 1,
            "epochs": 2, "checkpoint_epochs": [2], **fields}


def test_literal_heldout_tasks_of_a_plugin_family(install, tmp_path):
    from weightdiff.zoo import load_recipe

    install("tinyfam", {"tinyfam": "tinyfam:TinyTask"})
    path = tmp_path / "tiny-plugin.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe()))
    rows = [(r.task, r.split, r.heldout_kind, r.seed) for r in load_recipe(path).plan()]
    assert rows == [("tinyfam:k=0", "train", None, 0), ("tinyfam:k=0", "train", None, 1),
                    ("tinyfam:k=1", "train", None, 0), ("tinyfam:k=1", "train", None, 1),
                    ("tinyfam:k=3", "heldout", "far", 0), ("tinyfam:k=2", "heldout", "near", 0)]


@pytest.mark.parametrize("fields, message", [
    ({"heldout_tasks": {"medium": ["tinyfam:k=2"]}},
     "field 'heldout_tasks.medium' is not a held-out kind; expected one of ['near', 'far', 'combo', 'novel']"),
    ({"heldout_tasks": {"far": ["tinyfam:k=1"]}},
     "field 'heldout_tasks.far' lists task 'tinyfam:k=1' again (already in 'tasks')"),
    ({"heldout_tasks": {"far": ["tinyfam:k=3"], "near": ["tinyfam:k=3"]}},
     "field 'heldout_tasks.near' lists task 'tinyfam:k=3' again (already in 'heldout_tasks.far')"),
    ({"heldout_tasks": {"far": ["tinyfam:k=03"]}},
     "field 'heldout_tasks.far': task 'tinyfam:k=03' is not canonical; write 'tinyfam:k=3'"),
    ({"heldout_tasks": {"far": ["digits"]}},
     "field 'heldout_tasks.far': task 'digits' is a full task of family 'digits', expected a full task of "
     "family 'tinyfam'"),
    ({"heldout_tasks": {"far": ["tinyfam:k=9"]}}, "field 'heldout_tasks.far': task string 'tinyfam:k=9'"),
    ({"heldout_tasks": ["tinyfam:k=3"]}, "field 'heldout_tasks' expected dict["),
])
def test_bad_literal_heldout_tasks_name_file_and_field(install, tmp_path, fields, message):
    from weightdiff.zoo import load_recipe

    install("tinyfam", {"tinyfam": "tinyfam:TinyTask"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_tiny_recipe(**fields)))
    with pytest.raises(RecipeError) as exc:
        load_recipe(path)
    assert str(exc.value).startswith(f"{path}: ") and message in str(exc.value), str(exc.value)


def test_heldout_tasks_and_generator_exclude_each_other():
    from weightdiff.zoo import Recipe, load_recipe

    grid = load_recipe(REPO / "configs/zoo/tiny-rotdigits-lora.yaml").to_dict()
    with pytest.raises(RecipeError, match=r"field 'heldout_tasks' and 'generator': the generator makes the held-out"):
        Recipe.from_dict(dict(grid, heldout_tasks={"far": ["rotdigits:angle=50,flip=0"]}))


# ------------------------------------------------------------------------------- benchmark suites
def test_shipped_suites_are_the_five_benchmarks():
    assert list_suites() == ["adapt-lora", "cordigits-lora", "digits-cnn", "digits-mlp", "mnist1d-cnn"]
    assert [(s.name, s.kind, s.family, s.baseline_condition) for s in map(load_suite, list_suites())] == [
        ("adapt-lora", "lora", "rotdigits", "code"), ("cordigits-lora", "lora", "cordigits", "text"),
        ("digits-cnn", "full", "digits", "code"), ("digits-mlp", "full", "digits-mlp", "code"),
        ("mnist1d-cnn", "full", "mnist1d", "code")]


def test_shipped_suites_are_declared_package_data():
    """An installed wheel carries every shipped suite: pyproject's package-data globs match them all."""
    from fnmatch import fnmatch

    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    folder = REPO / "weightdiff" / "tasks"
    files = sorted(p.relative_to(folder).as_posix() for p in (folder / "suite_configs").iterdir())
    assert files == [f"suite_configs/{name}.yaml" for name in list_suites()]
    assert all(any(fnmatch(f, g) for g in globs["weightdiff.tasks"]) for f in files)


def test_suite_file_of_ones_own_for_a_plugin_family(install, tmp_path):
    install("tinyfam", {"tinyfam": "tinyfam:TinyTask"})
    path = tmp_path / "mine.yaml"
    path.write_text("name: tiny-suite\nkind: full\nfamily: tinyfam\n")
    assert load_suite(path) == load_suite(str(path)) == Suite("tiny-suite", "full", "tinyfam")


def test_unknown_suite_lists_the_shipped_ones():
    with pytest.raises(BenchmarkError, match=r"unknown suite 'adapt-loar'; expected one of \['adapt-lora', "
                                             r"'cordigits-lora', 'digits-cnn', 'digits-mlp', 'mnist1d-cnn'\] or the "
                                             r"path of a suite .yaml file"):
        load_suite("adapt-loar")


@pytest.mark.parametrize("text, message", [
    ("name: s\nkind: lora\nfamily: rotdigits\nsteps: 3\n",
     "unknown field 'steps'; expected one of ['name', 'kind', 'family', 'description', 'baseline_condition']"),
    ("name: s\nkind: lora\n", "missing required field 'family'"),
    ("name: s\nkind: adapter\nfamily: rotdigits\n", "field 'kind' expected one of ['full', 'lora'], got 'adapter'"),
    ("name: s\nkind: full\nfamily: rotdigits\n", "field 'kind' = 'full', but family 'rotdigits' is of kind 'lora'"),
    ("name: s\nkind: full\nfamily: nofam\n", "field 'family': unknown task family 'nofam'"),
    ("name: [s]\nkind: full\nfamily: digits\n", "field 'name' expected str, got list ['s']"),
    ("- name\n", "expected a mapping of suite fields, got list"),
    ("name: [s\n", "is not valid YAML"),
])
def test_bad_suite_file_names_file_and_field(tmp_path, text, message):
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    with pytest.raises(BenchmarkError) as exc:
        load_suite(path)
    assert str(path) in str(exc.value) and message in str(exc.value), str(exc.value)


def test_benchmark_command_takes_a_suite_file(tiny_lora_zoo, tmp_path, capsys):
    """``--suite FILE`` reaches the benchmark, which checks the zoo against that suite."""
    from weightdiff.cli import main

    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\nkind: full\nfamily: digits\n")
    for name in ("adapt-loar", str(suite)):
        assert main(["benchmark", "--suite", name, "--zoo", str(tiny_lora_zoo), "--out", str(tmp_path / "out")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2, errors
    assert errors[0].startswith("weightdiff: error: unknown suite 'adapt-loar'; expected one of ['adapt-lora',")
    assert errors[1] == (f"weightdiff: error: suite 'mine' needs a full zoo of family 'digits', but {tiny_lora_zoo} "
                         "is a lora zoo of family 'rotdigits'")
