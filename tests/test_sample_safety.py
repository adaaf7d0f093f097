"""`sample` never gives a silently wrong result and never loses or mixes samples.

Output folders: a folder that holds samples is refused unless ``--overwrite``, which replaces it
whole (also for ``--select-with``); SIGTERM mid-write leaves no temporaries; the next run sweeps
what a killed run left. Requests: a description with no readable angle is refused for a family
that needs one, spelled-out angles are read, and ``sample.json`` records what was parsed and what
reached the model; options the generator cannot use, a Lightning checkpoint as ``--model``, bad
UTF-8, non-ASCII task numbers and out-of-range ``--seed``/``--steps``/``--batch-size``/``--num``
are one-line errors. Caches: an unwritable cache folder or a truncated cache file is warned about
and worked around. Samples stream to disk one batch at a time.
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from weightdiff.cli import main
from weightdiff.errors import ConditionError, TaskStringError
from weightdiff.io import load_weights
from weightdiff.models.generator import load_generator
from weightdiff.sampling import SamplerSettings, generate_tokens, make_condition
from weightdiff.tasks import get_task

TASK = "rotdigits:angle=10"
SIGTERM_STATUS = 128 + signal.SIGTERM


@pytest.fixture(scope="module")
def gen(tiny_generator):
    return load_generator(tiny_generator)


def sample_args(model: Path, out: Path, *extra: str) -> list[str]:
    args = ["sample", "--model", str(model), "--out", str(out), "--steps", "2", "--no-cache", *extra]
    return args if "--description" in extra or "--task" in extra else [*args, "--task", TASK]


def run(capsys, args: list[str]) -> tuple[int, list[str]]:
    """``main(args)``: the exit status and the ``weightdiff: error`` lines on stderr (no traceback)."""
    status = main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return status, [line for line in err.splitlines() if line.startswith("weightdiff: error")]


def one_error(capsys, args: list[str], *needles: str) -> str:
    status, lines = run(capsys, args)
    assert status == 2 and len(lines) == 1, (status, lines)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def weights(folder: Path) -> dict[str, bytes]:
    return {d.name: (d / "adapter_model.safetensors").read_bytes() for d in sorted(folder.iterdir())}


def temporaries(*folders: Path) -> list[str]:
    return [p.name for f in folders if f.is_dir() for p in f.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# ---------------------------------------------------------------------------- no mixed folders
@pytest.mark.parametrize("mode", [[], ["--select-with", "20", "--candidates", "2"]], ids=["sample", "select-best"])
def test_a_folder_holding_samples_is_refused_and_overwrite_replaces_it_whole(tiny_generator, tmp_path, capsys, mode):
    out = tmp_path / "samples"
    assert run(capsys, sample_args(tiny_generator, out, "--num", "3", *mode))[0] == 0
    before = weights(out)
    assert len(before) == 3
    new = ["--task", "rotdigits:angle=-45", "--num", "1", "--seed", "5", *mode]
    one_error(capsys, sample_args(tiny_generator, out, *new), str(out), "--overwrite", "3 entries")
    assert weights(out) == before  # untouched

    assert run(capsys, sample_args(tiny_generator, out, *new, "--overwrite"))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000"]  # no stale sample_0001, sample_0002
    meta = json.loads((out / "sample_0000" / "sample.json").read_text())
    assert meta["condition"]["task"] == "rotdigits:angle=-45,flip=0"
    assert temporaries(tmp_path, out) == []


def test_an_overwrite_that_fails_midway_keeps_the_old_folder(tiny_generator, tmp_path, capsys, monkeypatch):
    import weightdiff.sampling as sampling

    out = tmp_path / "samples"
    assert run(capsys, sample_args(tiny_generator, out, "--num", "2"))[0] == 0
    before = weights(out)
    real, calls = sampling.write_json, []

    def die_on_second_sample(path, obj):
        calls.append(Path(path).name)
        if calls.count("sample.json") == 2:
            raise KeyboardInterrupt
        real(path, obj)

    monkeypatch.setattr(sampling, "write_json", die_on_second_sample)
    status = main(sample_args(tiny_generator, out, "--num", "3", "--seed", "9", "--overwrite"))
    assert status == 130
    assert weights(out) == before
    assert temporaries(tmp_path, out) == []


# --------------------------------------------------------------------- descriptions it can read
def test_a_description_naming_no_angle_is_refused_for_a_family_that_needs_one(tiny_generator, tmp_path, capsys):
    out = tmp_path / "samples"
    one_error(capsys, sample_args(tiny_generator, out, "--description", "handwritten digits, nothing special"),
              "--description", "angle", "rotdigits")
    assert not out.exists() or not any(out.iterdir())


def test_a_spelled_out_angle_is_read_and_sample_json_records_what_reached_the_model(tiny_generator, tmp_path,
                                                                                     capsys):
    out = tmp_path / "samples"
    text = "digits rotated by sixty-five degrees to the right"
    assert run(capsys, sample_args(tiny_generator, out, "--description", text, "--num", "1"))[0] == 0
    cond = json.loads((out / "sample_0000" / "sample.json").read_text())["condition"]
    assert cond["description"] == text
    assert cond["parsed"] == {"angle": -65.0, "mirrored": False}
    assert cond["model_input"].startswith("text embedding + numeric features")
    shown = json.loads(cond["model_input"].split("=", 1)[1])
    a = math.radians(-65.0)
    # the features are written rounded to 4 decimals: at most 5e-5 from the exact values
    assert all(abs(got - want) <= 5e-5 for got, want in zip(shown, [math.cos(a), math.sin(a), 1.0, -1.0]))
    assert len(shown) == 4


def test_a_generator_without_the_numeric_path_warns_instead(gen, caplog):
    provider = gen.generator.cond
    mlp, provider.numeric_mlp = provider.numeric_mlp, None  # as TextCondition(use_numeric=False) builds it
    try:
        with caplog.at_level("WARNING"):
            cond = make_condition(gen, description="handwritten digits, nothing special")
    finally:
        provider.numeric_mlp = mlp
    assert "names no angle" in caplog.text
    assert cond.info["parsed"] == {"angle": None, "mirrored": False}
    assert cond.info["model_input"].startswith("text embedding only")


_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _spell(n: int) -> str:
    """A reference speller for 0..999 ("two hundred and forty-five")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + (f"-{_ONES[n % 10]}" if n % 10 else "")
    return f"{_ONES[n // 100]} hundred" + (f" and {_spell(n % 100)}" if n % 100 else "")


def test_words_to_number_reads_every_number_to_999_and_rejects_the_rest():
    from weightdiff.tasks.numeric import parse_description, words_to_number

    assert [words_to_number(_spell(n)) for n in range(1000)] == list(range(1000))
    assert words_to_number("Ninety Nine") == 99 and words_to_number("a hundred") == 100
    for bad in ("lots", "hundred", "one thousand", "twenty zero", "sixty sixty", "one hundred zero", ""):
        assert words_to_number(bad) is None, bad
    assert parse_description("turned two hundred and ten degrees anticlockwise").angle == 210.0
    assert parse_description("rotated by forty five, mirrored").angle == 45.0
    assert parse_description("turned one more time").angle is None  # a word without a unit needs "by"


# ------------------------------------------------------------------ options the model can't use
def test_examples_on_a_text_generator_are_rejected(tiny_generator, tmp_path, capsys):
    one_error(capsys, sample_args(tiny_generator, tmp_path / "s", "--examples", "5"),
              "--examples", "'text'", "--description")


class _Stub:
    """A generator as far as making a condition reads it."""

    def __init__(self, kind: str):
        self.config = {"model": {"condition": kind}, "zoo": {"family": "rotdigits"}, "data": {}}
        self.path = Path("stub")


@pytest.mark.parametrize("kind", ["code", "none"])
def test_examples_on_a_generator_of_another_kind_are_rejected(kind):
    with pytest.raises(ConditionError) as err:
        make_condition(_Stub(kind), task=TASK, examples=5)
    assert f"'{kind}'" in str(err.value) and "--examples" in str(err.value) and "accepts" in str(err.value)


# --------------------------------------------------------------------- a checkpoint as --model
def test_a_lightning_checkpoint_as_model_says_to_export_it(tiny_run, tmp_path, capsys):
    ckpt = next(tiny_run.glob("**/checkpoints/last.ckpt"))
    line = one_error(capsys, sample_args(ckpt, tmp_path / "s"), str(ckpt), "Lightning checkpoint", "weightdiff export")
    assert "not found" not in line


def test_a_generator_folder_as_export_ckpt_says_what_export_takes(tiny_generator, tmp_path, capsys):
    line = one_error(capsys, ["export", "--ckpt", str(tiny_generator), "--out", str(tmp_path / "g")],
                     str(tiny_generator), "is a folder", ".ckpt")
    assert "not found" not in line


# ------------------------------------------------------------------------- SIGTERM and sweeps
_SLOW_WRITE = """
import sys, time
import weightdiff.sampling as sampling
from weightdiff.cli import main

real = sampling.write_json

def slow(path, obj):
    if str(path).endswith("sample.json"):
        print("writing", path, flush=True)
        time.sleep(120)
    real(path, obj)

sampling.write_json = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_while_writing_leaves_no_temporaries_and_a_rerun_works(tiny_generator, tmp_path, capsys):
    script = tmp_path / "slow_sample.py"
    script.write_text(_SLOW_WRITE)
    out = tmp_path / "samples"
    args = sample_args(tiny_generator, out, "--num", "2")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "writing" not in line:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.poll() is None, "the sample run never reached its first write"
            line = proc.stdout.readline()
        assert temporaries(out)  # mid-write: the sample's temporary folder exists
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == SIGTERM_STATUS
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert temporaries(tmp_path, out) == []
    assert run(capsys, args)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000", "sample_0001"]


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_the_next_run_sweeps_temporaries_a_killed_run_left(tiny_generator, tmp_path, capsys):
    out = tmp_path / "samples"
    old = time.time() - 3600
    left = [out / ".sample_0001.tmp-k1ll3d", tmp_path / ".samples.tmp-k1ll3d", out / f".sample_0000.old-{_dead_pid()}"]
    for path in left:
        path.mkdir(parents=True)
        (path / "adapter_model.safetensors").write_bytes(b"half")
    os.utime(left[0], (old, old))
    os.utime(left[1], (old, old))  # the third is stale by its pid alone
    unrelated = tmp_path / ".other.tmp-k1ll3d"
    unrelated.mkdir()
    os.utime(unrelated, (old, old))
    assert run(capsys, sample_args(tiny_generator, out, "--num", "2"))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["sample_0000", "sample_0001"]
    assert not any(p.exists() for p in left)
    assert unrelated.exists()  # another folder's temporaries are not this run's business


def test_a_fresh_temporary_of_a_live_writer_is_kept(tmp_path):
    from weightdiff.outputs import sweep_temporaries

    live = tmp_path / "out" / ".sample_0000.tmp-live"
    mine = tmp_path / "out" / f".sample_0001.old-{os.getpid()}"
    live.mkdir(parents=True)
    mine.mkdir()
    assert sweep_temporaries(tmp_path / "out") == []
    assert live.exists() and mine.exists()


# ------------------------------------------------------------------------------- the caches
def _cache_files(root: Path) -> list[Path]:
    return sorted((root / "samples").glob("*.safetensors"))


def test_an_unwritable_cache_folder_is_warned_about_and_skipped(tiny_generator, tmp_path, capsys, caplog,
                                                                 monkeypatch):
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("WEIGHTDIFF_CACHE", str(blocker / "cache"))
    args = [a for a in sample_args(tiny_generator, tmp_path / "s", "--num", "2") if a != "--no-cache"]
    with caplog.at_level("WARNING"):
        assert run(capsys, args)[0] == 0
    assert len(list((tmp_path / "s").iterdir())) == 2
    assert "cannot write the sample cache" in caplog.text and str(blocker) in caplog.text


def test_an_unwritable_text_cache_is_warned_about_and_skipped(tmp_path, caplog):
    from weightdiff.models.conditioning import TextEncoder, text_encoder

    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    shared = text_encoder()
    enc = TextEncoder(cache_dir=blocker / "text")
    enc._model, enc._tokenizer = shared._model, shared._tokenizer  # the loaded model, if any: saves seconds
    text = f"digits rotated by 33 degrees, unwritable cache {time.time_ns()}"
    with caplog.at_level("WARNING"):
        emb = enc.encode(text)
    assert "cannot write the text-embedding cache" in caplog.text and str(blocker) in caplog.text
    torch.testing.assert_close(emb, shared.encode(text))


def test_a_truncated_sample_cache_file_is_discarded_and_regenerated(tiny_generator, tmp_path, capsys, caplog,
                                                                     monkeypatch):
    monkeypatch.setenv("WEIGHTDIFF_CACHE", str(tmp_path / "cache"))
    args = [a for a in sample_args(tiny_generator, tmp_path / "a", "--num", "2") if a != "--no-cache"]
    assert run(capsys, args)[0] == 0
    (cached,) = _cache_files(tmp_path / "cache")
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    args[args.index("--out") + 1] = str(tmp_path / "b")
    with caplog.at_level("WARNING"):
        assert run(capsys, args)[0] == 0
    assert str(cached) in caplog.text and "discarding" in caplog.text
    assert weights(tmp_path / "a") == weights(tmp_path / "b")
    assert load_weights(cached)["tokens"].shape[0] == 2  # regenerated whole


# ------------------------------------------------------------------------ validation at the edge
@pytest.mark.parametrize("extra, needle", [
    (["--batch-size", "0", "--select-with", "10"], "--batch-size"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 64 - 6), "--num", "8"], "--seed"),
    (["--seed", str(2 ** 63 - 1), "--num", "2"], "2**63"),
    (["--description", "digits rotated by 40 degrees \udcff"], "--description"),
    (["--task", "rotdigits:angle=1_5"], "'1_5'"),
    (["--task", "rotdigits:angle=\u0661\u0665"], "angle"),
], ids=["batch-size-0", "steps-0", "steps-negative", "seed-negative", "seed-near-2**64", "last-seed-2**63",
        "bad-utf8", "underscore-digits", "arabic-indic-digits"])
def test_bad_values_are_one_line_errors_and_nothing_is_written(tiny_generator, tmp_path, capsys, extra, needle):
    out = tmp_path / "samples"
    one_error(capsys, sample_args(tiny_generator, out, *extra), needle)
    assert not out.exists() or not any(out.iterdir())


def test_the_last_seed_below_2_63_is_accepted(tiny_generator, tmp_path, capsys):
    assert run(capsys, sample_args(tiny_generator, tmp_path / "s", "--seed", str(2 ** 63 - 2), "--num", "2"))[0] == 0
    seeds = [json.loads((d / "sample.json").read_text())["seed"] for d in sorted((tmp_path / "s").iterdir())]
    assert seeds == [2 ** 63 - 2, 2 ** 63 - 1]


@pytest.mark.parametrize("text", ["rotdigits:angle=1_5", "rotdigits:angle=\u0663\u0660", "rotdigits:angle=30,flip=0_1",
                                  "rotdigits:angle=\uff13\uff10"])
def test_task_numbers_take_ascii_digits_only(text):
    with pytest.raises(TaskStringError) as err:
        get_task(text)
    assert repr(text.split(":")[1].split(",")[-1].split("=")[1]) in str(err.value)
    assert get_task("rotdigits:angle=+1.5e1,flip=+1").name == "rotdigits:angle=15,flip=1"


def test_num_has_a_documented_cap(gen, capsys):
    from weightdiff.sampling import MAX_SAMPLES, check_request

    with pytest.raises(ConditionError, match=f"--num must be a whole number in \\[1, {MAX_SAMPLES}\\]"):
        check_request(MAX_SAMPLES + 1, SamplerSettings(), 64)
    check_request(MAX_SAMPLES, SamplerSettings(), 64)
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert str(MAX_SAMPLES) in capsys.readouterr().out
    with pytest.raises(ConditionError, match="--steps"):
        SamplerSettings(steps=0)
    from weightdiff.sampling import WeightDiffusionPipeline

    pipe = WeightDiffusionPipeline.from_pretrained(gen.path)
    with pytest.raises(ConditionError, match="--steps"):  # 0 steps is not "the generator's default"
        pipe.settings(num_inference_steps=0)


def test_samples_stream_to_disk_one_batch_at_a_time(gen, tmp_path, monkeypatch):
    import weightdiff.sampling as sampling

    real, seen = sampling._generate, []

    def watch(g, cond, num, settings, **kw):
        seen.append((num, settings.seed, sorted(p.name for p in out.iterdir() if not p.name.startswith("."))))
        return real(g, cond, num, settings, **kw)

    monkeypatch.setattr(sampling, "_generate", watch)
    out = tmp_path / "s"
    cond = make_condition(gen, task=TASK)
    settings = SamplerSettings(steps=2, seed=3)
    dirs, info = sampling.sample(gen, cond, 5, settings, out, batch_size=2, use_cache=False, progress=False)
    assert [(n, s) for n, s, _ in seen] == [(2, 3), (2, 5), (1, 7)]  # one batch per call
    assert [len(names) for _, _, names in seen] == [0, 2, 4]  # earlier batches already on disk
    assert dirs == [out / f"sample_{i:04d}" for i in range(5)]
    whole, _ = generate_tokens(gen, cond, 5, settings, batch_size=2, use_cache=False, progress=False)
    for i, d in enumerate(dirs):  # the same batches as one request: bit-identical
        meta = json.loads((d / "sample.json").read_text())
        assert (meta["index"], meta["seed"]) == (i, 3 + i)
        expected = gen.tokenizer.decode(whole[i], base=None)
        got = load_weights(d / "adapter_model.safetensors")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)

