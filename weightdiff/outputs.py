"""Output folders that hold one run's results: never mixed, replaced whole, cleaned after a kill.

:func:`output_folder` hands out the folder a set of results is written into: a new or empty one
as it is, a non-empty one only when the caller asks to replace it, and then as a temporary
sibling that replaces it atomically when complete (:func:`weightdiff.io.atomic_path`). Writes
are atomic, so a killed run leaves hidden temporaries (``.<name>.tmp-*``, ``.<name>.old-<pid>*``);
:func:`sweep_temporaries` removes those of runs that are gone. :func:`terminate_as_exit` makes
SIGTERM unwind like Ctrl-C, so the temporaries of a run stopped by a scheduler are removed at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from weightdiff.errors import OutputPathError
from weightdiff.io import atomic_path, check_writable
from weightdiff.runtime import Terminated

log = logging.getLogger(__name__)

# A temporary entry this much older than now is taken as left by a killed writer: a live writer
# refreshes it with every file or sample it completes.
STALE_TEMPORARY_SECONDS = 30.0
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?:tmp-.*|old-(?P<pid>[0-9]+)(?:-.*)?)")  # atomic_path's names


def _writer_gone(pid: str | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False
    return False


def sweep_temporaries(out: str | Path) -> list[Path]:
    """Remove what killed writes left in and beside ``out``; returns what was removed.

    In ``out`` every ``.<name>.tmp-*`` / ``.<name>.old-<pid>*`` entry, beside it those of ``out``'s
    own name, when its writer process is gone or it is older than :data:`STALE_TEMPORARY_SECONDS`.
    """
    out = Path(out)
    found = []
    for folder, own in ((out, None), (out.parent, out.name)):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = _TEMPORARY.fullmatch(path.name)
            if match and own in (None, match["name"]):
                found.append((path, match))
    removed = []
    now = time.time()
    for path, match in found:
        try:
            stale = _writer_gone(match["pid"]) or now - path.lstat().st_mtime > STALE_TEMPORARY_SECONDS
        except FileNotFoundError:
            continue
        if stale:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("removed %d temporary entries left by interrupted runs: %s", len(removed),
                    ", ".join(str(p) for p in removed[:3]) + (", ..." if len(removed) > 3 else ""))
    return removed


@contextlib.contextmanager
def output_folder(out: str | Path, *, overwrite: bool = False, what: str = "sample folder") -> Iterator[Path]:
    """Yield the folder to write a set of results into: ``out`` itself when it is new or empty.

    A non-empty ``out`` is refused (results of two runs would mix) unless ``overwrite``: then
    the block writes into a temporary sibling that replaces ``out`` as a whole when it succeeds.
    Stale temporaries are swept first (:func:`sweep_temporaries`).

    Args:
        out: the folder (``--out``).
        overwrite: replace a non-empty ``out``.
        what: what the folder holds, for messages.

    Raises:
        OutputPathError: ``out`` is a file, cannot be written, or holds entries and not ``overwrite``.
    """
    out = Path(out)
    if not check_output_folder(out, overwrite=overwrite, what=what):
        out.mkdir(parents=True, exist_ok=True)
        yield out
    else:
        with atomic_path(out, directory=True) as tmp:
            yield tmp


def check_output_folder(out: str | Path, *, overwrite: bool = False, what: str = "sample folder") -> list[str]:
    """Check, before long work, that results may be written to ``out``; returns the names it holds.

    Sweeps stale temporaries (:func:`sweep_temporaries`) first.

    Raises:
        OutputPathError: ``out`` is a file, cannot be written, or holds entries and not ``overwrite``.
    """
    out = check_writable(out, what)
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"--out {out} ({what}) is a file, not a folder")
    sweep_temporaries(out)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if held and not overwrite:
        raise OutputPathError(f"--out {out} already holds {len(held)} entries ({', '.join(held[:2])}"
                              f"{', ...' if len(held) > 2 else ''}), which would mix with the new results; "
                              "pass --overwrite to replace the folder, or choose another --out")
    return held


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`~weightdiff.runtime.Terminated` (exit 143): cleanup runs as on Ctrl-C.

    A Python handler already installed for SIGTERM is called first (it may record the signal or
    raise itself); it is restored when the block ends. An ignored SIGTERM stays ignored, and off
    the main thread, where handlers cannot be set, the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous == signal.SIG_IGN:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if callable(previous):
            previous(signum, frame)
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
