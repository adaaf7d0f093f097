"""Safe, atomic file I/O shared by every part of weightdiff.

Weights are read and written as safetensors only (nothing is unpickled), and every write goes to
a temporary name in the destination folder first and is then renamed into place, so a reader
never sees a half-written file or directory, even after a kill.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weightdiff.errors import NonFiniteWeightsError, OutputPathError, WeightFileError

# pickle protocols 2-5 (PROTO opcode + version), zip container of torch.save
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    Args:
        dest: final file or directory path.
        directory: yield an (empty, existing) temporary directory instead of a file path.

    On an exception the temporary file or directory is removed and ``dest`` is left untouched.
    An existing ``dest`` is replaced (a directory is replaced as a whole).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}.tmp-"
    if directory:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        if directory:
            if dest.exists():
                old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
                os.replace(dest, old)
                os.replace(tmp, dest)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, dest)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


# errno values that mean "this location cannot take the output" (a user's problem, not a bug)
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                               errno.EEXIST, errno.EISDIR})
_PROBE_BYTES = 1 << 16  # what a probe writes: enough to fail on a full disk, small enough to cost nothing


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Check, before long work, that ``path`` (a file or folder to be created) can be written.

    Walks up to the nearest existing ancestor, which must be a folder, and writes and removes a
    small probe file there, so a read-only mount, a permission problem or a full disk is found now
    rather than after the work. Returns ``path`` as a :class:`Path`.

    Raises:
        OutputPathError: naming ``path`` and the reason.
    """
    path = Path(path)
    anchor = path if path.is_dir() else path.parent
    while not anchor.exists():
        if anchor.is_symlink() or anchor.parent == anchor:  # a dangling link, or nothing exists at all
            break
        anchor = anchor.parent
    if not anchor.is_dir():
        raise OutputPathError(f"cannot write {what} {path}: {anchor} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".weightdiff-probe-", dir=anchor)
        try:
            os.write(fd, bytes(_PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise OutputPathError(f"cannot write {what} {path}: {exc.strerror or exc} (in {anchor})") from None
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, raising :class:`WeightFileError` naming the file when it is missing or corrupt."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightFileError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"{what} {path} is not valid JSON: {exc}") from None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor with NaN/Inf values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(f"{source}: tensor '{name}' has {bad} non-finite values (NaN/Inf)")


def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Atomically save tensors as safetensors (contiguous, de-aliased copies)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)


def load_weights(path: str | os.PathLike, *, check_nonfinite: bool = True) -> dict[str, torch.Tensor]:
    """Load a safetensors file; never unpickles.

    Raises:
        WeightFileError: the file is missing, truncated, corrupt, or a pickle/zip (``torch.save``)
            file placed where a safetensors file should be.
        NonFiniteWeightsError: a tensor holds NaN/Inf (unless ``check_nonfinite=False``).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightFileError(f"weight file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    # A safetensors file starts with a little-endian u64 header length, then the JSON header.
    header_len = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not (len(head) == 9 and head[8:9] == b"{" and 0 < header_len <= size - 8):
        # A truncated safetensors file keeps its '{' at byte 8 (its length prefix may start with 0x80).
        if head[8:9] != b"{" and any(head.startswith(m) for m in _PICKLE_MAGIC):
            raise WeightFileError(f"{path} is a pickle/torch.save file; only safetensors weights are accepted "
                                  "(pickles can execute code and are never loaded)")
        raise WeightFileError(f"{path} is not a safetensors file (bad header: {size} bytes, "
                              f"declared header length {header_len})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightFileError(f"{path} is not a readable safetensors file: {exc}") from None
    if check_nonfinite:
        check_finite(tensors, str(path))
    return tensors


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
