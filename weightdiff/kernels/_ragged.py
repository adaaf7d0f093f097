"""The two cores behind pack and unpack: an affine gather into tokens and an affine scatter back.

Not public API. ``pack_core`` computes ``out[b, l, j] = flat[b, src_offset[l] + j] * scale[t] +
shift[t]`` (zero padding) and ``unpack_core`` computes ``out[b, src_offset[l] + j] = tokens[b, l, j]
* scale[t] + shift[t]`` (padding dropped), ``t = tensor_index[l]``, for any per-tensor ``scale`` and
``shift``. Pack is ``pack_core`` with ``scale = 1 / std``, ``shift = -mean / std``; unpack is
``unpack_core`` with ``scale = std``, ``shift = mean``. The gradient of each is the other core (with
``shift = 0``), which is why both ops need both cores and why the cores live here rather than in
either op's module. See the package docstring for a worked example of the layout.

Each core runs a Triton kernel for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and an
optimised torch path otherwise: the full tokens of each contiguous run of memory are one strided
multiply-add, the rest one vectorised gather or scatter. The short specifications ``pack_ref`` and
``unpack_ref`` beside the ops are what both are tested against.
"""

from __future__ import annotations

from typing import Any

import torch

from weightdiff.kernels._dispatch import MAX_GRID_Y, TILE_ELEMENTS, jit, next_power_of_2, tl, use_triton

# The python loop over runs costs ~8 us per run; with fewer elements than this per run on
# average, one gather (pack) or scatter (unpack) over all tokens is cheaper (measured on CPU,
# 1 thread: for the gather equal at ~1k; the scatter is slower than the loop even at 512).
_PACK_MIN_ELEMENTS_PER_RUN = 1024
_UNPACK_MIN_ELEMENTS_PER_RUN = 256


def token_runs(src_offset: torch.Tensor, length: torch.Tensor,
               tensor_index: torch.Tensor, token_size: int) -> tuple[list[int], list[int], list[int]]:
    """Split the tokens into runs that are one contiguous block of flat memory.

    A run is tokens ``a .. b-1`` of one tensor where each token starts ``token_size`` after the
    previous one and all but possibly the last are full. The full tokens of a run are then a plain
    ``(B, n, D)`` view of the flat vector, which is what makes the torch paths as fast as a
    copy. A tensor laid out in the usual way is exactly one run.

    Returns:
        ``(starts, ends, full)``: python lists, one entry per run: first token, one past the last
        token, and the number of leading full tokens (``ends - starts`` or one less).
    """
    n = src_offset.numel()
    if n == 0:
        return [], [], []
    cont = torch.zeros(n, dtype=torch.bool, device=src_offset.device)
    cont[1:] = ((src_offset[1:] == src_offset[:-1] + token_size) & (length[:-1] == token_size)
                & (tensor_index[1:] == tensor_index[:-1]))
    starts = (~cont).nonzero().view(-1)
    ends = torch.cat([starts[1:], starts.new_tensor([n])])
    full = ends - starts - (length[ends - 1] != token_size).long()
    return starts.tolist(), ends.tolist(), full.tolist()


@jit
def _token_tile(src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr, num_tokens,
                BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # The tile of program (i, ·): tokens [i * BLOCK_L, (i + 1) * BLOCK_L), their source offsets,
    # the mask of real entries (rows past the end have length 0) and each row's scale and shift.
    rows = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_tokens
    src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    n = tl.load(len_ptr + rows, mask=row_ok, other=0)
    t = tl.load(tidx_ptr + rows, mask=row_ok, other=0)
    scale = tl.load(scale_ptr + t, mask=row_ok, other=1.0)
    shift = tl.load(shift_ptr + t, mask=row_ok, other=0.0)
    valid = cols[None, :] < n[:, None]
    return rows, cols, row_ok, src, valid, scale, shift


@jit
def _pack_kernel(flat_ptr, out_ptr, src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                 num_tokens, token_size, stride_flat, stride_out,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, b) fills tokens [i * BLOCK_L, (i + 1) * BLOCK_L) of batch row b.
    pid_b = tl.program_id(1).to(tl.int64)
    rows, cols, row_ok, src, valid, scale, shift = _token_tile(src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                                                               num_tokens, BLOCK_L, BLOCK_D)
    x = tl.load(flat_ptr + pid_b * stride_flat + src[:, None] + cols[None, :], mask=valid, other=0.0)
    y = x.to(scale.dtype) * scale[:, None] + shift[:, None]
    y = tl.where(valid, y, 0.0)  # padding is exactly zero, whatever scale/shift are
    dst = pid_b * stride_out + rows[:, None].to(tl.int64) * token_size + cols[None, :]
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < token_size))


def _launch_tiles(kernel: Any, inp: torch.Tensor, out: torch.Tensor, src: torch.Tensor, length: torch.Tensor,
                  tidx: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, batch: int, num_tokens: int,
                  token_size: int) -> None:
    """Launch a pack/unpack kernel over (token blocks, batch rows), the batch axis in chunks the grid allows."""
    block_d = next_power_of_2(token_size)
    block_l = max(1, min(next_power_of_2(num_tokens), TILE_ELEMENTS // block_d))
    num_blocks = -(-num_tokens // block_l)
    for b0 in range(0, batch, MAX_GRID_Y):
        b1 = min(batch, b0 + MAX_GRID_Y)
        kernel[(num_blocks, b1 - b0)](inp[b0:b1], out[b0:b1], src, length, tidx, scale, shift,
                                      num_tokens, token_size, inp.stride(0), out.stride(0),
                                      BLOCK_L=block_l, BLOCK_D=block_d)


def _pack_triton(flat: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                 scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """Launch :func:`_pack_kernel`: flat (B, P) -> out (B, L, D), out contiguous."""
    batch, num_tokens, token_size = out.shape
    if batch == 0 or num_tokens == 0 or token_size == 0:
        return
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    _launch_tiles(_pack_kernel, flat, out, src, length, tidx, scale, shift, batch, num_tokens, token_size)


def _pack_gather(flat: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                 scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor,
                 token_ids: torch.Tensor | None = None) -> None:
    """Vectorised pack of all tokens (or of ``token_ids``) by one gather; any layout."""
    if token_ids is not None:
        src, length, tidx = src[token_ids], length[token_ids], tidx[token_ids]
    batch, token_size = flat.shape[0], out.shape[2]
    cols = torch.arange(token_size, device=flat.device)
    valid = cols < length[:, None]  # (n, D)
    if flat.shape[1] == 0:  # then every length is 0 (checked): all padding
        y = out.new_zeros((batch, src.numel(), token_size))
    else:
        idx = (src[:, None] + cols).masked_fill_(~valid, 0)  # padding reads position 0, zeroed below
        y = flat.index_select(1, idx.view(-1)).view(batch, -1, token_size)
        y = torch.addcmul(shift[tidx][:, None], y, scale[tidx][:, None]).masked_fill_(~valid, 0.0)
    if token_ids is None:
        out.copy_(y)
    else:
        out.index_copy_(1, token_ids, y)


def _run_plan(src: torch.Tensor, tidx: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              starts: list[int], ends: list[int], full: list[int]
              ) -> tuple[list[tuple[int, int, int, float, torch.Tensor]], torch.Tensor | None]:
    """The work of the run-based torch paths, from :func:`token_runs`.

    Returns ``(runs, partial)``: for each run with full tokens ``(first token, number of full
    tokens, flat start, scale, shift)`` — scale as a python number and shift as a 0-d tensor, the
    form of ``torch.add(shift, x, alpha=scale)`` that vectorises — and the ids of the runs' last,
    partial tokens (None when there are none).
    """
    scales, shifts = scale.tolist(), shift.unbind()
    runs, partial = [], []
    for a, b, f, s0, t in zip(starts, ends, full, src[starts].tolist(), tidx[starts].tolist()):
        if f:
            runs.append((a, f, s0, scales[t], shifts[t]))
        if f < b - a:
            partial.append(b - 1)
    ids = torch.tensor(partial, dtype=torch.long, device=src.device) if partial else None
    return runs, ids


def _pack_torch(flat: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """Torch pack: flat (B, P) -> out (B, L, D).

    The full tokens of each contiguous run (normally one per tensor) are a ``(B, n, D)`` view of
    ``flat``, so they are normalised straight into ``out`` by one strided ``add`` (``shift +
    scale * x``, a single vectorised pass); the last, partial token of every run is done by one
    small gather for all runs together.
    """
    batch, num_tokens, token_size = out.shape
    if batch == 0 or num_tokens == 0 or token_size == 0:
        return
    if flat.dtype != out.dtype:
        # Convert once: computing in a narrower input dtype would round before the upcast.
        flat = flat.to(out.dtype)
    flat = flat.contiguous()  # the run views below need unit stride along P
    starts, ends, full = token_runs(src, length, tidx, token_size)
    if len(starts) * _PACK_MIN_ELEMENTS_PER_RUN > out.numel():
        _pack_gather(flat, src, length, tidx, scale, shift, out)
        return
    runs, partial = _run_plan(src, tidx, scale, shift, starts, ends, full)
    for a, f, s0, scale_t, shift_t in runs:
        x = flat[:, s0:s0 + f * token_size].view(batch, f, token_size)
        torch.add(shift_t, x, alpha=scale_t, out=out[:, a:a + f])
    if partial is not None:
        _pack_gather(flat, src, length, tidx, scale, shift, out, partial)


def pack_core(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
              tensor_index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              out: torch.Tensor) -> torch.Tensor:
    """``out[b, l, j] = flat[b, src_offset[l] + j] * scale[t] + shift[t]``, zero padding.

    No checks and no autograd; the forward of ``pack`` and the backward of ``unpack``.

    Args:
        flat: (B, P) floating.
        src_offset, length, tensor_index: (L,) integer, on ``flat``'s device.
        scale, shift: (T,) in ``out``'s dtype.
        out: (B, L, D) contiguous, written in place and returned.
    """
    if use_triton(flat):
        _pack_triton(flat, src_offset.contiguous(), length.contiguous(), tensor_index.contiguous(),
                     scale.contiguous(), shift.contiguous(), out)
    else:
        _pack_torch(flat, src_offset, length, tensor_index, scale, shift, out)
    return out


@jit
def _unpack_kernel(tok_ptr, out_ptr, src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                   num_tokens, token_size, stride_tok, stride_out,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, b) writes the real entries of tokens [i * BLOCK_L, (i + 1) * BLOCK_L) of batch
    # row b; tokens never share a flat position, so plain stores suffice.
    pid_b = tl.program_id(1).to(tl.int64)
    rows, cols, row_ok, src, valid, scale, shift = _token_tile(src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                                                               num_tokens, BLOCK_L, BLOCK_D)
    offs = pid_b * stride_tok + rows[:, None].to(tl.int64) * token_size + cols[None, :]
    y = tl.load(tok_ptr + offs, mask=valid, other=0.0)
    x = y.to(scale.dtype) * scale[:, None] + shift[:, None]
    tl.store(out_ptr + pid_b * stride_out + src[:, None] + cols[None, :],
             x.to(out_ptr.dtype.element_ty), mask=valid)


def _unpack_triton(tokens: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                   scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """Launch :func:`_unpack_kernel`: tokens (B, L, D) -> out (B, P), out with unit stride on P."""
    batch, num_tokens, token_size = tokens.shape
    if batch == 0 or num_tokens == 0 or token_size == 0:
        return
    tokens = tokens.contiguous()
    _launch_tiles(_unpack_kernel, tokens, out, src, length, tidx, scale, shift, batch, num_tokens, token_size)


def _unpack_scatter(tokens: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                    scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor,
                    token_ids: torch.Tensor | None = None) -> None:
    """Vectorised unpack of all tokens (or of ``token_ids``) by one scatter; any layout."""
    if token_ids is not None:
        tokens = tokens.index_select(1, token_ids)
        src, length, tidx = src[token_ids], length[token_ids], tidx[token_ids]
    batch, num_tokens, token_size = tokens.shape
    cols = torch.arange(token_size, device=tokens.device)
    keep = (cols < length[:, None]).view(-1).nonzero().view(-1)  # real entries in (n * D)
    dst = (src[:, None] + cols).view(-1)[keep]
    values = tokens.reshape(batch, num_tokens * token_size).index_select(1, keep).to(out.dtype)
    scale_e = scale[tidx][:, None].expand(num_tokens, token_size).reshape(-1)[keep]
    shift_e = shift[tidx][:, None].expand(num_tokens, token_size).reshape(-1)[keep]
    out.index_copy_(1, dst, torch.addcmul(shift_e, values, scale_e))


def _unpack_torch(tokens: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                  scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """Torch unpack: tokens (B, L, D) -> out (B, P), out with unit stride on P.

    The full tokens of each contiguous run (normally one per tensor) land in a ``(B, n, D)`` view
    of ``out`` by one strided ``add`` (``shift + scale * tokens``, a single vectorised pass); the
    partial last token of every run is written by one small scatter for all runs together.
    """
    batch, num_tokens, token_size = tokens.shape
    if batch == 0 or num_tokens == 0 or token_size == 0:
        return
    starts, ends, full = token_runs(src, length, tidx, token_size)
    if len(starts) * _UNPACK_MIN_ELEMENTS_PER_RUN > tokens.numel():
        _unpack_scatter(tokens, src, length, tidx, scale, shift, out)
        return
    if tokens.dtype != out.dtype:
        tokens = tokens.to(out.dtype)
    runs, partial = _run_plan(src, tidx, scale, shift, starts, ends, full)
    for a, f, s0, scale_t, shift_t in runs:
        o = out[:, s0:s0 + f * token_size].view(batch, f, token_size)
        torch.add(shift_t, tokens[:, a:a + f], alpha=scale_t, out=o)
    if partial is not None:
        _unpack_scatter(tokens, src, length, tidx, scale, shift, out, partial)


def unpack_core(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
                tensor_index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """``out[b, src_offset[l] + j] = tokens[b, l, j] * scale[t] + shift[t]`` for ``j < length[l]``.

    No checks and no autograd; flat positions no token covers keep their value in ``out``.
    The forward of ``unpack`` and the backward of ``pack``.

    Args:
        tokens: (B, L, D) floating.
        src_offset, length, tensor_index: (L,) integer, on ``tokens``' device.
        scale, shift: (T,) in ``out``'s dtype.
        out: (B, P) with unit stride along P, written in place and returned.
    """
    if use_triton(tokens):
        _unpack_triton(tokens, src_offset.contiguous(), length.contiguous(), tensor_index.contiguous(),
                       scale.contiguous(), shift.contiguous(), out)
    else:
        _unpack_torch(tokens, src_offset, length, tensor_index, scale, shift, out)
    return out
