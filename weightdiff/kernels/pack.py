"""pack: flat parameter vectors (B, P) -> per-tensor normalised, zero-padded tokens (B, L, D).

``out[b, l, j] = (flat[b, src_offset[l] + j] - mean[t]) / std[t]`` with ``t = tensor_index[l]``
for ``j < length[l]``, and exactly ``0`` for ``length[l] <= j < D``. See the package docstring for
a worked example of the layout; :func:`pack_ref` is that definition written as a loop over tokens.

Pack is one affine map per entry, ``x * scale[t] + shift[t]``, gathered from the flat vector by
:func:`~weightdiff.kernels._ragged.pack_core`, with ``scale = 1 / std`` and ``shift = -mean / std``
(rounded to float32 from float64): one multiply-add per entry, which lets the torch path run at
copy speed in a single pass, within a couple of ulp of ``(x - mean) / std`` and exact for
``mean = 0, std = 1``. Its gradient is the scatter :func:`~weightdiff.kernels._ragged.unpack_core`
with ``scale = 1 / std``, ``shift = 0``.
"""

from __future__ import annotations

import numbers

import torch
from torch.autograd.function import once_differentiable

from weightdiff.kernels._dispatch import check_index_args, check_layout_values, compute_dtype
from weightdiff.kernels._ragged import pack_core, unpack_core


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
    """Specification of :func:`pack`: the definition, one token at a time (forward only).

    Same arguments, checks and result dtype as :func:`pack`; slow (a python loop over the L
    tokens), for tests.
    """
    _check_pack_args(flat, src_offset, length, tensor_index, mean, std, token_size)
    dtype = compute_dtype(flat.dtype)
    x = flat.detach().to(dtype).reshape(-1, flat.shape[-1])  # (B, P)
    mean, std = mean.detach().to(dtype), std.detach().to(dtype)
    out = x.new_zeros((x.shape[0], src_offset.numel(), int(token_size)))  # padding stays 0
    for tok, (s, n, t) in enumerate(zip(src_offset.tolist(), length.tolist(), tensor_index.tolist())):
        out[:, tok, :n] = (x[:, s:s + n] - mean[t]) / std[t]
    return out.squeeze(0) if flat.dim() == 1 else out


def pack(flat: torch.Tensor, src_offset: torch.Tensor, length: torch.Tensor,
         tensor_index: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, token_size: int,
         *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Cut flat parameter vectors into per-tensor normalised tokens with zero padding.

    Runs the Triton kernel for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and the
    optimised torch path otherwise; differentiable w.r.t. ``flat``, ``mean`` and ``std``.

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
