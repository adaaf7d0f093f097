"""masked_mse: mean squared error over the real (unpadded) entries of ragged tokens.

``loss = sum_n w[n] * sum_{j < length[n]} (pred[n, j] - target[n, j])^2 / sum_n min(length[n], D)``

Padding entries (``j >= length[n]``) are never read, so whatever they hold (even NaN) changes
neither the loss nor any gradient, and they get exactly zero gradient. Rows with ``length = 0``
(padding tokens of a padded batch) contribute nothing. Callers with (B, L, D) tensors pass
``pred.reshape(B * L, D)`` and ``length`` repeated per batch row.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from weightdiff.kernels._dispatch import TILE_ELEMENTS, compute_dtype, jit, next_power_of_2, tl, use_triton


@jit
def _masked_mse_kernel(pred_ptr, target_ptr, len_ptr, weight_ptr, partial_ptr, num_rows, token_size,
                       HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program i writes the (weighted) squared error of rows [i * BLOCK_N, (i + 1) * BLOCK_N) to
    # partial[i]; the partial sums are added by torch (deterministic, unlike atomic adds).
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    n = tl.load(len_ptr + rows, mask=row_ok, other=0)
    valid = (cols[None, :] < n[:, None]) & (cols[None, :] < token_size)
    offs = rows[:, None].to(tl.int64) * token_size + cols[None, :]
    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(partial_ptr.dtype.element_ty)
    t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(partial_ptr.dtype.element_ty)
    diff = p - t
    row_sum = tl.sum(diff * diff, axis=1)
    if HAS_WEIGHT:
        row_sum = row_sum * tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(row_sum.dtype)
    tl.store(partial_ptr + pid, tl.sum(row_sum, axis=0))


@jit
def _masked_mse_backward_kernel(pred_ptr, target_ptr, len_ptr, weight_ptr, coef_ptr, grad_ptr,
                                num_rows, token_size,
                                HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_pred[n, j] = coef * w[n] * (pred - target), coef = 2 * dloss / count; 0 on padding.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    n = tl.load(len_ptr + rows, mask=row_ok, other=0)
    in_row = row_ok[:, None] & (cols[None, :] < token_size)
    valid = in_row & (cols[None, :] < n[:, None])
    offs = rows[:, None].to(tl.int64) * token_size + cols[None, :]
    coef = tl.load(coef_ptr)
    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(coef.dtype)
    t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(coef.dtype)
    g = (p - t) * coef
    if HAS_WEIGHT:
        g = g * tl.load(weight_ptr + rows, mask=row_ok, other=0.0).to(coef.dtype)[:, None]
    g = tl.where(valid, g, 0.0)
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=in_row)


def _blocks(num_rows: int, token_size: int) -> tuple[int, int, int]:
    block_d = next_power_of_2(token_size)
    block_n = max(1, min(next_power_of_2(num_rows), TILE_ELEMENTS // block_d))
    return block_n, block_d, -(-num_rows // block_n)


def _valid_count(length: torch.Tensor, token_size: int, dtype: torch.dtype) -> torch.Tensor:
    # At least 1, so a batch made only of padding gives loss 0 rather than 0 / 0.
    return length.clamp(0, token_size).sum().clamp(min=1).to(dtype)


class _MaskedMSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
                row_weight: torch.Tensor | None) -> torch.Tensor:
        num_rows, token_size = pred.shape
        dtype = compute_dtype(pred.dtype)
        pred, target, length = pred.contiguous(), target.contiguous(), length.contiguous()
        weight = row_weight.contiguous() if row_weight is not None else pred  # dummy pointer
        block_n, block_d, grid = _blocks(num_rows, token_size)
        partial = torch.zeros(max(grid, 1), dtype=dtype, device=pred.device)
        if grid and token_size:
            _masked_mse_kernel[(grid,)](pred, target, length, weight, partial, num_rows, token_size,
                                        HAS_WEIGHT=row_weight is not None, BLOCK_N=block_n, BLOCK_D=block_d)
        count = _valid_count(length, token_size, dtype)
        ctx.save_for_backward(pred, target, length, row_weight, count)
        return partial.sum() / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        pred, target, length, row_weight, count = ctx.saved_tensors
        num_rows, token_size = pred.shape
        grad_pred = grad_target = grad_weight = None
        coef = (2 * grad.to(count.dtype) / count).reshape(1)  # stays on device: no sync
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            grad_buf = torch.empty((num_rows, token_size), dtype=count.dtype, device=pred.device)
            block_n, block_d, grid = _blocks(num_rows, token_size)
            if grid and token_size:
                _masked_mse_backward_kernel[(grid,)](
                    pred, target, length, row_weight if row_weight is not None else pred, coef, grad_buf,
                    num_rows, token_size,
                    HAS_WEIGHT=row_weight is not None, BLOCK_N=block_n, BLOCK_D=block_d)
            if ctx.needs_input_grad[0]:
                grad_pred = grad_buf.to(pred.dtype)
            if ctx.needs_input_grad[1]:
                grad_target = (-grad_buf).to(target.dtype)
        if ctx.needs_input_grad[3]:
            # Rarely needed (weights are usually fixed), so plain torch: d loss / d w[n] = row_sq[n] / count.
            valid = torch.arange(token_size, device=pred.device) < length[:, None]
            diff = torch.where(valid, pred.to(count.dtype) - target.to(count.dtype), 0.0)
            grad_weight = (diff.square().sum(1) * (grad / count)).to(row_weight.dtype)
        return grad_pred, grad_target, None, grad_weight


def _masked_mse_torch(pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
                      row_weight: torch.Tensor | None) -> torch.Tensor:
    """Torch path of :func:`masked_mse` (checked arguments; differentiable by autograd)."""
    dtype = compute_dtype(pred.dtype)
    token_size = pred.shape[1]
    padding = torch.arange(token_size, device=pred.device) >= length[:, None]
    # masked_fill rather than a multiply by the mask: NaN/Inf in padding must not leak into the
    # loss; in place is safe because subtraction's backward does not need its result.
    diff = (pred.to(dtype) - target.to(dtype)).masked_fill_(padding, 0.0)
    per_row = torch.linalg.vecdot(diff, diff)  # (N,), without materialising diff ** 2
    if row_weight is not None:
        per_row = per_row * row_weight.to(dtype)
    return per_row.sum() / _valid_count(length, token_size, dtype)


def masked_mse_ref(pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
                   row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Specification of :func:`masked_mse`: the formula in the module docstring, by direct masking.

    Same arguments, checks and result dtype as :func:`masked_mse`; differentiable by autograd.
    """
    _check_args(pred, target, length, row_weight)
    dtype = compute_dtype(pred.dtype)
    real = torch.arange(pred.shape[1], device=pred.device) < length[:, None]  # (N, D)
    squared = torch.where(real, pred.to(dtype) - target.to(dtype), 0.0) ** 2
    weight = torch.ones(pred.shape[0], dtype=dtype, device=pred.device) if row_weight is None \
        else row_weight.to(dtype)
    return (weight[:, None] * squared).sum() / real.sum().clamp(min=1)


def _check_args(pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
                row_weight: torch.Tensor | None) -> None:
    if pred.dim() != 2 or not pred.is_floating_point():
        raise ValueError(f"pred must be a floating (N, D) tensor, got shape {tuple(pred.shape)} and "
                         f"dtype {pred.dtype}; reshape (B, L, D) to (B * L, D)")
    if target.shape != pred.shape or not target.is_floating_point():
        raise ValueError(f"target must be a floating tensor of shape {tuple(pred.shape)} like pred, got "
                         f"shape {tuple(target.shape)} and dtype {target.dtype}")
    if length.shape != pred.shape[:1] or length.dtype.is_floating_point or length.dtype == torch.bool:
        raise ValueError(f"length must be an integer tensor of shape ({pred.shape[0]},), one entry per "
                         f"row of pred, got shape {tuple(length.shape)} and dtype {length.dtype}")
    if row_weight is not None and (row_weight.shape != pred.shape[:1] or not row_weight.is_floating_point()):
        raise ValueError(f"row_weight must be a floating tensor of shape ({pred.shape[0]},), got shape "
                         f"{tuple(row_weight.shape)} and dtype {row_weight.dtype}")
    for name, t in (("target", target), ("length", length), ("row_weight", row_weight)):
        if t is not None and t.device != pred.device:
            raise ValueError(f"{name} is on {t.device}, expected {pred.device} like pred")


def masked_mse(pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
               row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the first ``length[n]`` entries of each row.

    Runs the Triton kernels for CUDA tensors (or with ``WEIGHTDIFF_FORCE_TRITON=1``) and a
    vectorised torch path otherwise; differentiable w.r.t. ``pred``, ``target`` and ``row_weight``.

    Args:
        pred, target: (N, D) floating.
        length: (N,) integer, number of real entries per row (values outside [0, D] are clamped).
        row_weight: optional (N,) floating weight of each row's squared error; it scales the
            numerator only, the denominator stays the number of real entries.

    Returns:
        () float32 (float64 for float64 ``pred``); 0 when no row has a real entry.

    Raises:
        ValueError: naming the argument whose shape, dtype or device disagrees with ``pred``.
    """
    _check_args(pred, target, length, row_weight)
    if use_triton(pred, target):
        return _MaskedMSE.apply(pred, target, length, row_weight)
    return _masked_mse_torch(pred, target, length, row_weight)
