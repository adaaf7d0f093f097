"""Tolerances for comparing two float computations of the same quantity.

Two ways of computing the same output (a merged weight ``W0 + s·B·A`` against PEFT's
``x·W0 + s·(x·A)·B``, a blocked kernel against a naive loop, a batched forward against a module)
sum the same products in different orders and groupings, and the order depends on the CPU's
kernels. Each sum of ``n`` products in a dtype with unit roundoff ``u = eps / 2`` carries an
error of at most ``n·u·Σ|a_k·b_k|`` (Higham, *Accuracy and Stability of Numerical Algorithms*,
2002, §3.1); with rounding errors of random sign it is, with high probability, below
``λ·sqrt(n)·u·Σ|a_k·b_k|`` (Higham & Mary, SIAM J. Sci. Comput. 41(5), 2019). Two computations
differ by at most the sum of their errors (``2u = eps``), and every layer of a network adds its
own rounding to what it passes on, so for a chain of ``depth`` such reductions

    atol = λ · depth · sqrt(n) · eps(dtype) · scale,

with ``n`` the longest reduction, ``scale`` the magnitude of the values summed (the largest
``|output|`` of the reference is used for networks whose weights and activations are O(1)) and
``λ = 4``. For the LoRA'd ``DigitsCNN`` of ``test_nets.py`` (fan-in 256, three layers, outputs up
to ~7) this gives ~2e-4: the rounding differences seen across CPUs (up to ~1.3e-5) stay more than
ten times below it, while a merge with the scaling 1 % off moves the outputs by more than a
hundred times it (``test_lora_tolerance_catches_a_wrong_merge``).

Computations that are not one chain of sums of products get their own bounds below: a bilinear
resampling (:func:`interpolation_tol`), factors taken from an SVD (:func:`svd_factor_tol`) and a
sampler that feeds each step's rounding into the next (:func:`steps_tol`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

LAMBDA = 4.0


def matmul_tol(*, reduction: int, scale: float, dtype: torch.dtype = torch.float32, depth: int = 1) -> float:
    """Absolute tolerance between two computations of ``depth`` chained sums of ``reduction`` products.

    Args:
        reduction: the longest sum (a layer's fan-in: in_features, or in_channels × kernel size).
        scale: the magnitude of the summed values (the reference's largest ``|output|``).
        dtype: the dtype both computations ran in.
        depth: how many such reductions are chained (layers of a network).

    Example: ``matmul_tol(reduction=256, scale=5.0, depth=3)`` ≈ 1.1e-4 (float32).
    """
    if reduction < 1 or depth < 1 or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"matmul_tol needs reduction >= 1, depth >= 1 and a finite scale >= 0, got "
                         f"reduction={reduction}, depth={depth}, scale={scale}")
    return LAMBDA * depth * math.sqrt(reduction) * torch.finfo(dtype).eps * scale


def network_tol(module: nn.Module, reference: torch.Tensor) -> float:
    """:func:`matmul_tol` for two computations of ``module``'s output, ``reference`` one of them.

    The reduction is the module's largest fan-in over its ``nn.Linear`` / ``nn.Conv*d`` layers and
    the depth their number. Pass the plain network, not a PEFT wrapper: a LoRA branch runs beside
    its layer (its rank-r sums are shorter than the layer's), so it adds no depth.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no Linear or Conv layer to derive a tolerance from")
    fan_in = max(m.weight[0].numel() for m in layers)
    return matmul_tol(reduction=fan_in, scale=float(reference.detach().abs().max()), dtype=reference.dtype,
                      depth=len(layers))


def interpolation_tol(*, size: int, scale: float, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between a bilinear resampling (``F.grid_sample``) and the exact pixel move.

    A rotation by a multiple of 90° lands every output pixel exactly on a source pixel, which
    ``torch.rot90`` copies. ``affine_grid`` computes the sample point in normalised coordinates
    ``[-1, 1]`` (a sum of three products: a few ``u`` of error) and ``grid_sample`` scales it by
    ``size / 2`` to pixels, so the point is off by ``δ ≤ c · size · u`` pixels with ``c`` a small
    count of roundings. Moving a bilinear sample by ``δ`` along each axis changes it by at most
    ``δ`` times the difference of neighbouring pixels (``≤ 2 · scale``, a zero-padded border
    included), and the four-term weighted sum adds a few ``u · scale``, so

        atol = λ · size · eps(dtype) · scale.

    For 8 × 8 images in [0, 1] this is ~3.8e-6; rotating 0.001° too far moves a pixel by ~1e-4.

    Args:
        size: the image's largest side in pixels.
        scale: the largest ``|pixel|`` of the image.
        dtype: the dtype of the image and the grid.
    """
    if size < 1 or not math.isfinite(scale) or scale < 0:
        raise ValueError(f"interpolation_tol needs size >= 1 and a finite scale >= 0, got size={size}, scale={scale}")
    return LAMBDA * size * torch.finfo(dtype).eps * scale


def svd_factor_tol(singular_values: torch.Tensor, perturbation: float, *, scale: float,
                   dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance on the SVD factors ``u_i sqrt(σ_i)`` of a matrix perturbed by ``perturbation``.

    When a matrix ``M`` changes by ``E`` (``‖E‖₂ = perturbation``), each singular value moves by at
    most ``‖E‖₂`` (Weyl) and each singular vector turns by at most ``‖E‖₂ / gap_i`` (Wedin, BIT 12,
    1972), ``gap_i`` being the distance from ``σ_i`` to the other singular values and to 0. The
    factor ``u_i sqrt(σ_i)`` then moves by at most ``‖E‖₂ · (sqrt(σ_i) / gap_i + 1 / (2 sqrt(σ_i)))``
    (first order), and rounding the factor to ``dtype`` adds ``eps · scale``:

        atol = λ · (‖E‖₂ · max_i (sqrt(σ_i) / gap_i + 1 / (2 sqrt(σ_i))) + eps(dtype) · scale).

    Nearly equal singular values make the factors ill-determined, and the bound grows with them.

    Args:
        singular_values: the nonzero singular values ``σ`` (k,) of ``M``, any order.
        perturbation: ``‖E‖₂``, the spectral norm of the change of ``M`` (e.g. from rounding its
            factors to ``dtype``).
        scale: the largest ``|entry|`` of the factors.
        dtype: the dtype the factors are compared in.
    """
    s = singular_values.detach().double().flatten()
    if s.numel() == 0 or not bool((s > 0).all()) or perturbation < 0 or not math.isfinite(perturbation):
        raise ValueError(f"svd_factor_tol needs positive singular values and a finite perturbation >= 0, got "
                         f"{s.tolist()} and {perturbation}")
    others = (s[:, None] - s[None, :]).abs() + torch.diag(torch.full_like(s, math.inf))
    gap = torch.minimum(others.min(dim=1).values, s)
    gain = float((s.sqrt() / gap + 0.5 / s.sqrt()).max())
    return LAMBDA * (perturbation * gain + torch.finfo(dtype).eps * scale)


def steps_tol(per_step: float, steps: int) -> float:
    """Absolute tolerance between two runs of a ``steps``-step sampler whose evaluations round differently.

    A DDIM step with the clean-sample parameterisation is ``x_prev = c_0 x̂0 + c_t x_t`` with
    ``c_0 = sqrt(ᾱ_prev) - sqrt(1 - ᾱ_prev) sqrt(ᾱ) / sqrt(1 - ᾱ)`` and
    ``c_t = sqrt(1 - ᾱ_prev) / sqrt(1 - ᾱ)``, both in ``[0, 1]`` and ``c_0 + c_t ≤ sqrt(ᾱ_prev) +
    sqrt(1 - ᾱ_prev) ≤ sqrt(2)``. Each evaluation adds its own rounding (``per_step``, e.g.
    :func:`network_tol` of the denoiser at the sample's scale), and a difference already in
    ``x_t`` reaches ``x_prev`` through both terms; with the denoiser's gain from ``x_t`` to ``x̂0`` at
    most 1 (it maps noisy inputs towards clean ones) a step grows it by at most ``G = sqrt(2)``.
    After ``steps`` steps the runs differ by at most

        atol = per_step · (1 + G + ... + G^(steps - 1)).

    Args:
        per_step: the tolerance of one evaluation at the scale of the sample.
        steps: the number of evaluations.

    Example: ``steps_tol(1e-4, 3)`` ≈ 4.4e-4.
    """
    if steps < 1 or per_step < 0 or not math.isfinite(per_step):
        raise ValueError(f"steps_tol needs steps >= 1 and a finite per_step >= 0, got steps={steps}, "
                         f"per_step={per_step}")
    growth = math.sqrt(2.0)
    return per_step * sum(growth ** k for k in range(steps))
