"""The ``weightdiff`` process: start-up imports, log output, library chatter, threads and SIGTERM.

Subprocess tests run ``python -m weightdiff`` of this checkout (``cwd`` is its repository root)
on one intra-op thread; the others call :func:`weightdiff.cli.main` in this process, with a stub
in place of the ``export`` subcommand where the test needs a command that does one thing.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import fit_args
from weightdiff import cli
from weightdiff.cli import main
from weightdiff.io import atomic_path

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "peft", "transformers")
TASK = "rotdigits:angle=30"
STUB = ["export", "--ckpt", "c", "--out", "o"]  # runs the stub of `_stub_command`
EXIT_SIGTERM = 143
CHATTER = ("GPU available", "TPU available", "Tip:", "LeafSpec", "is deprecated", "Initializing distributed")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _stub_command(monkeypatch, body: Callable[[], None]) -> None:
    """``weightdiff export ...`` runs ``body()`` instead."""

    def export(ckpt: str, out: str) -> None:
        """Stub subcommand.

        Args:
            ckpt: unused.
            out: unused.
        """
        body()

    monkeypatch.setitem(cli.COMMANDS, "export", export)


# ----------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["sample", "--help"], ["zoo", "build", "--help"]])
def test_help_and_version_import_no_torch_lightning_peft_or_transformers(args):
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "weightdiff", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
                if line.startswith("import time:") and line.count("|") == 2}
    assert "weightdiff.cli" in imported  # the import log covers the CLI's own imports
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, f"`weightdiff {' '.join(args)}` imports {heavy[:10]}"


# ------------------------------------------------------------------------------------ logging
@pytest.mark.parametrize("flags, shown", [([], ("info", "warning")), (["-v"], ("debug", "info", "warning")),
                                          (["--verbose"], ("debug", "info", "warning")), (["-q"], ("warning",)),
                                          (["--quiet"], ("warning",))])
def test_weightdiff_log_records_reach_stderr_as_bare_lines_from_the_chosen_level(flags, shown, monkeypatch, capsys):
    def body() -> None:
        log = logging.getLogger("weightdiff.some.module")
        log.debug("debug line")
        log.info("info line")
        log.warning("warning line")

    _stub_command(monkeypatch, body)
    assert main([*flags, *STUB]) == 0
    assert capsys.readouterr().err.splitlines() == [f"{level} line" for level in shown]
    assert not logging.getLogger("weightdiff").handlers  # main leaves no handler behind


def test_verbose_and_quiet_together_is_one_line_and_exit_2(capsys):
    assert main(["-v", "-q", *STUB]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("weightdiff: error: ") and "-v/--verbose" in line and "-q/--quiet" in line


_SAMPLE_ON_LIGHTNING = """
import functools, logging, sys
import weightdiff.training.predict as predict

def one_device(*args, **kwargs):  # Lightning's predict loop, in this one process
    logging.getLogger("weightdiff.check").info("predicting on one device")
    return real(*args, **{**kwargs, "trainer_kwargs": {"accelerator": "cpu", "devices": 1}})

real, predict.predict_tokens = predict.predict_tokens, one_device
from weightdiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sample_through_lightning_prints_no_device_banner_tips_or_deprecations(tiny_generator, tmp_path):
    """`sample --devices N` runs Lightning's predict loop: its device lines, product tips and the
    deprecation notes about its own internals stay out of stderr, while weightdiff's INFO lines
    reach it."""
    out = tmp_path / "samples"
    args = ["sample", "--model", str(tiny_generator), "--out", str(out), "--task", TASK, "--num", "2",
            "--steps", "2", "--no-cache", "--devices", "2"]
    proc = subprocess.run([sys.executable, "-c", _SAMPLE_ON_LIGHTNING, *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.iterdir())) == 2
    assert "predicting on one device\n" in proc.stderr, proc.stderr[-3000:]  # may follow a progress bar's \r
    chatter = [line for line in proc.stderr.splitlines() if any(c in line for c in CHATTER)]
    assert not chatter, chatter


# ------------------------------------------------------------------------------------ threads
def test_threads_sets_torch_threads_and_omp_num_threads_for_the_command(monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seen = []
    _stub_command(monkeypatch, lambda: seen.append((torch.get_num_threads(), os.environ["OMP_NUM_THREADS"])))
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "2", *STUB]) == 0
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert main(STUB) == 0  # no --threads: OMP_NUM_THREADS and torch's threads as they were
    finally:
        torch.set_num_threads(before)
    assert seen == [(2, "2"), (before, "1")]


def test_threads_below_one_is_one_line_and_exit_2(monkeypatch, capsys):
    _stub_command(monkeypatch, lambda: pytest.fail("the command ran"))
    assert main(["--threads", "0", *STUB]) == 2
    assert capsys.readouterr().err.splitlines() == ["weightdiff: error: --threads must be at least 1, got 0"]


# ------------------------------------------------------------------------------------ SIGTERM
class _Unhandled(Exception):
    """Raised by the test's own SIGTERM handler: main did not install one."""


def _unhandled(signum, frame) -> None:
    raise _Unhandled


@pytest.fixture
def sigterm_guard():
    """A SIGTERM handler of the test's own while the test runs: without main's, the signal raises
    :class:`_Unhandled` instead of killing the test process."""
    previous = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_stops_a_command_with_143_and_leaves_no_half_written_file(sigterm_guard, monkeypatch, tmp_path,
                                                                         capsys):
    dest, ran_on = tmp_path / "out" / "result.json", []

    def body() -> None:
        with atomic_path(dest) as tmp:
            tmp.write_text("{half")
            signal.raise_signal(signal.SIGTERM)
            time.sleep(5)  # not reached: the handler unwinds the command
            ran_on.append("after SIGTERM")

    _stub_command(monkeypatch, body)
    assert main(STUB) == EXIT_SIGTERM
    assert not ran_on
    assert list(dest.parent.iterdir()) == []  # neither result.json nor its temporary file
    assert capsys.readouterr().err.splitlines()[-1] == "weightdiff: terminated (SIGTERM)"
    assert signal.getsignal(signal.SIGTERM) is _unhandled  # main restored the handler it replaced


def test_sigterm_that_lightning_stops_on_cleanly_still_exits_143(sigterm_guard, monkeypatch):
    """Lightning's handler chains to the one in place and its loop then raises ``SystemExit`` with no
    code at the end of the step; main's handler must let the step finish, and main turn the exit into 143."""
    from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    steps = []

    def body() -> None:
        notified = []
        trainer_handler = _HandlersCompose([lambda signum, frame: notified.append(signum),
                                            signal.getsignal(signal.SIGTERM)])
        outer = signal.signal(signal.SIGTERM, trainer_handler)
        try:
            signal.raise_signal(signal.SIGTERM)
            steps.append(notified == [signal.SIGTERM])  # the step went on to its end
        finally:
            signal.signal(signal.SIGTERM, outer)
        raise SIGTERMException

    _stub_command(monkeypatch, body)
    assert main(STUB) == EXIT_SIGTERM
    assert steps == [True]


def test_sigterm_during_fit_exits_143(tiny_lora_zoo, tmp_path):
    """A real `weightdiff fit` (Lightning stops it; it used to exit 0 then), SIGTERM sent once the
    first checkpoint is written."""
    args = fit_args(tiny_lora_zoo, tmp_path, "--trainer.max_steps", "100000")
    proc = subprocess.Popen([sys.executable, "-m", "weightdiff", *args], cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("**/checkpoints/last.ckpt")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    assert err.splitlines()[-1] == "weightdiff: terminated (SIGTERM)"
