"""Bad inputs: each raises a specific WeightDiffError naming the file/key (expected vs actual).

51 distinct bad inputs are tested. A parametrised case counts once per distinct input, a
hypothesis test once per kind of file it corrupts, and an input reached by several paths (API and
CLI, or two consumers) once:

* weight files (7): random truncations (hypothesis) of a zoo entry's weight file, a sample's
  ``adapter_model.safetensors`` and an exported ``generator/diffusion_pytorch_model.safetensors``; a truncated file whose
  length prefix starts with the pickle opcode 0x80; random bit flips (hypothesis) of each of the
  three files;
* PEFT adapters (4): a missing key, an extra key, rank-4 tensors under an r = 8 config, an r = 4
  config over rank-8 tensors, each through ``evaluate``'s loader and ``Target.load_module``;
* non-finite zoo entries (3): NaN, +Inf, -Inf, through ``Zoo.load`` and ``Zoo.verify``;
* generator directories (6): a layout of another format version, a truncated ``layout.json``
  (hypothesis), a truncated layout statistics file, a layout of another network (load and
  decode), generator weights with a tensor of another shape, no ``tokenizer/``;
* manifests (14): each of the 12 required ``entry.json`` fields missing, a field of the wrong
  type, a duplicate id;
* configs (4): a zoo recipe with an unknown key / a wrong type; a fit config with an unknown key /
  a wrong type;
* requests (11): an empty, a whitespace-only and an enormous description (the 2000-character
  limit itself is accepted); six condition-provider inputs of the wrong size or kind;
  ``--num 0``; an unknown task;
* interrupted sample runs (2): a write that dies half-way (nothing under the final name), a
  leftover ``.sample_0000.tmp-*`` dir (never taken for a weight set).

Command-line cases check exit status 2 and exactly one ``weightdiff: error:`` line without a
traceback (``fit``: LightningCLI's own usage error, exit status != 0, naming the key). Ten run
``python -m weightdiff`` in a subprocess; six more call ``weightdiff.cli.main`` in this process
(same parser and handlers; a process start costs 5-7 CPU seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO
from weightdiff.models.conditioning import CodeCondition, ExampleSetCondition, check_description
from weightdiff.errors import (ConditionError, LayoutFileError, LayoutMismatchError, ManifestError, ModelDirError,
                               NonFiniteWeightsError, TargetMismatchError, WeightDiffError, WeightFileError)
from weightdiff.evaluate.weights import find_weight_paths, load_weight_sets, target_for
from weightdiff.models.generator import load_generator
from weightdiff.io import load_weights, save_weights, sha256_file
from weightdiff.tasks.networks import DigitsCNN
from weightdiff.sampling import SamplerSettings, make_condition, sample
from weightdiff.tasks import get_task
from weightdiff.weights.tokenizer import WeightTokenizer
from weightdiff.zoo import Zoo
from weightdiff.zoo.manifest import REQUIRED_FIELDS, entry_problem

TASK = "rotdigits:angle=-15"  # a training task of the tiny zoo: its text embedding is cached by the fit
ENTRY = "rotdigits_angle-15_flip0-s000-c0030"
GENERATOR_WEIGHTS = "generator/diffusion_pytorch_model.safetensors"  # in an exported generator folder
CLI_TIMEOUT_S = 240
CLI_PARALLEL = 4  # subprocesses spend most of their time importing; overlap them
HYPOTHESIS = settings(max_examples=30, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])




# ----------------------------------------------------------------------------------- helpers
def copy_tree(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def header_end(path: Path) -> int:
    """Byte offset where a safetensors file's tensor data starts (8-byte length + JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def flip_bit(data: bytes, pos: int, bit: int) -> bytes:
    out = bytearray(data)
    out[pos] ^= 1 << bit
    return bytes(out)


def drop_key(weight_file: Path) -> str:
    """Rewrite a weight file without its first tensor; return that tensor's name."""
    tensors = load_weights(weight_file)
    first = next(iter(tensors))
    save_weights(weight_file, {k: v for k, v in tensors.items() if k != first})
    return first


def set_row(entry_dir: Path, **fields) -> None:
    row = json.loads((entry_dir / "entry.json").read_text())
    row.update(fields)
    (entry_dir / "entry.json").write_text(json.dumps(row))


def assert_names(exc: BaseException, *needles: str) -> None:
    msg = str(exc)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return load_generator(tiny_generator)


@pytest.fixture(scope="module")
def sample_dir(gen, tmp_path_factory) -> Path:
    """One complete sample (``sample_0000``: PEFT adapter + sample.json) of the tiny generator."""
    out = tmp_path_factory.mktemp("samples")
    dirs, _ = sample(gen, make_condition(gen, task=TASK), 1, SamplerSettings(steps=2), out, use_cache=False,
                     progress=False)
    return dirs[0]


@pytest.fixture()
def zoo_copy(tiny_lora_zoo, tmp_path) -> Path:
    return copy_tree(tiny_lora_zoo, tmp_path / "zoo")


# ----------------------------------------------------------------------------- CLI, subprocess
@dataclass
class Inputs:
    """Where the CLI cases build their bad inputs (copies: the fixtures stay intact)."""

    zoo: Path
    gen: Path
    sample: Path
    tmp: Path

    def copy(self, src: Path, name: str) -> Path:
        return copy_tree(src, self.tmp / name)

    def yaml(self, name: str, data: dict) -> Path:
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data))
        return path


@dataclass
class CliCase:
    argv: list[str]
    needles: list[str]  # must all appear in the one error line
    lightning: bool = False  # LightningCLI's parser reports the error (its own format and status)
    stdout_needles: tuple[str, ...] = ()
    untouched: tuple[Path, ...] = ()  # output paths the failed command must not create


# A `python -m weightdiff` start costs 5-7 CPU seconds (torch, lightning, peft imports), so some
# cases run `weightdiff.cli.main(argv)` in this process instead: same parser, same handler, same
# error line and status, without the process around it.
SUBPROCESS_CASES: dict[str, Callable[[Inputs], CliCase]] = {}
IN_PROCESS_CASES: dict[str, Callable[[Inputs], CliCase]] = {}


def cli_case(*, in_subprocess: bool) -> Callable:
    def register(fn: Callable[[Inputs], CliCase]) -> Callable[[Inputs], CliCase]:
        (SUBPROCESS_CASES if in_subprocess else IN_PROCESS_CASES)[fn.__name__] = fn
        return fn
    return register


def _sample_argv(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model), "--out", str(out), "--steps", "2", *extra]


@cli_case(in_subprocess=False)
def generator_truncated(c: Inputs) -> CliCase:
    g = c.copy(c.gen, "gen_truncated")
    f = g / GENERATOR_WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    out = c.tmp / "out_generator_truncated"
    return CliCase(_sample_argv(g, out, "--task", TASK), [str(f), "not a readable safetensors file"],
                   untouched=(out,))


@cli_case(in_subprocess=False)
def tokenizer_of_another_network(c: Inputs) -> CliCase:
    g = c.copy(c.gen, "gen_other_tokenizer")
    shutil.rmtree(g / "tokenizer")
    WeightTokenizer.from_state_dict(DigitsCNN().state_dict(), token_size=32).save(g / "tokenizer")
    config = json.loads((g / "generator" / "config.json").read_text())
    out = c.tmp / "out_other_tokenizer"
    return CliCase(_sample_argv(g, out, "--task", TASK),
                   [str(g / "tokenizer" / "layout.json"), f"expected {config['num_tokens']} tokens"],
                   untouched=(out,))


@cli_case(in_subprocess=True)
def model_dir_without_tokenizer(c: Inputs) -> CliCase:
    g = c.copy(c.gen, "gen_no_tokenizer")
    shutil.rmtree(g / "tokenizer")
    out = c.tmp / "out_no_tokenizer"
    return CliCase(_sample_argv(g, out, "--task", TASK), [str(g), "missing 'tokenizer'"], untouched=(out,))


@cli_case(in_subprocess=True)
def enormous_description(c: Inputs) -> CliCase:
    text = "handwritten digits rotated by thirty degrees " * 60  # 2700 characters
    out = c.tmp / "out_enormous"
    return CliCase(_sample_argv(c.gen, out, "--description", text),
                   [f"{len(text)} characters long", "the limit is 2000"], untouched=(out,))


@cli_case(in_subprocess=True)
def num_zero(c: Inputs) -> CliCase:
    out = c.tmp / "out_num0"
    return CliCase(_sample_argv(c.gen, out, "--task", TASK, "--num", "0"), ["--num", "got 0"], untouched=(out,))


@cli_case(in_subprocess=True)
def sample_weights_truncated(c: Inputs) -> CliCase:
    s = c.copy(c.sample, "sample_truncated")
    f = s / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    json_out = c.tmp / "eval_truncated.json"
    return CliCase(["evaluate", "--task", TASK, "--weights", str(s), "--json", str(json_out)],
                   [str(f), "not a safetensors file"], untouched=(json_out,))


@cli_case(in_subprocess=False)
def adapter_missing_key(c: Inputs) -> CliCase:
    s = c.copy(c.sample, "sample_missing_key")
    key = drop_key(s / "adapter_model.safetensors")
    return CliCase(["evaluate", "--task", TASK, "--weights", str(s)], [str(s), f"missing key '{key}'"])


@cli_case(in_subprocess=True)
def only_an_interrupted_sample(c: Inputs) -> CliCase:
    out = c.tmp / "interrupted"
    shutil.copytree(c.sample, out / ".sample_0000.tmp-k1ll3d")  # complete-looking, but not renamed
    return CliCase(["evaluate", "--task", TASK, "--weights", str(out)], [str(out), "holds no checkpoint"])


@cli_case(in_subprocess=True)
def unknown_task(c: Inputs) -> CliCase:
    return CliCase(["evaluate", "--task", "nosuchfamily:k=1", "--weights", str(c.sample)],
                   ["'nosuchfamily:k=1'", "unknown family 'nosuchfamily'", "rotdigits"])


@cli_case(in_subprocess=True)
def zoo_entry_bit_flipped(c: Inputs) -> CliCase:
    z = c.copy(c.zoo, "zoo_flipped")
    f = z / "entries" / ENTRY / "adapter_model.safetensors"
    f.write_bytes(flip_bit(f.read_bytes(), f.stat().st_size - 3, 6))  # a value bit in the last tensor
    return CliCase(["zoo", "verify", str(z)], [str(z), "1 problem(s)"],
                   stdout_needles=(f"{ENTRY}: {f}: sha256",))


@cli_case(in_subprocess=True)
def manifest_missing_field(c: Inputs) -> CliCase:
    z = c.copy(c.zoo, "zoo_missing_field")
    entry = z / "entries" / ENTRY
    row = json.loads((entry / "entry.json").read_text())
    del row["seed"]
    (entry / "entry.json").write_text(json.dumps(row))
    return CliCase(["zoo", "info", str(z)], [str(entry / "entry.json"), "missing field 'seed'"])


@cli_case(in_subprocess=False)
def manifest_duplicate_id(c: Inputs) -> CliCase:
    z = c.copy(c.zoo, "zoo_duplicate")
    shutil.copytree(z / "entries" / ENTRY, z / "entries" / "zz-copy")
    return CliCase(["zoo", "info", str(z)], [str(z / "entries" / "zz-copy" / "entry.json"), f"'{ENTRY}'",
                                             "duplicates"])


def _recipe(**patch) -> dict:
    return {**yaml.safe_load((REPO / "configs/zoo/tiny-rotdigits-lora.yaml").read_text()), **patch}


@cli_case(in_subprocess=True)
def recipe_unknown_key(c: Inputs) -> CliCase:
    path = c.yaml("recipe_unknown.yaml", _recipe(stepz=30))
    root = c.tmp / "zoo_root_unknown"
    return CliCase(["zoo", "build", "--config", str(path), "--root", str(root), "--no-progress"],
                   [str(path), "unknown field 'stepz'"], untouched=(root,))


@cli_case(in_subprocess=False)
def recipe_wrong_type(c: Inputs) -> CliCase:
    path = c.yaml("recipe_type.yaml", _recipe(steps="thirty"))
    root = c.tmp / "zoo_root_type"
    return CliCase(["zoo", "build", "--config", str(path), "--root", str(root), "--no-progress"],
                   [str(path), "field 'steps' expected int, got str 'thirty'"], untouched=(root,))


def _fit_config(c: Inputs, name: str, **model) -> tuple[Path, Path]:
    data = yaml.safe_load((REPO / "configs/tiny.yaml").read_text())
    run = c.tmp / f"run_{name}"
    data["data"]["zoo"] = str(c.zoo)
    data["trainer"]["default_root_dir"] = str(run)
    data["trainer"]["logger"]["init_args"]["save_dir"] = str(run)
    data["model"].update(model)
    return c.yaml(f"{name}.yaml", data), run


@cli_case(in_subprocess=True)
def fit_config_unknown_key(c: Inputs) -> CliCase:
    path, run = _fit_config(c, "fit_unknown", hiden=64)
    return CliCase(["fit", "--config", str(path)], ["model.hiden"], lightning=True, untouched=(run,))


@cli_case(in_subprocess=False)
def fit_config_wrong_type(c: Inputs) -> CliCase:
    path, run = _fit_config(c, "fit_type", depth="two")
    return CliCase(["fit", "--config", str(path)], ["model.depth", "two"], lightning=True, untouched=(run,))


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "weightdiff", *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S)


@pytest.fixture(scope="module")
def cli_results(tiny_lora_zoo, tiny_generator, sample_dir, tmp_path_factory):
    """Every subprocess case built, then run concurrently: ``{name: (case, completed process)}``."""
    inputs = Inputs(tiny_lora_zoo, tiny_generator, sample_dir, tmp_path_factory.mktemp("cli"))
    cases = {name: build(inputs) for name, build in SUBPROCESS_CASES.items()}
    with ThreadPoolExecutor(CLI_PARALLEL) as pool:
        procs = dict(zip(cases, pool.map(_run, [c.argv for c in cases.values()])))
    return {name: (cases[name], procs[name]) for name in cases}


def check_error_output(case: CliCase, status: int | None, stderr: str, stdout: str) -> None:
    """Status 2 and exactly one `weightdiff: error:` line naming the needles (LightningCLI: its own error)."""
    detail = f"exit {status}\nstderr:\n{stderr[-3000:]}\nstdout:\n{stdout[-1000:]}"
    assert "Traceback" not in stderr, detail
    if case.lightning:
        assert status not in (0, None), detail
        text = stderr[stderr.lower().rindex("error:"):]  # jsonargparse ends with `error: <what>`
    else:
        assert status == 2, detail
        errors = [line for line in stderr.splitlines() if line.startswith("weightdiff: error: ")]
        assert len(errors) == 1, detail
        text = errors[0]
    for needle in case.needles:
        assert needle in text, f"{needle!r} not in the error\n{detail}"
    for needle in case.stdout_needles:
        assert needle in stdout, detail
    for path in case.untouched:
        assert not path.exists() or (path.is_dir() and not any(path.iterdir())), f"{path} written by a failed command"


@pytest.mark.parametrize("name", list(SUBPROCESS_CASES))
def test_cli_bad_input_in_a_subprocess(cli_results, name):
    case, proc = cli_results[name]
    check_error_output(case, proc.returncode, proc.stderr, proc.stdout)


@pytest.mark.parametrize("name", list(IN_PROCESS_CASES))
def test_cli_bad_input_in_process(name, tiny_lora_zoo, tiny_generator, sample_dir, tmp_path, capsys):
    from weightdiff.cli import main

    case = IN_PROCESS_CASES[name](Inputs(tiny_lora_zoo, tiny_generator, sample_dir, tmp_path))
    capsys.readouterr()
    try:
        status = main(case.argv)
    except SystemExit as exc:  # LightningCLI's parser exits by itself
        status = exc.code
    captured = capsys.readouterr()
    check_error_output(case, status, captured.err, captured.out)


# ------------------------------------------------------------- corrupted weight files (hypothesis)
@pytest.fixture(scope="module")
def scratch(tiny_lora_zoo, tiny_generator, sample_dir, tmp_path_factory):
    """Mutable copies whose weight file each example overwrites: (zoo, generator, sample) dirs."""
    root = tmp_path_factory.mktemp("scratch")
    return (copy_tree(tiny_lora_zoo, root / "zoo"), copy_tree(tiny_generator, root / "gen"),
            copy_tree(sample_dir, root / "sample"))


def _zoo_file(zoo: Path) -> Path:
    return zoo / "entries" / ENTRY / "adapter_model.safetensors"


def _check_zoo_entry(zoo: Path, data: bytes, original: bytes) -> None:
    """A changed zoo entry file: verify's entry check reports it; Zoo.load fails with a named error or reads it."""
    path = _zoo_file(zoo)
    path.write_bytes(data)
    problem = entry_problem(path.parent)
    assert problem is not None and str(path) in problem and "sha256" in problem
    try:
        loaded = Zoo.open(zoo).load(ENTRY)
    except WeightDiffError as exc:
        assert str(path) in str(exc)
    else:  # a header flip may rename a tensor: the sha256 check above is what catches it
        assert isinstance(loaded, dict)
    path.write_bytes(original)


def _check_sample(sample_path: Path, data: bytes, original: bytes, task) -> bool:
    """A changed sample weight file: a named error, or a weight set with the same tensors; True if loaded."""
    path = sample_path / "adapter_model.safetensors"
    path.write_bytes(data)
    try:
        weights = load_weight_sets([sample_path])
        target_for(weights, task)
    except WeightDiffError as exc:
        assert str(sample_path) in str(exc)
        return False
    finally:
        path.write_bytes(original)
    reference = load_weights(path)
    assert {k: v.shape[1:] for k, v in weights.params.items()} == {k: v.shape for k, v in reference.items()}
    return True


def _check_generator(gen_dir: Path, data: bytes, original: bytes) -> None:
    """A changed generator file: a named error, or a strict load with the intact file's tensors."""
    path = gen_dir / GENERATOR_WEIGHTS
    keys = set(load_weights(path))
    path.write_bytes(data)
    try:
        loaded = load_generator(gen_dir)
    except WeightDiffError as exc:
        assert str(path) in str(exc)
    else:  # values changed only
        assert set(loaded.generator.state_dict()) == keys
    finally:
        path.write_bytes(original)


@HYPOTHESIS
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_weight_files_raise_weight_file_error_naming_the_file(scratch, fraction):
    zoo, gen_dir, sample_path = scratch
    task = get_task(TASK)
    loaders = [(_zoo_file(zoo), lambda: Zoo.open(zoo).load(ENTRY)),
               (gen_dir / GENERATOR_WEIGHTS, lambda: load_generator(gen_dir)),
               (sample_path / "adapter_model.safetensors", lambda: target_for(load_weight_sets([sample_path]), task))]
    for path, load in loaders:
        original = path.read_bytes()
        path.write_bytes(original[: int(fraction * len(original))])
        try:
            with pytest.raises(WeightFileError) as err:
                load()
            assert_names(err.value, str(path))
            assert "pickle" not in str(err.value)  # a cut safetensors file is not mistaken for a pickle
        finally:
            path.write_bytes(original)
    path = _zoo_file(zoo)
    original = path.read_bytes()
    path.write_bytes(original[: int(fraction * len(original))])
    try:
        assert "sha256" in entry_problem(path.parent)  # what `zoo verify` reports for this entry
    finally:
        path.write_bytes(original)


def test_truncated_file_with_a_0x80_length_prefix_is_not_called_a_pickle(tmp_path):
    """A header length of 0x..80 starts the file with the byte that opens a pickle (protocol >= 2)."""
    path = tmp_path / "w.safetensors"
    for pad in range(256):
        save_weights(path, {"w": torch.ones(4)}, metadata={"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    data = path.read_bytes()
    assert data[0] == 0x80
    for cut in (3, 9, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(WeightFileError) as err:
            load_weights(path)
        assert_names(err.value, str(path), "not a")
        assert "pickle" not in str(err.value)


def _flip_strategy(draw, path: Path) -> tuple[int, int]:
    size = path.stat().st_size
    # Half the flips hit the length prefix or the JSON header, where they change the file's structure.
    pos = draw(st.one_of(st.integers(0, header_end(path) - 1), st.integers(0, size - 1)))
    return pos, draw(st.integers(0, 7))


@HYPOTHESIS
@given(data=st.data())
def test_bit_flipped_zoo_entry_is_always_reported(scratch, data):
    zoo = scratch[0]
    path = _zoo_file(zoo)
    original = path.read_bytes()
    pos, bit = _flip_strategy(data.draw, path)
    _check_zoo_entry(zoo, flip_bit(original, pos, bit), original)


@HYPOTHESIS
@given(data=st.data())
def test_bit_flipped_sample_raises_a_named_error_or_keeps_its_tensors(scratch, data):
    sample_path = scratch[2]
    path = sample_path / "adapter_model.safetensors"
    original = path.read_bytes()
    pos, bit = _flip_strategy(data.draw, path)
    _check_sample(sample_path, flip_bit(original, pos, bit), original, get_task(TASK))


@HYPOTHESIS
@given(data=st.data())
def test_bit_flipped_generator_raises_a_named_error_or_loads_strictly(scratch, data):
    gen_dir = scratch[1]
    path = gen_dir / GENERATOR_WEIGHTS
    original = path.read_bytes()
    pos, bit = _flip_strategy(data.draw, path)
    _check_generator(gen_dir, flip_bit(original, pos, bit), original)


def test_header_flips_are_caught_not_just_data_flips(scratch):
    """The flips above can fail: a flip of the header's opening brace is always a named error."""
    sample_path = scratch[2]
    path = sample_path / "adapter_model.safetensors"
    original = path.read_bytes()
    assert not _check_sample(sample_path, flip_bit(original, 8, 0), original, get_task(TASK))
    assert _check_sample(sample_path, flip_bit(original, len(original) - 1, 0), original, get_task(TASK))


# ---------------------------------------------------------------------------------- PEFT adapters
def _mutate_adapter(entry: Path, mutation: str) -> str:
    """Break a PEFT adapter folder in one way; return the tensor or field it breaks."""
    weights = entry / "adapter_model.safetensors"
    tensors = load_weights(weights)
    if mutation == "missing_key":
        return drop_key(weights)
    if mutation == "extra_key":
        save_weights(weights, {**tensors, "base_model.model.fc1.lora_C.weight": torch.zeros(3)})
        return "base_model.model.fc1.lora_C.weight"
    if mutation == "rank4_tensors":  # adapter_config.json still says r = 8
        save_weights(weights, {k: v[:4] if "lora_A" in k else v[:, :4] for k, v in tensors.items()})
        return next(iter(tensors))
    assert mutation == "rank4_config"  # tensors of rank 8, adapter_config.json says r = 4
    cfg = json.loads((entry / "adapter_config.json").read_text())
    (entry / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    return "'r' is 4, expected 8"


@pytest.mark.parametrize("mutation", ["missing_key", "extra_key", "rank4_tensors", "rank4_config"])
@pytest.mark.parametrize("consumer", ["evaluate", "load_module"])
def test_bad_peft_adapter_raises_target_mismatch_naming_key(zoo_copy, mutation, consumer):
    entry = zoo_copy / "entries" / ENTRY
    shapes = {k: tuple(v.shape) for k, v in load_weights(entry / "adapter_model.safetensors").items()}
    broken = _mutate_adapter(entry, mutation)
    with pytest.raises(TargetMismatchError) as err:
        if consumer == "evaluate":
            target_for(load_weight_sets([entry]), get_task("rotdigits:angle=-15"))
        else:
            Zoo.open(zoo_copy).target().load_module(entry)
    a_key = next(iter(shapes))  # a lora_A tensor (r, in)
    r8, r4 = shapes[a_key], (4, *shapes[a_key][1:])
    # evaluate stacks S weight sets: shapes carry a leading sample dimension (1 here, S expected)
    shown = (lambda s, lead: f"({lead}, {', '.join(map(str, s))})") if consumer == "evaluate" else \
        (lambda s, lead: str(s))
    expected = {
        "missing_key": [f"missing key '{broken}'"],
        "extra_key": [f"unexpected key '{broken}'"],
        "rank4_tensors": [f"'{a_key}' has shape {shown(r4, 1)}, expected {shown(r8, 'S')}"],
        # evaluate builds the target from the adapter's own config; load_module from the zoo's
        "rank4_config": ([f"'{a_key}' has shape {shown(r8, 1)}, expected {shown(r4, 'S')}"]
                         if consumer == "evaluate" else [str(entry / "adapter_config.json"), broken]),
    }[mutation]
    assert_names(err.value, str(entry), *expected)


# ------------------------------------------------------------------------------ non-finite entries
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_zoo_entry_is_refused_by_load_and_reported_by_verify(zoo_copy, value):
    entry = zoo_copy / "entries" / ENTRY
    weights = entry / "adapter_model.safetensors"
    tensors = load_weights(weights)
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[7] = value
    save_weights(weights, tensors)
    set_row(entry, sha256=sha256_file(weights))  # an intact file holding a diverged run's weights
    zoo = Zoo.open(zoo_copy)
    with pytest.raises(NonFiniteWeightsError) as err:
        zoo.load(ENTRY)
    assert_names(err.value, str(weights), f"'{key}'", "1 non-finite")
    zoo.load(ENTRY, keys=[k for k in tensors if k != key])  # the other tensors are still readable
    assert [(eid, "non-finite" in why and str(weights) in why) for eid, why in zoo.verify()] == [(ENTRY, True)]


# --------------------------------------------------------------------------------------- layouts
def test_layout_of_another_format_version(gen, tiny_generator, tmp_path):
    g = copy_tree(tiny_generator, tmp_path / "gen")
    layout = g / "tokenizer" / "layout.json"
    layout.write_text(json.dumps({**json.loads(layout.read_text()), "format_version": 99}))
    for load in (lambda: WeightTokenizer.load(g / "tokenizer"), lambda: load_generator(g)):
        with pytest.raises(LayoutFileError) as err:
            load()
        assert_names(err.value, str(layout), "format_version 99", "expected 1")


@HYPOTHESIS
@given(fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_layout_json_names_the_file(scratch, fraction):
    layout = scratch[1] / "tokenizer" / "layout.json"
    original = layout.read_text()
    cut = int(fraction * (original.rindex("}")))  # any prefix short of the closing brace
    layout.write_text(original[:cut])
    try:
        with pytest.raises(LayoutFileError) as err:
            WeightTokenizer.load(layout.parent)
        assert_names(err.value, str(layout), "truncated or not valid JSON")
    finally:
        layout.write_text(original)


def test_truncated_layout_statistics(tiny_generator, tmp_path):
    g = copy_tree(tiny_generator, tmp_path / "gen")
    stats = g / "tokenizer" / "layout_stats.safetensors"
    stats.write_bytes(stats.read_bytes()[:-4])
    with pytest.raises(LayoutFileError) as err:
        load_generator(g)
    assert_names(err.value, str(stats))


def test_layout_of_another_network_fails_load_and_decode(gen, tiny_generator, tmp_path):
    other = WeightTokenizer.from_state_dict(DigitsCNN().state_dict(), token_size=32)
    other.save(tmp_path / "other")
    loaded = WeightTokenizer.load(tmp_path / "other")  # a valid layout, just not this generator's
    tokens = torch.zeros(gen.tokenizer.layout.num_tokens, 32)
    with pytest.raises(LayoutMismatchError) as err:
        loaded.decode(tokens)
    assert_names(err.value, f"{tuple(tokens.shape)}", f"expected ({loaded.layout.num_tokens}, 32)")
    g = copy_tree(tiny_generator, tmp_path / "gen")
    shutil.rmtree(g / "tokenizer")
    shutil.copytree(tmp_path / "other", g / "tokenizer")
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    assert_names(err.value, str(g / "tokenizer" / "layout.json"), f"{loaded.layout.num_tokens} tokens",
                 f"expected {gen.tokenizer.layout.num_tokens} tokens")


def test_generator_weights_of_another_size(tiny_generator, tmp_path):
    g = copy_tree(tiny_generator, tmp_path / "gen")
    tensors = load_weights(g / GENERATOR_WEIGHTS)
    key = next(k for k, v in tensors.items() if v.dim() == 2)
    rows, cols = tensors[key].shape
    tensors[key] = torch.zeros(rows + 1, cols)
    save_weights(g / GENERATOR_WEIGHTS, tensors)
    with pytest.raises(ModelDirError) as err:
        load_generator(g)
    assert_names(err.value, str(g / GENERATOR_WEIGHTS), f"'{key}'", f"({rows + 1}, {cols})",
                 f"expected ({rows}, {cols})")


# ------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("field", list(REQUIRED_FIELDS))
def test_manifest_row_missing_a_field(zoo_copy, field):
    entry = zoo_copy / "entries" / ENTRY
    row = json.loads((entry / "entry.json").read_text())
    del row[field]
    (entry / "entry.json").write_text(json.dumps(row))
    with pytest.raises(ManifestError) as err:
        Zoo.open(zoo_copy).rows()
    assert_names(err.value, str(entry / "entry.json"), f"missing field '{field}'")


def test_manifest_row_wrong_type_and_duplicate_id(zoo_copy):
    entry = zoo_copy / "entries" / ENTRY
    set_row(entry, seed="0")
    with pytest.raises(ManifestError) as err:
        Zoo.open(zoo_copy).rows()
    assert_names(err.value, str(entry / "entry.json"), "field 'seed' expected int, got str '0'")
    set_row(entry, seed=0)
    shutil.copytree(entry, zoo_copy / "entries" / "zz-copy")
    with pytest.raises(ManifestError) as err:
        Zoo.open(zoo_copy).rows()
    assert_names(err.value, str(zoo_copy / "entries" / "zz-copy" / "entry.json"), f"'{ENTRY}'",
                 str(entry / "entry.json"))


# ----------------------------------------------------------------------------- conditions
@pytest.mark.parametrize("text, needle", [
    ("", "empty"),
    ("  \t\n", "empty"),
    ("digits rotated by 40 degrees " * 80, "2320 characters long, the limit is 2000"),
])
def test_bad_descriptions(gen, text, needle):
    with pytest.raises(ConditionError) as err:
        make_condition(gen, description=text)
    assert_names(err.value, needle)
    assert check_description("x" * 2000) == "x" * 2000  # the limit itself is allowed


def _bad_condition_calls(gen):
    text = gen.generator.cond  # the tiny generator's text provider: (B, 384 + 4)
    code = CodeCondition(16, code_dim=3)
    examples = ExampleSetCondition(16, x_dim=64, num_classes=10, heads=2)
    x, y = torch.zeros(1, 5, 64), torch.zeros(1, 5, dtype=torch.long)
    return {
        "text_width": (lambda: text(torch.zeros(2, 100)), ["(2, 100)", f"expected (B, {text.raw_dim})"]),
        "text_1d": (lambda: text(torch.zeros(text.raw_dim)), [f"({text.raw_dim},)", "expected (B,"]),
        "code_width": (lambda: code(torch.zeros(2, 5)), ["(2, 5)", "expected (B, 3)"]),
        "examples_x_dim": (lambda: examples((torch.zeros(1, 5, 63), y)), ["63 input values", "x_dim=64"]),
        "examples_label": (lambda: examples((x, y + 10)), ["[0, 10)", "[10, 10]"]),
        "drop_mask": (lambda: code(torch.zeros(2, 3), drop_mask=torch.zeros(3, dtype=torch.bool)),
                      ["drop_mask has shape (3,)", "expected (2,)"]),
    }


@pytest.mark.parametrize("case", ["text_width", "text_1d", "code_width", "examples_x_dim", "examples_label",
                                  "drop_mask"])
def test_condition_of_the_wrong_size(gen, case):
    call, needles = _bad_condition_calls(gen)[case]
    with pytest.raises(ConditionError) as err:
        call()
    assert_names(err.value, *needles)


# ---------------------------------------------------------------------- interrupted sample writes
def test_interrupted_sample_write_leaves_nothing_under_a_final_name(gen, tmp_path, monkeypatch):
    import weightdiff.sampling as sampling

    real_write_json = sampling.write_json
    calls = []

    def write_json_then_die(path, obj):
        calls.append(Path(path).name)
        if calls.count("sample.json") == 2:  # the second sample, its last file
            raise KeyboardInterrupt
        real_write_json(path, obj)

    monkeypatch.setattr(sampling, "write_json", write_json_then_die)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        sample(gen, make_condition(gen, task=TASK), 3, SamplerSettings(steps=2), out, use_cache=False,
               progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000"]  # no sample_0001, no temp dir left
    assert {p.name for p in (out / "sample_0000").iterdir()} == {"adapter_model.safetensors",
                                                                 "adapter_config.json", "sample.json"}
    # A SIGKILL leaves its temp dir behind: it is hidden and never taken for a weight set.
    shutil.copytree(out / "sample_0000", out / ".sample_0001.tmp-k1ll3d")
    assert find_weight_paths(out) == [out / "sample_0000"]
    assert load_weight_sets(find_weight_paths(out)).ids == ["sample_0000"]
