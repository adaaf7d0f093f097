"""pack: flat parameter vectors (B, P) -> per-tensor normalised, zero-padded tokens (B, L, D).

``out[b, l, j] = (flat[b, src_offset[l] + j] - mean[t]) / std[t]`` with ``t = tensor_index[l]``
for ``j < length[l]``, and exactly ``0`` for ``length[l] <= j < D``. See the package docstring for
a worked example of the layout.

Both pack and unpack are one affine map per entry, ``x * scale[t] + shift[t]``, gathered from or
scattered to the flat vector (:func:`pack_core`, :func:`~weightdiff.kernels.unpack.unpack_core`).
Pack uses ``scale = 1 / std`` and ``shift = -mean / std`` (rounded to float32 from float64): one
multiply-add per entry, which lets the torch path run at copy speed in a single pass, within a
couple of ulp of ``(x - mean) / std`` and exact for ``mean = 0, std = 1``. The gradient of pack is
an unpack with ``scale = 1 / std``, ``shift = 0``, and vice versa, so the two share their kernels.
"""

from __future__ import annotations

import numbers

import torch
from torch.autograd.function import once_differentiable

from weightdiff.kernels._dispatch import (
    MAX_GRID_Y,
    TILE_ELEMENTS,
    check_index_args,
    check_layout_values,
    compute_dtype,
    jit,
    next_power_of_2,
    tl,
    token_runs,
    use_triton,
)

# The python loop over runs costs ~8 us per run; with fewer elements than this per run on
# average, one gather over all tokens is cheaper (measured on CPU, 1 thread: equal at ~1k).
_MIN_ELEMENTS_PER_RUN = 1024


@jit
def _pack_kernel(flat_ptr, out_ptr, src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                 num_tokens, token_size, stride_flat, stride_out,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, b) fills tokens [i * BLOCK_L, (i + 1) * BLOCK_L) of batch row b.
    pid_l = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    rows = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_tokens
    src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    n = tl.load(len_ptr + rows, mask=row_ok, other=0)
    t = tl.load(tidx_ptr + rows, mask=row_ok, other=0)
    scale = tl.load(scale_ptr + t, mask=row_ok, other=1.0)
    shift = tl.load(shift_ptr + t, mask=row_ok, other=0.0)
    valid = cols[None, :] < n[:, None]  # rows past the end have n = 0
    x = tl.load(flat_ptr + pid_b * stride_flat + src[:, None] + cols[None, :], mask=valid, other=0.0)
    y = x.to(scale.dtype) * scale[:, None] + shift[:, None]
    y = tl.where(valid, y, 0.0)  # padding is exactly zero, whatever scale/shift are
    dst = pid_b * stride_out + rows[:, None].to(tl.int64) * token_size + cols[None, :]
    tl.store(out_ptr + dst, y.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < token_size))


def _pack_triton(flat: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                 scale: torch.Tensor, shift: torch.Tensor, out: torch.Tensor) -> None:
    """Launch :func:`_pack_kernel`: flat (B, P) -> out (B, L, D), out contiguous."""
    batch, num_tokens, token_size = out.shape
    if batch == 0 or num_tokens == 0 or token_size == 0:
        return
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    block_d = next_power_of_2(token_size)
    block_l = max(1, min(next_power_of_2(num_tokens), TILE_ELEMENTS // block_d))
    num_blocks = -(-num_tokens // block_l)
    for b0 in range(0, batch, MAX_GRID_Y):
        b1 = min(batch, b0 + MAX_GRID_Y)
        _pack_kernel[(num_blocks, b1 - b0)](
            flat[b0:b1], out[b0:b1], src, length, tidx, scale, shift,
            num_tokens, token_size, flat.stride(0), out.stride(0),
            BLOCK_L=block_l, BLOCK_D=block_d)


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
    if len(starts) * _MIN_ELEMENTS_PER_RUN > out.numel():
        _pack_gather(flat, src, length, tidx, scale, shift, out)
        return
    # shift as a 0-d tensor and scale as a python number: the form of add() that vectorises.
    scales, shifts = scale.tolist(), shift.unbind()
    run_src = src[starts].tolist()
    run_tensor = tidx[starts].tolist()
    partial = []
    for a, b, f, s0, t in zip(starts, ends, full, run_src, run_tensor):
        if f:
            x = flat[:, s0:s0 + f * token_size].view(batch, f, token_size)
            torch.add(shifts[t], x, alpha=scales[t], out=out[:, a:a + f])
        if f < b - a:
            partial.append(b - 1)
    if partial:
        ids = torch.tensor(partial, dtype=torch.long, device=flat.device)
        _pack_gather(flat, src, length, tidx, scale, shift, out, ids)


def pack_core(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
              tensor_index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
              out: torch.Tensor) -> torch.Tensor:
    """``out[b, l, j] = flat[b, src_offset[l] + j] * scale[t] + shift[t]``, zero padding.

    No checks and no autograd; shared by :func:`pack` and the backward of ``unpack``.

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


def normalizer(mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) (T,) with ``x * scale + shift == (x - mean) / std``, rounded once from float64."""
    mean64, std64 = mean.detach().double(), std.detach().double()
    return std64.reciprocal().to(dtype), (-mean64 / std64).to(dtype)


class _Pack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                mean: torch.Tensor, std: torch.Tensor, token_size: int) -> torch.Tensor:
        dtype = compute_dtype(flat.dtype)
        scale, shift = normalizer(mean, std, dtype)
        out = flat.new_empty((flat.shape[0], src.numel(), token_size), dtype=dtype)
        pack_core(flat, src, length, tidx, scale, shift, out)
        ctx.save_for_backward(src, length, tidx, scale, out if ctx.needs_input_grad[5] else None)
        ctx.flat_shape, ctx.flat_dtype = flat.shape, flat.dtype
        ctx.mean_dtype, ctx.std_dtype = mean.dtype, std.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # Imported here because unpack.py imports this module for its own backward.
        from weightdiff.kernels.unpack import unpack_core

        src, length, tidx, scale, out = ctx.saved_tensors  # scale = 1 / std
        grad = grad.to(scale.dtype).contiguous()
        grad_flat = grad_mean = grad_std = None
        if ctx.needs_input_grad[0]:
            # d out / d flat = 1 / std on each token's real entries; flat positions that no token
            # reads get zero gradient, hence zeros rather than empty.
            grad_flat = grad.new_zeros(ctx.flat_shape)
            unpack_core(grad, src, length, tidx, scale, torch.zeros_like(scale), grad_flat)
            grad_flat = grad_flat.to(ctx.flat_dtype)
        if ctx.needs_input_grad[4]:
            valid = torch.arange(grad.shape[2], device=grad.device) < length[:, None]
            per_token = (grad.sum(0) * valid).sum(1)  # (L,)
            summed = torch.zeros_like(scale).index_add_(0, tidx, per_token)
            grad_mean = (-summed * scale).to(ctx.mean_dtype)  # d out / d mean = -1 / std
        if ctx.needs_input_grad[5]:
            per_token = (grad * out).sum((0, 2))  # out is 0 on padding, so padding drops out
            summed = torch.zeros_like(scale).index_add_(0, tidx, per_token)
            grad_std = (-summed * scale).to(ctx.std_dtype)  # d out / d std = -out / std
        return grad_flat, None, None, None, grad_mean, grad_std, None


def _check_pack_args(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
                     tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                     token_size: int) -> None:
    if flat.dim() not in (1, 2) or not flat.is_floating_point():
        raise ValueError(f"flat must be a floating (B, P) or (P,) tensor, got shape "
                         f"{tuple(flat.shape)} and dtype {flat.dtype}")
    if isinstance(token_size, bool) or not isinstance(token_size, numbers.Integral) or token_size < 1:
        raise ValueError(f"token_size must be a positive int, got {token_size!r}")
    check_index_args(src_offset, length, tensor_index, mean, std)
    check_layout_values(src_offset, length, tensor_index, mean.numel(), token_size, flat.shape[-1],
                        exact_cover=False)


def pack_ref(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
             tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
             token_size: int) -> torch.Tensor:
    """Torch reference of :func:`pack` (same arguments and result, forward only, no autograd)."""
    _check_pack_args(flat, src_offset, length, tensor_index, mean, std, token_size)
    token_size = int(token_size)
    flat2 = flat.detach().reshape(-1, flat.shape[-1])
    dtype = compute_dtype(flat.dtype)
    out = flat2.new_empty((flat2.shape[0], src_offset.numel(), token_size), dtype=dtype)
    _pack_torch(flat2, src_offset, length, tensor_index, *normalizer(mean, std, dtype), out)
    return out.squeeze(0) if flat.dim() == 1 else out


def pack(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
         tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, token_size: int,
         *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cut flat parameter vectors into per-tensor normalised tokens with zero padding.

    Runs :func:`_pack_kernel` for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and the
    torch reference otherwise; differentiable w.r.t. ``flat``, ``mean`` and ``std``.

    Args:
        flat: (B, P) or (P,) floating parameters, tensors concatenated in layout order.
        src_offset: (L,) integer, flat position of each token's first entry.
        length: (L,) integer in [0, D], number of real entries in each token.
        tensor_index: (L,) integer in [0, T), the tensor each token belongs to.
        mean, std: (T,) per-tensor normalisation statistics.
        token_size: D.
        out: optional (B, L, D) or (L, D) contiguous buffer of the result dtype to write into
            (saves the allocation when packing many batches; not allowed when a gradient is needed).

    Returns:
        (B, L, D) or (L, D) tokens; float32 (float64 for float64 ``flat``).
        ``out[b, l, j] = (flat[b, src_offset[l] + j] - mean[t]) / std[t]``, ``t = tensor_index[l]``,
        for ``j < length[l]`` (computed as one multiply-add, see the module docstring); exactly 0
        for ``j >= length[l]``.

    Raises:
        ValueError: a shape, dtype or index out of range (naming the argument), or tokens that
            overlap in ``flat``.
    """
    device = flat.device
    src_offset, length, tensor_index = src_offset.to(device), length.to(device), tensor_index.to(device)
    mean, std = mean.to(device), std.to(device)
    _check_pack_args(flat, src_offset, length, tensor_index, mean, std, token_size)
    token_size = int(token_size)
    flat2 = flat.reshape(-1, flat.shape[-1])
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or mean.requires_grad or std.requires_grad)
    if needs_grad:
        if out is not None:
            raise ValueError("out= cannot be used when a gradient is required (flat, mean or std "
                             "requires grad); drop out= or run under torch.no_grad()")
        result = _Pack.apply(flat2, src_offset, length, tensor_index, mean, std, token_size)
    else:
        dtype = compute_dtype(flat.dtype)
        shape = (flat2.shape[0], src_offset.numel(), token_size)
        if out is None:
            result = flat2.new_empty(shape, dtype=dtype)
        else:
            expected = shape if flat.dim() == 2 else shape[1:]
            if tuple(out.shape) != expected or out.dtype != dtype or out.device != device \
                    or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {dtype} tensor of shape {expected} on "
                                 f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
            result = out.view(shape)
        pack_core(flat2, src_offset, length, tensor_index, *normalizer(mean, std, dtype), result)
    return result.squeeze(0) if flat.dim() == 1 else result
