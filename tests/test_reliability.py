"""Reliability: runs killed with SIGKILL resume cleanly, rebuilds and samples are bit-identical, and
pickles placed where weights belong are refused without being executed.

The kill points are drawn from seeded random generators, so a failure reproduces. (The zoo build
kill test lives in tests/test_zoo.py.)
"""

from __future__ import annotations

import csv
import io
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, fit_args
from weightdiff.errors import WeightFileError
from weightdiff.evaluate.weights import find_weight_paths, load_weight_sets
from weightdiff.models.generator import load_generator
from weightdiff.training.export import read_lightning_checkpoint
from weightdiff.io import load_weights, sha256_file
from weightdiff.sampling import SamplerSettings, make_condition, sample
from weightdiff.tasks import get_task
from weightdiff.zoo import Zoo, build_zoo, load_recipe

SEED = 1234
TASK = "rotdigits:angle=-15"  # a training task of the tiny zoo: its text embedding is cached by the fit
ENTRY = "rotdigits_angle-15_flip0-s000-c0030"
MAX_STEPS = 40
CHECKPOINT_EVERY = 5  # configs/tiny.yaml: ModelCheckpoint(every_n_train_steps=5, save_last=True)
NUM_SAMPLES = 64
START_TIMEOUT_S = 240  # a cold start imports torch, lightning, peft and the text encoder




def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _cli(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m weightdiff ARGV`` in its own process group (so a kill reaches every child)."""
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "weightdiff", *argv], cwd=REPO, env=_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(condition: Callable[[], bool], proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out:\n{log.read_text()[-3000:]}"
        time.sleep(0.01)


def _sigkill(proc: subprocess.Popen, log: Path) -> None:
    assert proc.poll() is None, f"finished before the kill:\n{log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


# --------------------------------------------------------------------------------- kill and resume
def _checkpoint_steps(directory: Path) -> list[int]:
    """Steps of the ``epoch=E-step=S.ckpt`` files ModelCheckpoint has written so far."""
    return [int(m.group(1)) for p in directory.glob("*.ckpt") if (m := re.search(r"step=(\d+)", p.name))]


def test_fit_killed_after_a_checkpoint_resumes_at_its_step(tiny_lora_zoo, tmp_path):
    rng = random.Random(SEED)
    args = fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", str(MAX_STEPS),
                    "--trainer.logger.init_args.version", "0")
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    log = tmp_path / "fit.log"
    proc = _cli(args, log)
    # Kill at a random point after the third checkpoint file or later: last.ckpt (written just
    # after each step=S file) then holds step >= 10, so a run that ignored it and restarted at
    # step 0 is told apart by its first logged step.
    kill_after = rng.randrange(3 * CHECKPOINT_EVERY, MAX_STEPS - CHECKPOINT_EVERY, CHECKPOINT_EVERY)
    _wait_until(lambda: max(_checkpoint_steps(checkpoints), default=0) >= kill_after, proc, log, START_TIMEOUT_S)
    time.sleep(rng.uniform(0.0, 0.1))  # possibly in the middle of writing the next checkpoint
    _sigkill(proc, log)

    saved = read_lightning_checkpoint(last)  # Lightning writes checkpoints atomically: always readable
    step = saved["global_step"]
    assert step % CHECKPOINT_EVERY == 0 and kill_after - CHECKPOINT_EVERY <= step < MAX_STEPS, (kill_after, step)
    assert int(saved["state_dict"]["ema.n_averaged"]) == step

    resumed = subprocess.run([sys.executable, "-m", "weightdiff", *args, "--ckpt_path", str(last)], cwd=REPO,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = read_lightning_checkpoint(last)
    assert final["global_step"] == MAX_STEPS
    assert int(final["state_dict"]["ema.n_averaged"]) == MAX_STEPS  # the EMA continued, not restarted
    # The resumed run starts a fresh metrics.csv in the pinned version folder. Lightning logs a
    # batch at its 0-based index (global step - 1): a run from step 0 would log step 4 first.
    rows = list(csv.DictReader((last.parents[1] / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/weight_loss")})
    assert steps and steps[0] in (step - 1, step + CHECKPOINT_EVERY - 1) and steps[-1] == MAX_STEPS - 1, \
        (step, steps)


def test_sample_killed_midway_leaves_only_complete_samples(tiny_generator, tmp_path):
    rng = random.Random(SEED + 1)
    out = tmp_path / "killed"
    argv = ["sample", "--model", str(tiny_generator), "--task", TASK, "--num", str(NUM_SAMPLES), "--no-cache",
            "--out", str(out)]
    log = tmp_path / "sample.log"
    proc = _cli(argv, log)
    kill_at = rng.randint(1, NUM_SAMPLES // 2)  # samples written before the kill (at least)
    _wait_until(lambda: out.is_dir() and sum(p.name.startswith("sample_") for p in out.iterdir()) >= kill_at,
                proc, log, START_TIMEOUT_S)
    _sigkill(proc, log)

    names = sorted(p.name for p in out.iterdir())
    final = [n for n in names if n.startswith("sample_")]
    assert kill_at <= len(final) < NUM_SAMPLES
    assert final == [f"sample_{i:04d}" for i in range(len(final))]  # written in order, each one whole
    leftovers = [n for n in names if n not in final]
    assert all(n.startswith(".sample_") and ".tmp-" in n for n in leftovers), leftovers  # hidden temp dirs
    gen = load_generator(tiny_generator)
    target = gen.target(get_task(TASK))
    for i, name in enumerate(final):
        d = out / name
        assert {p.name for p in d.iterdir()} == {"adapter_model.safetensors", "adapter_config.json", "sample.json"}
        assert load_weight_sets([d]).ids == [name]
        target.load_module(d)  # strict PEFT load into the base network
    assert find_weight_paths(out) == [out / n for n in final]

    # The same request, uninterrupted, in another process: the surviving samples are bit-identical.
    done = subprocess.run([sys.executable, "-m", "weightdiff", *argv[:-1], str(tmp_path / "full")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in final:
        assert ((out / name / "adapter_model.safetensors").read_bytes()
                == (tmp_path / "full" / name / "adapter_model.safetensors").read_bytes()), name


# ----------------------------------------------------------------------------------- determinism
def _weight_hashes(zoo: Path) -> dict[str, str]:
    return {p.relative_to(zoo).as_posix(): sha256_file(p) for p in sorted(zoo.rglob("*.safetensors"))}


def test_same_recipe_and_seed_build_bit_identical_zoos(tmp_path):
    recipe = load_recipe(REPO / "configs/zoo/tiny-rotdigits-lora.yaml")
    a = build_zoo(recipe, tmp_path / "a", workers=1, progress=False)
    b = build_zoo(recipe, tmp_path / "b", workers=1, progress=False)
    hashes = _weight_hashes(a)
    assert len(hashes) == len(Zoo.open(a).rows()) + 1  # every entry and the base network
    assert hashes == _weight_hashes(b)


def test_same_request_gives_bit_identical_samples(tiny_generator, tmp_path):
    gen = load_generator(tiny_generator)
    settings = SamplerSettings(steps=3, seed=11)
    files = []
    for run in ("a", "b"):
        dirs, info = sample(gen, make_condition(gen, task=TASK), 3, settings, tmp_path / run, use_cache=False,
                            progress=False)
        assert not info["from_cache"]
        files.append([(d / "adapter_model.safetensors").read_bytes() for d in dirs])
    assert files[0] == files[1]
    assert len(set(files[0])) == 3  # and the three samples differ from each other


# ------------------------------------------------------------------------------ malicious pickles
class _Exploit:
    """Unpickling this creates ``marker`` (stands in for arbitrary code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _payload(kind: str, marker: Path) -> bytes:
    obj = {"base_model.model.fc1.lora_A.weight": _Exploit(marker)}
    if kind == "pickle":
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    buf = io.BytesIO()
    torch.save(obj, buf)  # the zip container torch.load(weights_only=False) would execute
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
def test_payloads_are_live(kind, tmp_path):
    """Control: the payloads do run code when unpickled the unsafe way."""
    marker = tmp_path / "control"
    data = _payload(kind, marker)
    if kind == "pickle":
        pickle.loads(data)
    else:
        torch.load(io.BytesIO(data), weights_only=False)
    assert marker.exists()


def _place_in_zoo(zoo: Path, data: bytes) -> list[Callable[[], object]]:
    path = zoo / "entries" / ENTRY / "adapter_model.safetensors"
    path.write_bytes(data)
    return [lambda: Zoo.open(zoo).load(ENTRY), lambda: load_weights(path), lambda: load_weight_sets([path.parent]),
            lambda: Zoo.open(zoo).target().load_module(path.parent)]


def _place_in_sample(sample_dir: Path, data: bytes) -> list[Callable[[], object]]:
    (sample_dir / "adapter_model.safetensors").write_bytes(data)
    return [lambda: load_weight_sets([sample_dir]), lambda: load_weight_sets(find_weight_paths(sample_dir.parent))]


GENERATOR_WEIGHTS = "generator/diffusion_pytorch_model.safetensors"  # in an exported generator folder


def _place_in_generator(gen_dir: Path, data: bytes) -> list[Callable[[], object]]:
    (gen_dir / GENERATOR_WEIGHTS).write_bytes(data)
    return [lambda: load_generator(gen_dir), lambda: load_weights(gen_dir / GENERATOR_WEIGHTS)]


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("where", ["zoo entry", "sample", "generator"])
def test_malicious_pickle_is_refused_and_not_executed(where, kind, tiny_lora_zoo, tiny_generator, tmp_path):
    marker = tmp_path / "pwned"
    data = _payload(kind, marker)
    if where == "zoo entry":
        loads = _place_in_zoo(Path(shutil.copytree(tiny_lora_zoo, tmp_path / "zoo")), data)
        file = tmp_path / "zoo" / "entries" / ENTRY / "adapter_model.safetensors"
    elif where == "sample":
        gen = load_generator(tiny_generator)
        dirs, _ = sample(gen, make_condition(gen, task=TASK), 1, SamplerSettings(steps=2), tmp_path / "samples",
                         use_cache=False, progress=False)
        loads = _place_in_sample(dirs[0], data)
        file = dirs[0] / "adapter_model.safetensors"
    else:
        loads = _place_in_generator(Path(shutil.copytree(tiny_generator, tmp_path / "gen")), data)
        file = tmp_path / "gen" / GENERATOR_WEIGHTS
    for load in loads:
        with pytest.raises(WeightFileError) as err:
            load()
        assert str(file) in str(err.value)
    if where == "zoo entry":  # verify reports it as a changed file, without loading it
        assert [eid for eid, _ in Zoo.open(tmp_path / "zoo").verify()] == [ENTRY]
    assert not marker.exists()
