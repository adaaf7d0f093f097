"""unpack: normalised tokens (B, L, D) -> flat parameter vectors (B, P); the inverse of pack.

``flat[b, src_offset[l] + j] = tokens[b, l, j] * std[t] + mean[t]`` with ``t = tensor_index[l]``
for ``j < length[l]``; padding entries are dropped. The tokens must cover every flat position
exactly once. See the package docstring for a worked example of the layout; :func:`unpack_ref` is
that definition written as a loop over tokens.

Unpack is the scatter :func:`~weightdiff.kernels._ragged.unpack_core` with ``scale = std`` and
``shift = mean``; its gradient is the gather :func:`~weightdiff.kernels._ragged.pack_core` with
``scale = std`` (or 1), ``shift = 0``.
"""

from __future__ import annotations

import numbers

import torch
from torch.autograd.function import once_differentiable

from weightdiff.kernels._dispatch import check_index_args, check_layout_values, compute_dtype
from weightdiff.kernels._ragged import pack_core, unpack_core


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
    """Specification of :func:`unpack`: the definition, one token at a time (forward only).

    Same arguments, checks and result dtype as :func:`unpack`; slow (a python loop over the L
    tokens), for tests.
    """
    _check_unpack_args(tokens, src_offset, length, tensor_index, mean, std, num_params)
    dtype = compute_dtype(tokens.dtype)
    y = tokens.detach().to(dtype).reshape(-1, *tokens.shape[-2:])  # (B, L, D)
    mean, std = mean.detach().to(dtype), std.detach().to(dtype)
    out = y.new_empty((y.shape[0], int(num_params)))  # the tokens cover every entry (checked)
    for tok, (s, n, t) in enumerate(zip(src_offset.tolist(), length.tolist(), tensor_index.tolist())):
        out[:, s:s + n] = y[:, tok, :n] * std[t] + mean[t]
    return out.squeeze(0) if tokens.dim() == 2 else out


def unpack(tokens: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
           tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, num_params: int,
           *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Reassemble flat parameter vectors from normalised tokens, dropping the padding.

    Runs the Triton kernel for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and the
    optimised torch path otherwise; differentiable w.r.t. ``tokens``, ``mean`` and ``std`` (padding
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
