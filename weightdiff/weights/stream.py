"""Encode and decode weight tokens a span at a time, and write a safetensors file as spans arrive.

Tokens ``[start, stop)`` of a :class:`~weightdiff.weights.layout.TokenLayout` hold one contiguous
range ``[p0, p1)`` of the flat parameter vector (tensors are laid out in order and every token
holds consecutive entries), so a span is packed from, or unpacked into, that range alone with the
same kernels as the whole sequence (:func:`~weightdiff.kernels.pack`,
:func:`~weightdiff.kernels.unpack`): chunked and whole-sequence results are bit-identical.

:class:`StreamingWeightWriter` writes a safetensors file whose header is known before any value
is (the layout fixes every tensor's dtype, shape and byte range), then the bytes of each span as
it is decoded, so a network of any size is written from memory bounded by one span.
:func:`read_span` reads a span's flat entries from a safetensors file through a memory map,
tensor slice by tensor slice, without loading the file.

Example::

    with StreamingWeightWriter(path, layout, metadata={"format": "pt"}) as writer:
        for start, tokens in spans_of_tokens:       # tokens (n, D), normalised
            writer.write_tokens(tokens, start)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

import torch
from safetensors import SafetensorError, safe_open

from weightdiff.errors import LayoutMismatchError, NonFiniteWeightsError, WeightFileError
from weightdiff.io import atomic_path
from weightdiff.kernels import pack, unpack
from weightdiff.weights.layout import TokenLayout, parse_dtype

#: safetensors' names of the dtypes written (a layout's are floats; ``extra`` buffers may be integers).
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def token_span(layout: TokenLayout, start: int, stop: int) -> tuple[int, int]:
    """The flat range ``[p0, p1)`` that tokens ``[start, stop)`` hold."""
    if not 0 <= start < stop <= layout.num_tokens:
        raise LayoutMismatchError(f"token span [{start}, {stop}) is outside the layout's {layout.num_tokens} tokens")
    src, length = layout.token_src_offset, layout.token_length
    return int(src[start]), int(src[stop - 1] + length[stop - 1])


def _span_args(layout: TokenLayout, start: int, stop: int, device: torch.device):
    p0, p1 = token_span(layout, start, stop)
    src = layout.token_src_offset[start:stop] - p0
    return (p0, p1, src.to(device), layout.token_length[start:stop].to(device),
            layout.token_tensor_index[start:stop].to(device), layout.mean.to(device), layout.std.to(device))


def decode_span(layout: TokenLayout, tokens: torch.Tensor, start: int) -> torch.Tensor:
    """Tokens ``(B, n, D)`` of ``[start, start + n)`` -> their flat entries ``(B, p1 - p0)`` float32."""
    if tokens.dim() != 3 or tokens.shape[-1] != layout.token_size:
        raise LayoutMismatchError(f"span tokens have shape {tuple(tokens.shape)}, expected (B, n, {layout.token_size})")
    p0, p1, src, length, index, mean, std = _span_args(layout, start, start + tokens.shape[1], tokens.device)
    return unpack(tokens, src, length, index, mean, std, p1 - p0)


def encode_span(layout: TokenLayout, flat: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Flat entries ``(B, p1 - p0)`` of tokens ``[start, stop)`` -> normalised tokens ``(B, n, D)``."""
    p0, p1, src, length, index, mean, std = _span_args(layout, start, stop, flat.device)
    if flat.dim() != 2 or flat.shape[1] != p1 - p0:
        raise LayoutMismatchError(f"span entries have shape {tuple(flat.shape)}, expected (B, {p1 - p0}) "
                                  f"for tokens [{start}, {stop})")
    return pack(flat, src, length, index, mean, std, layout.token_size)


def _overlaps(layout: TokenLayout, p0: int, p1: int):
    """``(spec, a, b)`` for every tensor holding flat entries ``[p0, p1)``: its entries ``[a, b)``."""
    for spec in layout.tensors:
        a, b = max(p0, spec.offset), min(p1, spec.offset + spec.numel)
        if a < b:
            yield spec, a - spec.offset, b - spec.offset


def read_span(path: str | os.PathLike, layout: TokenLayout, p0: int, p1: int) -> torch.Tensor:
    """Flat entries ``[p0, p1)`` (float32) of the tokenised tensors of a safetensors file, memory-mapped.

    Raises:
        WeightFileError: the file cannot be read or lacks a tensor of the layout (naming both).
        LayoutMismatchError: a tensor has another shape than the layout's.
    """
    out = torch.empty(p1 - p0, dtype=torch.float32)
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for spec, a, b in _overlaps(layout, p0, p1):
                if spec.name not in keys:
                    raise WeightFileError(f"{path} has no tensor '{spec.name}', which the layout tokenises")
                part = fh.get_slice(spec.name)
                if tuple(part.get_shape()) != spec.shape:
                    raise LayoutMismatchError(f"{path}: tensor '{spec.name}' has shape {tuple(part.get_shape())}, "
                                              f"expected {spec.shape}")
                if spec.shape:  # whole leading-dim rows around [a, b)
                    r0, r1 = _row_range(spec.shape, a, b)
                    block, first = part[r0:r1].reshape(-1), r0 * _row_size(spec.shape)
                else:  # a scalar has no rows to slice
                    block, first = fh.get_tensor(spec.name).reshape(-1), 0
                out[spec.offset + a - p0:spec.offset + b - p0] = block[a - first:b - first].to(torch.float32)
    except (OSError, RuntimeError, SafetensorError) as exc:
        raise WeightFileError(f"{path} is not a readable safetensors file: {exc}") from None
    return out


def _row_size(shape: tuple[int, ...]) -> int:
    """Entries per leading-dimension row of a tensor of ``shape``."""
    return math.prod(shape[1:])


def _row_range(shape: tuple[int, ...], a: int, b: int) -> tuple[int, int]:
    """Leading-dimension rows ``[r0, r1)`` of a tensor of ``shape`` that cover its entries ``[a, b)``."""
    row = _row_size(shape)
    return a // row, -(-b // row)


class _Aborted(Exception):
    """Thrown into the temporary file's :func:`~weightdiff.io.atomic_path` to discard it."""


class StreamingWeightWriter:
    """Write the tokenised tensors of one network to a safetensors file, span by span, atomically.

    The header (every tensor's dtype, shape and byte range, in layout order, then the ``extra``
    tensors) is written first; :meth:`write_tokens` / :meth:`write_flat` then write each span's
    bytes in place, in any order. On leaving the ``with`` block the file is published under its
    name only if the spans written tile every entry exactly once and none is NaN/Inf; otherwise
    nothing is left behind. The result is an ordinary safetensors file (``load_file`` reads it).

    Args:
        path: the file to write.
        layout: the layout of the tokens (dtype of each tensor included).
        metadata: safetensors ``__metadata__`` (e.g. ``{"format": "pt"}``).
        extra: tensors written whole after the tokenised ones (e.g. passthrough buffers).
    """

    def __init__(self, path: str | os.PathLike, layout: TokenLayout, metadata: Mapping[str, str] | None = None,
                 extra: Mapping[str, torch.Tensor] | None = None) -> None:
        self.path = Path(path)
        self.layout = layout
        self.metadata = dict(metadata or {})
        self.extra = {k: v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
        clash = set(self.extra) & set(layout.names)
        if clash:
            raise LayoutMismatchError(f"extra tensors {sorted(clash)} are also tokenised by the layout")
        unknown = {k: str(v.dtype) for k, v in self.extra.items() if v.dtype not in _ST_DTYPES}
        if unknown:
            raise LayoutMismatchError(f"extra tensors of dtypes safetensors names are not supported here: {unknown}")
        self._index = {name: i for i, name in enumerate(layout.names)}
        self._spans: list[tuple[int, int]] = []
        self._atomic = None
        self._fh = None

    def _header(self) -> tuple[bytes, dict[str, int], int]:
        """The header bytes (padded to 8), each tensor's data offset, and the data size."""
        entries: dict[str, object] = {"__metadata__": self.metadata} if self.metadata else {}
        offsets, pos = {}, 0
        tensors = [(s.name, parse_dtype(s.dtype), s.shape, s.numel) for s in self.layout.tensors]
        tensors += [(k, v.dtype, tuple(v.shape), v.numel()) for k, v in self.extra.items()]
        for name, dtype, shape, numel in tensors:
            nbytes = numel * dtype.itemsize
            entries[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
            offsets[name] = pos
            pos += nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
        return raw, offsets, pos

    def __enter__(self) -> StreamingWeightWriter:
        header, self._offsets, size = self._header()
        self._data_start = 8 + len(header)
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            self._fh = open(tmp, "wb+")
            self._fh.write(len(header).to_bytes(8, "little") + header)
            self._fh.truncate(self._data_start + size)
            for name, t in self.extra.items():
                self._fh.seek(self._data_start + self._offsets[name])
                self._fh.write(_bytes(t))
        except BaseException as exc:
            self._finish(exc)
            raise
        return self

    def write_tokens(self, tokens: torch.Tensor, start: int) -> None:
        """Decode normalised tokens ``(n, D)`` of ``[start, start + n)`` and write their entries."""
        p0, _ = token_span(self.layout, start, start + tokens.shape[0])
        self.write_flat(decode_span(self.layout, tokens[None].detach().float(), start)[0], p0)

    def write_flat(self, values: torch.Tensor, p0: int) -> None:
        """Write flat entries ``values (n,)`` (float32) at flat position ``p0``, each in its tensor's dtype."""
        if self._fh is None:
            raise RuntimeError("StreamingWeightWriter: write inside its `with` block")
        values = values.detach().cpu().reshape(-1)
        p1 = p0 + values.numel()
        if not 0 <= p0 <= p1 <= self.layout.num_params:
            raise LayoutMismatchError(f"flat span [{p0}, {p1}) is outside the layout's "
                                      f"{self.layout.num_params} entries")
        finite = values.numel() == 0 or bool(torch.isfinite(values.sum(dtype=torch.float64)))
        for spec, a, b in _overlaps(self.layout, p0, p1):
            part = values[spec.offset + a - p0:spec.offset + b - p0]
            if not finite and not bool(torch.isfinite(part).all()):
                raise NonFiniteWeightsError(f"{self.path}: tensor '{spec.name}' has non-finite values (NaN/Inf)")
            dtype = parse_dtype(spec.dtype)
            self._fh.seek(self._data_start + self._offsets[spec.name] + a * dtype.itemsize)
            self._fh.write(_bytes(part.to(dtype)))
        self._spans.append((p0, p1))

    def _coverage_error(self) -> str | None:
        """Why the spans written do not tile ``[0, P)`` exactly once, or None."""
        pos = 0
        for a, b in sorted(self._spans):
            if a != pos:
                return f"entries [{min(a, pos)}, {max(a, pos)}) were {'written twice' if a < pos else 'never written'}"
            pos = b
        if pos != self.layout.num_params:
            return f"entries [{pos}, {self.layout.num_params}) were never written"
        return None

    def _finish(self, exc: BaseException | None) -> None:
        """Close the file; publish it when ``exc`` is None, else discard it."""
        if self._fh is not None:
            self._fh.flush()
            self._fh.close()
            self._fh = None
        atomic, self._atomic = self._atomic, None
        if atomic is None:
            return
        if exc is None:
            atomic.__exit__(None, None, None)
            return
        try:
            atomic.__exit__(_Aborted, _Aborted(), None)
        except _Aborted:
            pass

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:
            self._finish(exc)
            return
        why = self._coverage_error()
        if why is not None:
            self._finish(_Aborted())
            raise LayoutMismatchError(f"{self.path}: {why}; the file is not published")
        self._finish(None)


def _bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a contiguous CPU tensor."""
    t = t.contiguous().reshape(-1)
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
