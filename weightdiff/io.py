"""Safe, atomic file I/O shared by every part of weightdiff.

Weights are read and written as safetensors only (nothing is unpickled), and every write goes to
a temporary name in the destination folder first and is then renamed into place, so a reader
never sees a half-written file or directory, even after a kill.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from weightdiff.errors import NonFiniteWeightsError, OutputPathError, WeightFileError

# pickle protocols 2-5 (PROTO opcode + version), zip container of torch.save
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")

# errno values that mean "this location cannot take the output" (a user's problem, not a bug)
UNWRITABLE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR,
                               errno.EEXIST, errno.EISDIR, errno.EFBIG, errno.ENAMETOOLONG})
#: The largest JSON file :func:`read_json` parses: weightdiff's own (rows, configs, results) are
#: kilobytes to a few megabytes; anything far larger is not one of them.
MAX_JSON_BYTES = 64 << 20
_PROC_STATUS = "/proc/self/status"  # Linux: the umask, readable without changing it
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2  # <fcntl.h>, <linux/fs.h>: renameat2 relative to the cwd, swap
_PUBLISH_TRIES = 100  # a folder publish retries when another process moves its destination in between
_MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) reports an OS error


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``Umask:`` in
    ``/proc/self/status``); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(_PROC_STATUS) as fh:
        for line in fh:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    """Remove a file, a link (never what it points to) or a folder tree; absent is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _make_temporary(dest: Path, directory: bool) -> Path:
    """A new temporary file or folder beside ``dest`` (creating the folders above it)."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file where a folder of the path should be
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), exc.filename) from None
    prefix = f".{dest.name}.tmp-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.close(fd)
    return Path(name)


def _apply_umask(path: Path) -> None:
    """Give ``path`` and everything in it the modes ``open``/``mkdir`` give under the umask.

    ``mkstemp``/``mkdtemp`` create 0600/0700, and safetensors replaces the file it saves by a
    private temporary (0600), so without this a published zoo, export or sample would be unreadable
    to the colleagues the umask lets read it. Executable bits are kept; links are left alone.
    """
    mask = _umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for top, dirs, files in os.walk(path):
            paths += [Path(top, name) for name in (*dirs, *files)]
    for p in paths:
        mode = p.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        full = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        if stat.S_IMODE(mode) != full & ~mask:
            os.chmod(p, full & ~mask)


@functools.cache
def _renameat2() -> Any:
    """libc's ``renameat2`` (Linux, glibc >= 2.28), or ``None`` where there is none."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step; ``False`` where the system or file system cannot.

    Raises:
        OSError: ``b`` (or ``a``) does not exist (``FileNotFoundError``), or another failure.
    """
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _publish_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder ``tmp`` to ``dest``, replacing whatever ``dest`` holds.

    Race-free: every one of several processes publishing the same ``dest`` succeeds, and ``dest``
    ends as one complete version (the last one published). Where the system can swap two names
    atomically (``renameat2(RENAME_EXCHANGE)``), readers always find a complete ``dest``; elsewhere
    the old version is renamed away first, and ``dest`` is absent for a moment.
    """
    for _ in range(_PUBLISH_TRIES):
        try:
            os.rename(tmp, dest)  # dest absent (or an empty folder)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        try:
            if _exchange(tmp, dest):
                _remove(tmp)  # which now holds the replaced version
                return
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:12]}")
            os.rename(dest, old)
        except FileNotFoundError:
            continue  # another process moved dest away in between: try again
        _remove(old)
    raise OutputPathError(f"cannot write {dest}: other processes kept replacing it ({_PUBLISH_TRIES} tries)")


def _inside(path: Path | None, folder: Path) -> bool:
    return path is not None and (path == folder or folder in path.parents)


def _unwritable(dest: Path, exc: OSError, tmp: Path) -> OutputPathError:
    """The :class:`OutputPathError` for ``exc``, naming ``dest`` (and the failing path, if another
    one that outlives the write)."""
    failed = Path(os.fsdecode(exc.filename)) if exc.filename is not None else None
    where = f" ({failed})" if failed is not None and failed != dest and not _inside(failed, tmp) else ""
    err = OutputPathError(f"cannot write {dest}: {exc.strerror or exc}{where}; nothing was written there")
    err.path = dest
    return err


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it to ``dest`` only if the block succeeds.

    Args:
        dest: final file or directory path.
        directory: yield an (empty, existing) temporary directory instead of a file path.

    On an exception the temporary file or directory is removed and ``dest`` is left untouched.
    An existing ``dest`` is replaced (a directory is replaced as a whole, race-free even when
    several processes publish it at once). The result has the mode ``open``/``mkdir`` would give
    under the process's umask.

    Raises:
        OutputPathError: naming ``dest``, for an ``OSError`` meaning the location cannot take the
            output (:data:`UNWRITABLE_ERRNOS`: read-only, full, not a folder...), from creating the
            temporary, from the block, or from the rename.
    """
    dest = Path(dest)
    try:
        tmp = _make_temporary(dest, directory)
    except OSError as exc:
        if exc.errno in UNWRITABLE_ERRNOS:
            raise _unwritable(dest, exc, dest) from exc
        raise
    try:
        yield tmp
        _apply_umask(tmp)
        if directory:
            _publish_dir(tmp, dest)
        else:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE_ERRNOS:
            raise _unwritable(dest, exc, tmp) from exc
        if isinstance(exc, OutputPathError) and _inside(getattr(exc, "path", None), tmp):
            # a nested write into the temporary folder: name what the user asked for
            err = OutputPathError(str(exc).replace(str(exc.path), str(dest / exc.path.relative_to(tmp)), 1))
            err.path = dest
            raise err from exc
        raise


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
    """Read JSON (UTF-8) of at most :data:`MAX_JSON_BYTES`.

    Args:
        path: the file.
        what: what the file is, for the messages ("manifest row", "zoo file"...).

    Raises:
        WeightFileError: naming the file, when it is missing, unreadable, larger than
            :data:`MAX_JSON_BYTES` (checked before reading it), not valid JSON, or nested too deeply
            for the parser.
    """
    path = Path(path)
    too_big = f"{what} {path} is larger than {MAX_JSON_BYTES} bytes: not a file weightdiff wrote"
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise WeightFileError(too_big)
        with open(path, "rb") as fh:
            data = fh.read(MAX_JSON_BYTES + 1)  # bounded: a pipe or device has no size to check
    except FileNotFoundError:
        raise WeightFileError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise WeightFileError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_JSON_BYTES:
        raise WeightFileError(too_big)
    try:
        return json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"{what} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise WeightFileError(f"{what} {path} is nested too deeply to parse: not a file weightdiff wrote") from None


def check_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensor with NaN/Inf values."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteWeightsError(f"{source}: tensor '{name}' has {bad} non-finite values (NaN/Inf)")


def save_weights(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    """Atomically save tensors as safetensors (contiguous, de-aliased copies).

    Raises:
        OutputPathError: ``path`` cannot be written (read-only, full, not a folder), naming it.
    """
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(clean, str(tmp), metadata=dict(metadata) if metadata else None)
        except SafetensorError as exc:
            # safetensors reports a full disk as "I/O error: ... (os error 28)": let atomic_path see an OSError
            code = _OS_ERROR.search(str(exc))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(tmp)) from exc


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


def safetensors_extent(path: str | os.PathLike) -> tuple[int, int]:
    """``(file bytes, tensor data bytes)`` that the header of safetensors file ``path`` declares.

    A safetensors file is an 8-byte little-endian header length, the JSON header (each tensor's
    ``data_offsets`` into the data that follows), and the data, so its size is
    ``8 + header length + the largest end offset``. Only the header is read, so a huge or sparse
    file is judged without reading its data.

    Raises:
        WeightFileError: the file is missing or its header is not a safetensors header (naming it).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            size = os.fstat(fh.fileno()).st_size
            if not 0 < header_len <= min(size - 8, _MAX_HEADER_BYTES):
                raise WeightFileError(f"{path} is not a safetensors file (bad header: {size} bytes, "
                                      f"declared header length {header_len})")
            header = json.loads(fh.read(header_len))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except FileNotFoundError:
        raise WeightFileError(f"weight file not found: {path}") from None
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise WeightFileError(f"{path} is not a safetensors file (unreadable header: {exc})") from None
    return 8 + header_len + end, end


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


#: The dtype of every weight tensor that is trained on, evaluated or verified: the target networks'
#: parameters are float32, and a zoo entry or sample of another dtype would be cast silently.
WEIGHT_DTYPE = torch.float32


def check_weight_dtypes(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`WeightFileError` naming the first tensor whose dtype is not :data:`WEIGHT_DTYPE`.

    Args:
        tensors: a checkpoint's tensors (a zoo entry, a sample), by name.
        source: the file or folder they were read from, named in the message.
    """
    for name, t in tensors.items():
        if t.dtype != WEIGHT_DTYPE:
            raise WeightFileError(f"{source}: tensor '{name}' has dtype {str(t.dtype).removeprefix('torch.')}, "
                                  f"expected {str(WEIGHT_DTYPE).removeprefix('torch.')} (the dtype of the target "
                                  "network's parameters)")
