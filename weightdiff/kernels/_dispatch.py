"""Helpers shared by the ragged-layout ops: backend choice, launch sizes and layout checks.

Not public API. The ops in :mod:`weightdiff.kernels` describe a layout by three per-token
``(L,)`` integer tensors (``src_offset``, ``length``, ``tensor_index``); see the package
docstring for a worked example.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch wheels for macOS/Windows come without Triton
    triton = None
    tl = None

FORCE_TRITON_ENV = "WEIGHTDIFF_FORCE_TRITON"

# Elements one Triton program handles: a (BLOCK_ROWS, BLOCK_D) tile of about this size keeps a
# few warps busy on a GPU and keeps the number of programs (slow under TRITON_INTERPRET) small.
TILE_ELEMENTS = 4096

# CUDA limits grid axes 1 and 2 to 65535 programs; the batch axis is launched in chunks of this.
MAX_GRID_Y = 65535


def _missing_triton(fn: Callable[..., Any]) -> Callable[..., Any]:
    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"{fn.__name__} needs Triton, which is not installed; "
                           f"unset {FORCE_TRITON_ENV} to use the torch reference")

    return unavailable


# ``jit`` decorates the kernels; without Triton the kernels become stubs that raise when called,
# so importing the package still works (the torch references need no Triton).
jit: Callable[[Callable[..., Any]], Any] = triton.jit if triton is not None else _missing_triton


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the ops should run their Triton kernel for these tensors.

    True when every tensor is on a CUDA device, or when ``WEIGHTDIFF_FORCE_TRITON=1`` (used with
    ``TRITON_INTERPRET=1`` to run the kernels on CPU in tests). Read per call, never at import.
    """
    if triton is None:
        return False
    if os.environ.get(FORCE_TRITON_ENV) == "1":
        return True
    return all(t.is_cuda for t in tensors)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (and >= 1); Triton block sizes must be powers of two."""
    return 1 << max(0, int(n) - 1).bit_length()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (so gradcheck works); every other dtype computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_index_args(src_offset: torch.Tensor, length: torch.Tensor, tensor_index: torch.Tensor,
                     mean: torch.Tensor, std: torch.Tensor) -> None:
    """Check the shapes and dtypes of the layout arguments (no device sync)."""
    for name, t in (("src_offset", src_offset), ("length", length), ("tensor_index", tensor_index)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (L,), got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
        if t.shape != src_offset.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(src_offset.shape)} "
                             "like src_offset (one entry per token)")
    for name, t in (("mean", mean), ("std", std)):
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (T,), got shape {tuple(t.shape)}")
    if mean.shape != std.shape:
        raise ValueError(f"std has shape {tuple(std.shape)}, expected {tuple(mean.shape)} like mean")


def check_layout_values(src_offset: torch.Tensor, length: torch.Tensor, tensor_index: torch.Tensor,
                        num_tensors: int, token_size: int, num_params: int, *, exact_cover: bool) -> None:
    """Check the token ranges of a layout against the flat vector they index.

    Every token must lie inside ``[0, num_params)`` with ``0 <= length <= token_size``, no two
    tokens may share a flat position (so the gradient of ``pack`` needs no atomic adds), and with
    ``exact_cover`` the tokens must cover every flat position (what ``unpack`` needs to fill its
    output). O(L log L) work and one device sync on CUDA.

    Raises:
        ValueError: naming the offending argument, with the first bad token and its values.
    """
    if src_offset.numel() == 0:
        if exact_cover and num_params != 0:
            raise ValueError(f"no tokens (src_offset is empty) cannot cover num_params={num_params}")
        return
    end = src_offset + length
    checks = (
        ("length", (length < 0) | (length > token_size), f"0 <= length <= token_size={token_size}"),
        ("src_offset", (src_offset < 0) | (end > num_params),
         f"0 <= src_offset and src_offset + length <= num_params={num_params}"),
        ("tensor_index", (tensor_index < 0) | (tensor_index >= num_tensors),
         f"0 <= tensor_index < len(mean)={num_tensors}"),
    )
    # Sorted by start, non-empty tokens must not overlap (and, for an exact cover, must tile
    # [0, P): each starts where the previous one ends).
    keep = length > 0
    starts, order = torch.sort(src_offset[keep])
    ends = end[keep][order]
    gaps = starts[1:] - ends[:-1]
    overlap = (gaps < 0).any()
    if exact_cover:
        first = starts[:1].sum()  # 0 when there is no non-empty token
        last = ends[-1:].sum()
        uncovered = (gaps != 0).any() | (first != 0) | (last != num_params)
    else:
        uncovered = torch.zeros((), dtype=torch.bool, device=src_offset.device)
    flags = torch.stack([c[1].any() for c in checks] + [overlap, uncovered]).tolist()
    for (name, mask, expected), flag in zip(checks, flags):
        if flag:
            i = int(mask.nonzero()[0, 0])
            raise ValueError(f"{name}[{i}] is out of range: src_offset={int(src_offset[i])}, "
                             f"length={int(length[i])}, tensor_index={int(tensor_index[i])}; "
                             f"expected {expected}")
    if flags[-2]:
        raise ValueError("src_offset/length: tokens overlap; each flat position may belong to at "
                         "most one token")
    if flags[-1]:
        raise ValueError(f"src_offset/length must cover each of the num_params={num_params} flat "
                         f"positions exactly once; the tokens cover {int(length.clamp(min=0).sum())} "
                         "positions or leave a gap")
