"""Zoo: recipes, deterministic sharded plans, atomic resumable builds, the store and the CLI.

Most builds use :class:`FakeTrainer` (seeded random tensors of the right names and shapes, known
metrics) so that the orchestration is tested exactly and fast; two small builds use the real
training loops end to end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import pytest
import torch

from weightdiff.cli import main as cli_main
from weightdiff.errors import ManifestError, RecipeError, ZooBuildError
from weightdiff.zoo import (Recipe, TrainedCheckpoint, Zoo, build_zoo, load_recipe, parse_shard, run_build,
                            shard_runs)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "zoo"


# ------------------------------------------------------------------------------------ fake trainer
def _gen(*key: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32("|".join(map(str, key)).encode()))


def fake_metrics(task: str, seed: int, checkpoint: int) -> dict[str, float]:
    g = _gen("acc", task, seed, checkpoint)
    acc = float(torch.rand((), generator=g))
    return {"train_acc": acc, "val_acc": acc / 2, "test_acc": acc / 3, "seconds": 0.0}


def fake_tensors(shapes: dict[str, tuple[int, ...]], *key: object) -> dict[str, torch.Tensor]:
    g = _gen(*key)
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


class FakeTrainer:
    """Seeded random weights of the right names/shapes with known metrics; records its calls."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls: list[str] = []

    def train_base(self, recipe: Recipe):
        net = recipe.build_network()
        return fake_tensors({k: tuple(v.shape) for k, v in net.state_dict().items()}, "base"), \
            {"train_acc": 1.0, "val_acc": 0.9, "test_acc": 0.8}

    def train_parent(self, recipe: Recipe, index: int):
        net = recipe.build_network()
        return fake_tensors({k: tuple(v.shape) for k, v in net.state_dict().items()}, "parent", index), \
            {"train_acc": 1.0, "val_acc": 0.9, "test_acc": 0.8}

    def shapes(self, recipe: Recipe, base) -> dict[str, tuple[int, ...]]:
        if recipe.kind == "full":
            return {k: tuple(v.shape) for k, v in recipe.build_network().state_dict().items()}
        from weightdiff.targets import Target

        return Target.lora(base, recipe.lora_config()).param_shapes()

    def train_run(self, recipe: Recipe, run, *, base, parent):
        self.calls.append(run.run_id)
        time.sleep(self.delay)
        shapes = self.shapes(recipe, base)
        return [TrainedCheckpoint(c, fake_tensors(shapes, run.task, run.seed, c), fake_metrics(run.task, run.seed, c))
                for c in run.checkpoints]


def tiny_full(**overrides) -> Recipe:
    data = {"name": "fake-digits", "kind": "full", "family": "digits", "tasks": ["digits"], "runs": 4,
            "epochs": 3, "checkpoint_epochs": [2, 3]}
    return Recipe.from_dict({**data, **overrides})


def tiny_lora(**overrides) -> Recipe:
    data = yaml_dict(CONFIGS / "tiny-rotdigits-lora.yaml")
    data["name"] = "fake-rotdigits"
    return Recipe.from_dict({**data, **overrides})


def yaml_dict(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def snapshot(zoo_dir: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file of every complete entry."""
    out = {}
    for d in (zoo_dir / "entries").iterdir():
        if d.name.startswith("."):
            continue
        for f in d.iterdir():
            st = f.stat()
            out[f"{d.name}/{f.name}"] = (st.st_ino, st.st_mtime_ns)
    return out


# ------------------------------------------------------------------------------------------ recipes
def test_shipped_recipes_load_and_meet_their_sizes():
    names = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    for name in ("digits-cnn", "digits-cnn-parents", "mnist1d-cnn", "rotdigits-lora"):
        assert name in names and f"tiny-{name}" in names
        r = load_recipe(CONFIGS / f"{name}.yaml")
        assert r.name == name
        if r.kind == "full":
            assert r.runs >= 50 and len(r.checkpoint_epochs) >= 4
        else:
            train, held = r.task_lists()
            assert len(train) >= 300 and r.runs >= 2 and len(held) >= 30
            assert {k for _, k in held} == {"near", "far", "combo"}
    assert load_recipe(CONFIGS / "digits-cnn-parents.yaml").parents > 1
    for name in names:
        assert load_recipe(CONFIGS / f"{name}.yaml").plan()


def test_recipe_round_trips_through_dict():
    r = load_recipe(CONFIGS / "rotdigits-lora.yaml")
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert r.plan() == Recipe.from_dict(r.to_dict()).plan()
    # ints where floats are expected are stored as floats, and the caller's mapping is left alone
    data = yaml_dict(CONFIGS / "tiny-rotdigits-lora.yaml")
    data.update(alpha=16, lr=1)
    data["generator"]["far_holes"] = [[15, 60]]
    t = Recipe.from_dict(data)
    assert (type(t.alpha), type(t.lr), type(t.generator.far_holes[0][0])) == (float, float, float)
    assert type(data["generator"]["far_holes"][0][0]) is int


@pytest.mark.parametrize("patch, field, expected", [
    ({"epochs_typo": 3}, "epochs_typo", "unknown field"),
    ({"runs": "two"}, "runs", "expected int, got str"),
    ({"runs": True}, "runs", "expected int, got bool"),
    ({"lr": "fast"}, "lr", "expected float"),
    ({"kind": "partial"}, "kind", "expected one of 'full', 'lora'"),
    ({"checkpoint_epochs": [2, "x"]}, "checkpoint_epochs", "expected list[int], got list [2, 'x']"),
    ({"lora_batch_size": "x"}, "lora_batch_size", "expected int | None, got str 'x'"),
    ({"runs": {"n": 2}}, "runs", "expected int, got dict"),
    ({"checkpoint_epochs": [3, 9]}, "checkpoint_epochs", "strictly increasing epochs in [1, epochs=3]"),
    ({"tasks": ["digits:angle=3"]}, "tasks", "unknown factor 'angle'"),
    ({"tasks": ["rotdigits:angle=3,flip=0"]}, "tasks", "expected a full task of family 'digits'"),
    ({"name": "has space"}, "name", "folder name"),
])
def test_recipe_errors_name_file_and_field(tmp_path, patch, field, expected):
    import yaml

    data = {"name": "x", "kind": "full", "family": "digits", "tasks": ["digits"], "epochs": 3,
            "checkpoint_epochs": [2, 3], **patch}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg and expected in msg


def test_recipe_errors_nested_and_missing(tmp_path):
    data = yaml_dict(CONFIGS / "tiny-rotdigits-lora.yaml")
    data["generator"]["angle_step"] = "fine"
    path = tmp_path / "g.yaml"
    path.write_text(json.dumps(data))  # JSON is YAML
    with pytest.raises(RecipeError, match=r"g\.yaml: field 'generator\.angle_step' expected float, got str"):
        load_recipe(path)
    del data["name"]
    data["generator"]["angle_step"] = 15.0
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"missing required field 'name'"):
        load_recipe(path)
    data["name"], data["generator"]["bogus"] = "g", 1
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"g\.yaml: unknown field 'generator\.bogus'"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_generator_tags_heldout_kinds_by_distance():
    r = load_recipe(CONFIGS / "rotdigits-lora.yaml")
    train, held = r.task_lists()
    assert (train, held) == r.task_lists()  # deterministic
    from weightdiff.tasks import get_task

    tr = [get_task(t).factors for t in train]
    train_set = {(f["angle"], f["flip"]) for f in tr}
    dist = lambda a, b: abs((a - b + 180) % 360 - 180)  # noqa: E731
    assert len(set(train) & {t for t, _ in held}) == 0
    for name, kind in held:
        f = get_task(name).factors
        a, flip = f["angle"], f["flip"]
        if kind == "near":
            assert 0 < min(dist(a, b) for b, g in train_set if g == flip) <= 5
        elif kind == "far":
            assert min(dist(a, b) for b, _ in train_set) >= 20
        else:
            assert kind == "combo" and flip == 1 and (a, 0) in train_set
            assert all(g == 0 for b, g in train_set if b == a)


def test_generator_rejects_a_hole_too_narrow_for_far_tasks(tmp_path):
    data = yaml_dict(CONFIGS / "tiny-rotdigits-lora.yaml")
    data["generator"]["far_holes"] = [[15.0, 45.0]]
    path = tmp_path / "narrow.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(RecipeError, match=r"narrow\.yaml: field 'generator'\.far_holes: hole \[15, 45\]"):
        load_recipe(path)


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_partition_the_plan(n):
    plan = load_recipe(CONFIGS / "tiny-rotdigits-lora.yaml").plan()
    parts = [shard_runs(plan, (i, n)) for i in range(n)]
    ids = [r.run_id for p in parts for r in p]
    assert len(ids) == len(set(ids)) == len(plan)
    assert sorted(ids) == sorted(r.run_id for r in plan)
    assert parse_shard(f"{n - 1}/{n}") == (n - 1, n)


@pytest.mark.parametrize("bad", ["2/2", "-1/3", "1", "a/b"])
def test_parse_shard_rejects(bad):
    with pytest.raises(ZooBuildError, match="expected"):
        parse_shard(bad)


# ------------------------------------------------------------------------------------------ builds
def test_full_build_store_round_trip_and_info(tmp_path):
    recipe = tiny_full()
    trainer = FakeTrainer()
    path = build_zoo(recipe, tmp_path, progress=False, trainer=trainer)
    zoo = Zoo.open(path)
    assert (zoo.name, zoo.kind, zoo.family) == ("fake-digits", "full", "digits")
    assert zoo.recipe == recipe.to_dict() and zoo.parsed_recipe == recipe
    rows = zoo.rows()
    assert [r["id"] for r in rows] == sorted(e for run in recipe.plan() for e in run.entry_ids())
    assert len(rows) == 8 and zoo.rows("heldout") == [] and zoo.tasks() == ["digits"]
    shapes = trainer.shapes(recipe, None)
    for row in rows:
        loaded = zoo.load(row["id"])
        expected = fake_tensors(shapes, row["task"], row["seed"], row["checkpoint"])
        assert loaded.keys() == expected.keys()
        for k in expected:
            assert torch.equal(loaded[k], expected[k])
        assert row["metrics"]["test_acc"] == pytest.approx(fake_metrics("digits", row["seed"], row["checkpoint"])["test_acc"])
        assert row["num_params"] == sum(t.numel() for t in expected.values())
        assert row["run_id"] == f"digits-s{row['seed']:03d}" and row["heldout_kind"] is None
    one = zoo.load(rows[0]["id"], keys=["fc.bias"])
    assert list(one) == ["fc.bias"]
    with pytest.raises(ManifestError, match="no tensor 'nope'"):
        zoo.load(rows[0]["id"], keys=["nope"])
    # a loaded entry drives the target network
    target = zoo.target()
    logits = target.forward_batched({k: v[None] for k, v in zoo.load(rows[0]["id"]).items()}, torch.zeros(3, 1, 8, 8))
    assert logits.shape == (1, 3, 10)
    accs = [fake_metrics("digits", s, c)["test_acc"] for s in range(4) for c in (2, 3)]
    info = zoo.info()
    assert info["entries"] == info["planned_entries"] == 8 and info["runs"] == 4
    assert info["splits"]["train"]["test_acc"]["mean"] == pytest.approx(sum(accs) / 8)
    assert info["per_task"]["digits"]["test_acc"]["min"] == pytest.approx(min(accs))
    assert info["test_acc"]["max"] == pytest.approx(max(accs))
    assert zoo.verify() == []


def test_lora_build_writes_base_and_peft_adapters(tmp_path):
    recipe = tiny_lora()
    path = build_zoo(recipe, tmp_path, progress=False, trainer=FakeTrainer())
    zoo = Zoo.open(path)
    base_sha = json.loads((path / "base" / "entry.json").read_text())["sha256"]
    rows = zoo.rows()
    assert len(rows) == 24 and len(zoo.rows("heldout")) == 8
    assert {r["heldout_kind"] for r in zoo.rows("heldout")} == {"near", "far", "combo"}
    assert all(r["base_sha256"] == base_sha for r in rows)
    assert rows[0]["file"] == "adapter_model.safetensors" and len(rows[0]["code"]) == 3
    zoo.target().check(zoo.load(rows[0]["id"]))
    model = zoo.target().load_module(zoo.entry_dir(rows[0]["id"]))  # PeftModel.from_pretrained on the base
    assert type(model).__name__ == "PeftModel"
    info = zoo.info()
    assert info["heldout_kinds"]["far"]["entries"] == 4 and info["base"]["test_acc"] == 0.8
    assert zoo.verify() == []


def test_entry_write_is_atomic(tmp_path, monkeypatch):
    import weightdiff.zoo.build as build

    real = build.write_json

    def fail_on_rows(path, obj):
        if Path(path).name == "entry.json":
            raise OSError("disk full")
        real(path, obj)

    monkeypatch.setattr(build, "write_json", fail_on_rows)
    with pytest.raises(OSError, match="disk full"):
        build_zoo(tiny_full(runs=1), tmp_path, progress=False, trainer=FakeTrainer())
    assert list((tmp_path / "fake-digits" / "entries").iterdir()) == []  # no entry, no temp folder
    info = Zoo.open(tmp_path / "fake-digits").info()
    assert info["entries"] == 0 and info["test_acc"]["mean"] is None
    json.dumps(info, allow_nan=False)


def test_resume_retrains_only_missing_or_bad_entries(tmp_path):
    recipe = tiny_full()
    path = build_zoo(recipe, tmp_path, progress=False, trainer=FakeTrainer())
    (path / "entries" / "digits-s001-c0002" / "model.safetensors").write_bytes(b"corrupt")
    import shutil

    shutil.rmtree(path / "entries" / "digits-s003-c0003")
    before = snapshot(path)
    trainer = FakeTrainer()
    report = run_build(recipe, tmp_path, progress=False, trainer=trainer)
    assert sorted(trainer.calls) == ["digits-s001", "digits-s003"]
    assert (report.skipped_runs, report.trained_runs, report.entries_written) == (2, 2, 2)
    after = snapshot(path)
    rewritten = {k for k in before if before[k] != after[k]}
    assert {k.split("/")[0] for k in rewritten} == {"digits-s001-c0002"}
    assert Zoo.open(path).verify() == []
    again = FakeTrainer()
    run_build(recipe, tmp_path, progress=False, trainer=again)
    assert again.calls == [] and snapshot(path) == after


def test_recipe_mismatch_refuses_to_mix_zoos(tmp_path):
    build_zoo(tiny_full(runs=1), tmp_path, progress=False, trainer=FakeTrainer())
    with pytest.raises(RecipeError, match=r"zoo\.json was built from another recipe: field 'runs' is 1 there, 2"):
        build_zoo(tiny_full(runs=2), tmp_path, progress=False, trainer=FakeTrainer())


def test_sharded_builds_fill_one_zoo(tmp_path):
    recipe = tiny_full(runs=5)
    counts = []
    for i in range(3):
        t = FakeTrainer()
        run_build(recipe, tmp_path, shard=(i, 3), progress=False, trainer=t)
        counts.append(len(t.calls))
    assert counts == [2, 2, 1]
    assert Zoo.open(tmp_path / recipe.name).verify() == []


# --------------------------------------------------------------------------------- verify / manifest
def test_verify_reports_corruption_hash_mismatch_shape_and_missing(tmp_path):
    path = build_zoo(tiny_full(), tmp_path, progress=False, trainer=FakeTrainer())
    e = path / "entries"
    # flipped bytes: hash mismatch
    w = e / "digits-s000-c0002" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    # garbage file with its hash updated: not safetensors
    from weightdiff.io import save_weights, sha256_file

    w2 = e / "digits-s001-c0002" / "model.safetensors"
    w2.write_bytes(b"\x00" * 64)
    row = json.loads((e / "digits-s001-c0002" / "entry.json").read_text())
    row["sha256"] = sha256_file(w2)
    (e / "digits-s001-c0002" / "entry.json").write_text(json.dumps(row))
    # wrong shape with a valid hash: does not load strictly
    w3 = e / "digits-s002-c0002" / "model.safetensors"
    sd = Zoo.open(path).load("digits-s002-c0002")
    sd["fc.bias"] = torch.zeros(11)
    save_weights(w3, sd)
    row = json.loads((e / "digits-s002-c0002" / "entry.json").read_text())
    row["sha256"] = sha256_file(w3)
    (e / "digits-s002-c0002" / "entry.json").write_text(json.dumps(row))
    import shutil

    shutil.rmtree(e / "digits-s003-c0003")
    problems = dict(Zoo.open(path).verify())
    assert set(problems) == {"digits-s000-c0002", "digits-s001-c0002", "digits-s002-c0002", "digits-s003-c0003"}
    assert "sha256" in problems["digits-s000-c0002"]
    assert "digits-s001-c0002/model.safetensors is not a" in problems["digits-s001-c0002"]
    assert "'fc.bias' has shape (11,), expected (10,)" in problems["digits-s002-c0002"]
    assert problems["digits-s003-c0003"].startswith("missing")


def test_manifest_missing_field_and_duplicate_id(tmp_path):
    path = build_zoo(tiny_full(runs=2), tmp_path, progress=False, trainer=FakeTrainer())
    f = path / "entries" / "digits-s000-c0003" / "entry.json"
    row = json.loads(f.read_text())
    del row["seed"]
    f.write_text(json.dumps(row))
    with pytest.raises(ManifestError, match=rf"{f}: manifest row is missing field 'seed'"):
        Zoo.open(path).rows()
    row["seed"] = 0
    f.write_text(json.dumps(row))
    import shutil

    shutil.copytree(path / "entries" / "digits-s001-c0002", path / "entries" / "digits-s001-copy")
    with pytest.raises(ManifestError, match=r"digits-s001-copy/entry\.json: field 'id' = 'digits-s001-c0002' "
                                           r"duplicates the id of .*digits-s001-c0002/entry\.json"):
        Zoo.open(path).rows()
    with pytest.raises(ManifestError, match="is not a zoo: zoo.json not found"):
        Zoo.open(tmp_path)


# ------------------------------------------------------------------------------------- kill + resume
KILL_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_zoo import FakeTrainer, tiny_full
from weightdiff.zoo import run_build

if __name__ == "__main__":
    run_build(tiny_full(runs=16), {root!r}, workers=2, progress=False, trainer=FakeTrainer(delay=0.4))
"""


def test_build_killed_midway_resumes_without_rewriting(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(KILL_SCRIPT.format(tests=str(Path(__file__).parent), root=str(tmp_path))))
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    entries = tmp_path / "fake-digits" / "entries"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        done = [d for d in entries.iterdir() if not d.name.startswith(".")] if entries.is_dir() else []
        if len(done) >= 6:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its worker processes
    proc.wait()
    time.sleep(0.2)
    before = snapshot(tmp_path / "fake-digits")
    complete_runs = {k.split("/")[0].rsplit("-c", 1)[0] for k in before}
    complete_runs = {r for r in complete_runs if all(f"{r}-c{c:04d}/model.safetensors" in before for c in (2, 3))}
    assert 3 <= len({k.split("/")[0] for k in before}) < 32

    trainer = FakeTrainer()
    report = run_build(tiny_full(runs=16), tmp_path, progress=False, trainer=trainer)
    assert not set(trainer.calls) & complete_runs  # no complete run trained twice
    assert report.trained_runs == 16 - len(complete_runs)
    after = snapshot(tmp_path / "fake-digits")
    assert all(after[k] == v for k, v in before.items())  # nothing that existed was rewritten
    assert len({k.split("/")[0] for k in after}) == 32
    assert Zoo.open(tmp_path / "fake-digits").verify() == []


# ------------------------------------------------------------------------------ real trainers, CLI
def zoo_main(argv: list[str]) -> int:
    """``weightdiff zoo ARGV`` in this process."""
    return cli_main(["zoo", *argv])


def test_real_tiny_builds_and_cli(tmp_path, capsys):
    for name in ("tiny-rotdigits-lora", "tiny-digits-cnn-parents"):
        code = zoo_main(["build", "--config", str(CONFIGS / f"{name}.yaml"), "--root", str(tmp_path),
                         "--no-progress"])
        assert code == 0
        assert zoo_main(["verify", str(tmp_path / name)]) == 0
        assert zoo_main(["info", str(tmp_path / name), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out[out.rindex('{\n  "name": "tiny-digits-cnn-parents"'):])
    assert info["entries"] == 8 and info["test_acc"]["min"] > 0.5  # fine-tuned from trained parents
    lora = Zoo.open(tmp_path / "tiny-rotdigits-lora").info()
    assert lora["base"]["test_acc"] > 0.9 and lora["test_acc"]["mean"] > 0.5
    parents = Zoo.open(tmp_path / "tiny-digits-cnn-parents")
    assert {r["parent"] for r in parents.rows()} == {"p0", "p1"}


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    assert zoo_main(["build", "--config", str(CONFIGS / "tiny-digits-cnn.yaml"), "--shard", "3/2"]) == 2
    assert "--shard '3/2': expected 0 <= i < n" in capsys.readouterr().err
    path = build_zoo(tiny_full(runs=1), tmp_path, progress=False, trainer=FakeTrainer())
    (path / "entries" / "digits-s000-c0002" / "model.safetensors").write_bytes(b"x")
    assert zoo_main(["verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert "digits-s000-c0002:" in captured.out and "1 problem(s)" in captured.err
    assert zoo_main(["info", str(path)]) == 0 and "fake-digits (full, family digits)" in capsys.readouterr().out
