"""The ``weightdiff`` command line: help with defaults, one-line errors, defaults shared with the library.

Everything runs ``weightdiff.cli.main(argv)`` in this process except ``--version``, which checks
``python -m weightdiff`` itself.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from typing import get_args

import pytest

from tests.conftest import REPO
from weightdiff import __version__, commands
from weightdiff.cli import build_parser, main

SUBCOMMANDS = ["zoo build", "zoo info", "zoo verify", "export", "sample", "evaluate", "benchmark", "diagnose", "demo"]
WITH_DEFAULTS = {"zoo build": "default: checkpoints_zoo", "zoo info": "default: False", "sample": "default: 4",
                 "evaluate": "default: test", "benchmark": "default: 32", "diagnose": "default: null",
                 "demo": "default: runs/demo"}


def _exit_status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # --help exits by itself
        return exc.code


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_lists_its_options_and_defaults(command, capsys):
    assert _exit_status([*command.split(), "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: weightdiff") and "Traceback" not in out
    if command in WITH_DEFAULTS:
        assert WITH_DEFAULTS[command] in " ".join(out.split()), out  # help wraps lines anywhere


def test_top_level_help_lists_every_subcommand_but_test(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "validate", "zoo", "export", "sample", "evaluate", "benchmark", "demo"):
        assert f"    {name} " in out, name
    assert "    test " not in out  # there is no test_step: LightningCLI `test` would crash


def test_top_level_help_lists_the_global_options_with_their_defaults(capsys):
    assert _exit_status(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "usage: weightdiff [-v] [-q] [--threads THREADS]" in out
    for option in ("-v, --verbose", "-q, --quiet", "--threads THREADS"):
        assert option in out, option
    assert "OMP_NUM_THREADS" in out and "default: null" in out


@pytest.mark.parametrize("command", ["test", "predict"])
def test_lightning_test_and_predict_are_rejected_in_one_line_naming_the_subcommands(command, capsys):
    assert _exit_status([command, "--config", "configs/tiny.yaml"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"weightdiff: error: argument command: invalid choice: '{command}'"), line
    assert "'fit', 'validate'" in line and "'test'" not in line.split("choose from")[1]


@pytest.mark.parametrize("yaml_text, needle", [("trainer:\n  max_stepz: 3\n", "'trainer.max_stepz'"),
                                               ("trainer: [a\n  b: :\n", "Problems parsing config"),
                                               (None, "data.zoo")])
def test_a_bad_lightning_config_is_one_line_naming_the_file_and_key(yaml_text, needle, tmp_path, capsys):
    """LightningCLI's own parse errors: one line (no usage dump listing subcommands `test`/`predict`,
    which are not weightdiff's), naming the config file, pointing at `weightdiff fit --help`."""
    config = tmp_path / "bad.yaml"
    argv = ["fit"]
    if yaml_text is not None:
        config.write_text(yaml_text)
        argv += ["--config", str(config)]
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightdiff: error: "), captured.err[-3000:]
    assert needle in lines[0] and lines[0].endswith("(see `weightdiff fit --help`)"), lines[0]
    if yaml_text is not None:
        assert f"fit --config {config}: " in lines[0]
    assert "predict" not in captured.err + captured.out


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--model", "m", "--out", "o", "--bogus", "1"], "unrecognized arguments: --bogus"),
    (["zoo", "build", "--config", "x.yaml", "--nope"], "unrecognized arguments: --nope"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    (["sample", "--model", "m", "--out", "o", "--sampler", "foo"], "Given value: foo"),
    (["sample", "--model", "m", "--out", "o", "--num", "four"], "num"),
    (["zoo"], "zoo.command"),
    (["evaluate", "--task", "digits"], "evaluate.weights"),
    (["--threads", "two", "sample"], 'Parser key "threads"'),
    (["sample", "--model", "m", "--out", "o", "--threads", "2"], "the global options go before the subcommand"),
])
def test_a_bad_option_is_one_line_and_exit_2(argv, needle, capsys):
    assert _exit_status(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "usage:" not in captured.err
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightdiff: error: ") and needle in lines[0], captured.err
    assert "--help`)" in lines[0]  # points at the subcommand's option list


def test_options_are_dashed_and_bool_options_are_flags():
    parser = build_parser()
    base = ["sample", "--model", "m", "--out", "o", "--task", "t"]
    ns = parser.parse_args([*base, "--select-with", "5", "--batch-size", "8", "--no-cache"]).sample
    assert (ns.select_with, ns.batch_size, ns.no_cache) == (5, 8, True)
    assert parser.parse_args([*base, "--no-cache", "false"]).sample.no_cache is False
    ns = parser.parse_args(["zoo", "info", "z", "--json"]).zoo.info
    assert (ns.path, ns.json) == ("z", True)
    ns = parser.parse_args(["benchmark", "--suite", "adapt-lora", "--zoo", "z", "--out", "o", "--from-description",
                            "--sgd-ks", "[1, all]"]).benchmark
    assert ns.from_description is True and list(ns.sgd_ks) == [1, "all"]
    assert parser.parse_args(["evaluate", "--task", "t", "--weights", "[a, b]"]).evaluate.weights == ["a", "b"]


@pytest.mark.parametrize("command", ["sample", "benchmark"])
def test_sampler_and_steps_default_to_the_generators(command):
    required = {"sample": ["--model", "m", "--out", "o", "--task", "t"],
                "benchmark": ["--suite", "adapt-lora", "--zoo", "z", "--out", "o", "--model", "m"]}[command]
    ns = build_parser().parse_args([command, *required])[command]
    assert ns.sampler is None and ns.steps is None


def _defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_cli_defaults_are_the_librarys():
    """Where a subcommand and the library function it calls share an option, they share its default."""
    from dataclasses import fields

    from weightdiff.demo import run_demo
    from weightdiff.evaluate.benchmark import run_benchmark
    from weightdiff.evaluate.weights import evaluate_weights
    from weightdiff.models.schedule import SamplerName
    from weightdiff.sampling import SamplerSettings, sample, select_best
    from weightdiff.zoo import run_build

    # steps, sampler and latent_noise default to the generator's own (None) on the command line
    settings = {f.name: f.default for f in fields(SamplerSettings) if f.name not in ("steps", "sampler", "latent_noise")}
    pairs = [(commands.sample, {**settings, **_defaults(sample), **_defaults(select_best)}),
             (commands.benchmark, _defaults(run_benchmark)), (commands.evaluate, _defaults(evaluate_weights)),
             (commands.zoo_build, _defaults(run_build)), (commands.demo, _defaults(run_demo))]
    for fn, library in pairs:
        shared = {k: v for k, v in _defaults(fn).items() if k in library and k != "shard"}  # "0/1" is (0, 1)
        assert shared, fn.__name__
        for name, value in shared.items():
            assert value == library[name], f"{fn.__name__} --{name}: {value!r} != {library[name]!r}"
    assert get_args(commands.Sampler) == get_args(SamplerName)


class _Stop(Exception):
    """Raised by a stub to end a run once it has seen what the test checks."""


@pytest.mark.parametrize("training, expected", [
    ({"functional_loss_weight": 0.0}, 0.0),
    # a latent generator's task loss is its autoencoder's: the hypernetwork gets it too
    ({"functional_loss_weight": 0.0, "latent_tokens": 1, "autoencoder_functional_weight": 2.5}, 2.5),
    ({"functional_loss_weight": 0.0, "latent_tokens": 0, "autoencoder_functional_weight": 2.5}, 0.0),
])
def test_benchmark_takes_sampler_and_hypernet_loss_weight_from_the_generator(tiny_lora_zoo, tmp_path, monkeypatch,
                                                                             training, expected):
    """A generator trained with functional loss weight 0 gets a hypernetwork baseline at 0, not 1."""
    import weightdiff.evaluate.benchmark as bench

    class Stub:
        kind = "lora"
        config = {"zoo": {"family": "rotdigits"}, "model": {"condition": "code"},
                  "training": training, "sampling": {"sampler": "x0", "steps": 3}}

    seen = {}

    def fit_hypernets(self, steps, functional_loss_weight):
        seen["functional_loss_weight"] = functional_loss_weight
        return {}

    def generate_tokens(gen, cond, num, settings, **kw):
        seen["settings"] = settings
        raise _Stop

    monkeypatch.setattr(bench, "load_generator", lambda path: Stub())
    monkeypatch.setattr(bench.ZooState, "fit_hypernets", fit_hypernets)
    monkeypatch.setattr(bench, "make_condition", lambda gen, **kw: None)
    monkeypatch.setattr(bench, "generate_tokens", generate_tokens)
    with pytest.raises(_Stop):
        main(["benchmark", "--suite", "adapt-lora", "--model", "stub", "--zoo", str(tiny_lora_zoo),
              "--out", str(tmp_path / "bench"), "--hypernet-steps", "1"])
    assert seen["functional_loss_weight"] == expected
    assert (seen["settings"].sampler, seen["settings"].steps) == ("x0", 3)


def test_version_of_python_m_weightdiff():
    proc = subprocess.run([sys.executable, "-m", "weightdiff", "--version"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == f"weightdiff {__version__}", proc.stderr
