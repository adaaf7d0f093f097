"""unpack: normalised tokens (B, L, D) -> flat parameter vectors (B, P); the inverse of pack.

``flat[b, src_offset[l] + j] = tokens[b, l, j] * std[t] + mean[t]`` with ``t = tensor_index[l]``
for ``j < length[l]``; padding entries are dropped. The tokens must cover every flat position
exactly once. See the package docstring for a worked example of the layout.

:func:`unpack_core` computes ``tokens * scale + shift`` for any per-tensor ``scale``/``shift``
(unpack: ``std``/``mean``); with ``scale = 1 / std`` and ``shift = 0`` it is the gradient of
``pack``, and :func:`~weightdiff.kernels.pack.pack_core` with ``scale = std`` is its own gradient.
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
from weightdiff.kernels.pack import pack_core

# The python loop over runs costs ~8 us per run; with fewer elements than this per run on
# average, one scatter over all tokens is cheaper (measured on CPU, 1 thread: the scatter is slower
# than the loop even at 512 elements per run).
_MIN_ELEMENTS_PER_RUN = 256


@jit
def _unpack_kernel(tok_ptr, out_ptr, src_ptr, len_ptr, tidx_ptr, scale_ptr, shift_ptr,
                   num_tokens, token_size, stride_tok, stride_out,
                   BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program (i, b) writes the real entries of tokens [i * BLOCK_L, (i + 1) * BLOCK_L) of batch
    # row b; tokens never share a flat position, so plain stores suffice.
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
    block_d = next_power_of_2(token_size)
    block_l = max(1, min(next_power_of_2(num_tokens), TILE_ELEMENTS // block_d))
    num_blocks = -(-num_tokens // block_l)
    for b0 in range(0, batch, MAX_GRID_Y):
        b1 = min(batch, b0 + MAX_GRID_Y)
        _unpack_kernel[(num_blocks, b1 - b0)](
            tokens[b0:b1], out[b0:b1], src, length, tidx, scale, shift,
            num_tokens, token_size, tokens.stride(0), out.stride(0),
            BLOCK_L=block_l, BLOCK_D=block_d)


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
    if len(starts) * _MIN_ELEMENTS_PER_RUN > tokens.numel():
        _unpack_scatter(tokens, src, length, tidx, scale, shift, out)
        return
    if tokens.dtype != out.dtype:
        tokens = tokens.to(out.dtype)
    # shift as a 0-d tensor and scale as a python number: the form of add() that vectorises.
    scales, shifts = scale.tolist(), shift.unbind()
    run_src = src[starts].tolist()
    run_tensor = tidx[starts].tolist()
    partial = []
    for a, b, f, s0, t in zip(starts, ends, full, run_src, run_tensor):
        if f:
            o = out[:, s0:s0 + f * token_size].view(batch, f, token_size)
            torch.add(shifts[t], tokens[:, a:a + f], alpha=scales[t], out=o)
        if f < b - a:
            partial.append(b - 1)
    if partial:
        ids = torch.tensor(partial, dtype=torch.long, device=tokens.device)
        _unpack_scatter(tokens, src, length, tidx, scale, shift, out, ids)


def unpack_core(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
                tensor_index: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                out: torch.Tensor) -> torch.Tensor:
    """``out[b, src_offset[l] + j] = tokens[b, l, j] * scale[t] + shift[t]`` for ``j < length[l]``.

    No checks and no autograd; flat positions no token covers keep their value in ``out``.
    Shared by :func:`unpack` and the backward of ``pack``.

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


class _Unpack(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens: torch.Tensor, src: torch.Tensor, length: torch.Tensor, tidx: torch.Tensor,
                mean: torch.Tensor, std: torch.Tensor, num_params: int) -> torch.Tensor:
        dtype = compute_dtype(tokens.dtype)
        mean_c, std_c = mean.to(dtype), std.to(dtype)
        out = tokens.new_empty((tokens.shape[0], num_params), dtype=dtype)
        unpack_core(tokens, src, length, tidx, std_c, mean_c, out)
        ctx.save_for_backward(src, length, tidx, std_c, tokens if ctx.needs_input_grad[5] else None)
        ctx.token_size = tokens.shape[2]
        ctx.tokens_dtype, ctx.mean_dtype, ctx.std_dtype = tokens.dtype, mean.dtype, std.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        src, length, tidx, std_c, tokens = ctx.saved_tensors
        grad = grad.to(std_c.dtype)
        batch, token_size = grad.shape[0], ctx.token_size
        zeros = torch.zeros_like(std_c)
        shape = (batch, src.numel(), token_size)
        grad_tokens = grad_mean = grad_std = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            # g[b, l, j] = grad[b, src[l] + j] on real entries, 0 on padding.
            gathered = pack_core(grad, src, length, tidx, torch.ones_like(std_c), zeros,
                                 grad.new_empty(shape))
            if ctx.needs_input_grad[0]:
                grad_tokens = (gathered * std_c[tidx][:, None]).to(ctx.tokens_dtype)
            if ctx.needs_input_grad[4]:  # d flat / d mean = 1
                grad_mean = zeros.index_add(0, tidx, gathered.sum((0, 2))).to(ctx.mean_dtype)
            if ctx.needs_input_grad[5]:  # d flat / d std = tokens
                per_token = (gathered * tokens.to(gathered.dtype)).sum((0, 2))
                grad_std = zeros.index_add(0, tidx, per_token).to(ctx.std_dtype)
        elif ctx.needs_input_grad[0]:
            # d flat / d tokens = std on real entries; padding gets zero gradient.
            grad_tokens = pack_core(grad, src, length, tidx, std_c, zeros,
                                    grad.new_empty(shape)).to(ctx.tokens_dtype)
        return grad_tokens, None, None, None, grad_mean, grad_std, None


def _check_unpack_args(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
                       tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                       num_params: int) -> None:
    if tokens.dim() not in (2, 3) or not tokens.is_floating_point():
        raise ValueError(f"tokens must be a floating (B, L, D) or (L, D) tensor, got shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    if isinstance(num_params, bool) or not isinstance(num_params, numbers.Integral) or num_params < 0:
        raise ValueError(f"num_params must be a non-negative int, got {num_params!r}")
    check_index_args(src_offset, length, tensor_index, mean, std)
    if tokens.shape[-2] != src_offset.numel():
        raise ValueError(f"tokens has {tokens.shape[-2]} tokens (shape {tuple(tokens.shape)}), "
                         f"expected L={src_offset.numel()} like src_offset")
    check_layout_values(src_offset, length, tensor_index, mean.numel(), tokens.shape[-1], num_params,
                        exact_cover=True)


def unpack_ref(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
               tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               num_params: int) -> torch.Tensor:
    """Torch reference of :func:`unpack` (same arguments and result, forward only, no autograd)."""
    _check_unpack_args(tokens, src_offset, length, tensor_index, mean, std, num_params)
    num_params = int(num_params)
    tokens3 = tokens.detach().reshape(-1, *tokens.shape[-2:])
    dtype = compute_dtype(tokens.dtype)
    out = tokens3.new_empty((tokens3.shape[0], num_params), dtype=dtype)
    _unpack_torch(tokens3, src_offset, length, tensor_index, std.detach().to(dtype),
                  mean.detach().to(dtype), out)
    return out.squeeze(0) if tokens.dim() == 2 else out


def unpack(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
           tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, num_params: int,
           *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reassemble flat parameter vectors from normalised tokens, dropping the padding.

    Runs :func:`_unpack_kernel` for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and the
    torch reference otherwise; differentiable w.r.t. ``tokens``, ``mean`` and ``std`` (padding
    entries get zero gradient).

    Args:
        tokens: (B, L, D) or (L, D) floating.
        src_offset, length, tensor_index: (L,) integer layout, as for :func:`~weightdiff.kernels.pack`;
            the tokens must cover each of the ``num_params`` flat positions exactly once.
        mean, std: (T,) per-tensor normalisation statistics.
        num_params: P.
        out: optional (B, P) or (P,) contiguous buffer of the result dtype to write into (not
            allowed when a gradient is needed).

    Returns:
        (B, P) or (P,) float32 (float64 for float64 ``tokens``):
        ``flat[b, src_offset[l] + j] = tokens[b, l, j] * std[t] + mean[t]``, ``t = tensor_index[l]``.

    Raises:
        ValueError: a shape, dtype or index out of range (naming the argument), or tokens that
            do not cover the flat positions exactly once.
    """
    device = tokens.device
    src_offset, length, tensor_index = src_offset.to(device), length.to(device), tensor_index.to(device)
    mean, std = mean.to(device), std.to(device)
    _check_unpack_args(tokens, src_offset, length, tensor_index, mean, std, num_params)
    num_params = int(num_params)
    tokens3 = tokens.reshape(-1, *tokens.shape[-2:])
    needs_grad = torch.is_grad_enabled() and (tokens.requires_grad or mean.requires_grad or std.requires_grad)
    if needs_grad:
        if out is not None:
            raise ValueError("out= cannot be used when a gradient is required (tokens, mean or std "
                             "requires grad); drop out= or run under torch.no_grad()")
        result = _Unpack.apply(tokens3, src_offset, length, tensor_index, mean, std, num_params)
    else:
        dtype = compute_dtype(tokens.dtype)
        shape = (tokens3.shape[0], num_params)
        if out is None:
            result = tokens3.new_empty(shape, dtype=dtype)
        else:
            expected = shape if tokens.dim() == 3 else shape[1:]
            if tuple(out.shape) != expected or out.dtype != dtype or out.device != device \
                    or not out.is_contiguous():
                raise ValueError(f"out must be a contiguous {dtype} tensor of shape {expected} on "
                                 f"{device}, got {out.dtype} {tuple(out.shape)} on {out.device}")
            result = out.view(shape)
        unpack_core(tokens3, src_offset, length, tensor_index, std.to(dtype), mean.to(dtype), result)
    return result.squeeze(0) if tokens.dim() == 2 else result
