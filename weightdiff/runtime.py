"""How a weightdiff process runs: where its log records go, CPU threads, and what SIGTERM does.

:func:`weightdiff.cli.main` sets these up once, before a subcommand runs. Nothing here imports
torch or Lightning at import time (``weightdiff --help`` stays fast).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from types import FrameType

from weightdiff.errors import ConditionError

PACKAGE_LOGGER = "weightdiff"
LOG_FORMAT = "%(message)s"
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143: the status a shell reports for a process ended by SIGTERM
# Loggers whose INFO records are device banners and product tips ("GPU available: ...",
# "💡 Tip: ..."): worth a line when training, noise in a command that only runs a model.
LIBRARY_LOGGERS = ("lightning.pytorch", "lightning.fabric")
# Warnings libraries raise about their own internals, which no weightdiff user can act on.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),  # torch's pytree, in Lightning's loops
    (FutureWarning, r"torch\.distributed\.nn\.functional\.all_gather is deprecated"),  # Lightning's all_gather
    # PEFT forgets a folder name that weightdiff never loads from: the base is built from its own files.
    (UserWarning, r"The PEFT config's `base_model_name_or_path` was renamed"),
)


# ----------------------------------------------------------------------------------- logging
class _Stderr(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is when a record arrives (tests swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def log_to_stderr(level: int = logging.INFO) -> Iterator[None]:
    """Print weightdiff's log records from ``level`` up on stderr, as bare messages, for the block.

    The handler sits on the ``weightdiff`` logger, not the root: other libraries keep their own
    output (Lightning, finding no handler on the root logger, prints each of its lines once, as
    it does on its own). Records still propagate to the root logger. The previous level is
    restored and the handler removed afterwards.

    Args:
        level: the lowest level shown (``logging.DEBUG``, ``INFO`` or ``WARNING``).
    """
    handler = _Stderr()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package = logging.getLogger(PACKAGE_LOGGER)
    previous = package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.setLevel(previous)
        package.removeHandler(handler)


@contextlib.contextmanager
def quiet_library_warnings() -> Iterator[None]:
    """Ignore the :data:`LIBRARY_WARNINGS` for the block (the warning filters are restored after)."""
    with warnings.catch_warnings():
        for category, message in LIBRARY_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        yield


@contextlib.contextmanager
def quiet_library_chatter() -> Iterator[None]:
    """For a block that runs a model but trains nothing: the :data:`LIBRARY_LOGGERS` log warnings
    only, and the :data:`LIBRARY_WARNINGS` are ignored.

    Enter it once Lightning is imported: importing Lightning sets its loggers' levels.
    """
    loggers = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        with quiet_library_warnings():
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


# ----------------------------------------------------------------------------------- threads
def set_threads(threads: int | None) -> None:
    """Run torch's CPU ops on ``threads`` threads here and in the processes started from here.

    Several weightdiff processes on one machine should share its cores (e.g. two processes with
    ``threads=1`` on two cores): each one running a thread per core makes them all wait on each
    other's descheduled threads, tens of times slower.

    Args:
        threads: intra-op threads, exported as ``OMP_NUM_THREADS`` for child processes (DDP
            workers, scripts); ``None`` leaves torch's choice: ``OMP_NUM_THREADS`` if set, else one
            thread per core.

    Raises:
        ConditionError: ``threads`` is below 1.
    """
    if threads is None:
        return
    if threads < 1:
        raise ConditionError(f"--threads must be at least 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch  # not at module level: `weightdiff --help` imports no torch

    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------- SIGTERM
class Terminated(SystemExit):
    """SIGTERM arrived: unwinds the running command with status :data:`EXIT_SIGTERM`.

    A ``SystemExit`` so that ``except Exception`` does not swallow it, while ``finally`` blocks and
    :func:`weightdiff.io.atomic_path` (which cleans up on any exception) still run.
    """

    def __init__(self) -> None:
        super().__init__(EXIT_SIGTERM)


def _lightning_stops_training() -> bool:
    """Whether the SIGTERM handler now in place is a Lightning trainer's (it chains to the previous one)."""
    return type(signal.getsignal(signal.SIGTERM)).__module__.startswith("lightning.")


@contextlib.contextmanager
def sigterm_exits() -> Iterator[list[int]]:
    """Turn SIGTERM into :class:`Terminated` for the block; yields the list of SIGTERMs received.

    While a Lightning trainer runs, its own handler is in front: it calls this one, then stops at
    the end of the current step with ``SystemExit`` and no code, which would exit 0. The handler
    then only records the signal, and the caller turns that exit into :data:`EXIT_SIGTERM`. Off
    the main thread (where handlers cannot be set) the block runs unchanged.
    """
    received: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if not _lightning_stops_training():
            raise Terminated

    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
