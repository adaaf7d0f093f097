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
resampling (:func:`interpolation_tol`), factors taken from an SVD (:func:`svd_factor_tol`), a
sampler that feeds each step's rounding into the next (:func:`steps_tol`), one sum of known terms
added in another order (:func:`sum_tol`), the per-entry affine maps of pack and unpack
(:func:`affine_tol`, :func:`normalize_tol`, :func:`roundtrip_tol`) and a ridge fit's predictions
(:func:`ridge_prediction_tol`). Two runs of the same computation on the same inputs are compared
exactly.
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


def sum_tol(abs_sum: float | torch.Tensor, *, reduction: int | torch.Tensor, roundings: int = 0,
            dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between two computations of a sum of ``reduction`` terms added in different orders.

    A blocked kernel, a vectorised torch reduction, a Triton tree and autograd's backward add the
    same terms ``t_k`` sequentially, pairwise or in SIMD lanes. Whatever the order, each sum is
    within ``λ · sqrt(n) · u · Σ|t_k|`` of the exact one with high probability (Higham & Mary, as
    for :func:`matmul_tol`), so two of them differ by ``λ · sqrt(n) · eps · Σ|t_k|``. The terms
    themselves may be rounded differently on the two sides (a difference, a square, a product by
    a weight) and the sum scaled afterwards (divided by a count): each of those ``roundings``,
    counted over both computations, adds at most ``u · Σ|t_k|``:

        atol = (λ · sqrt(n) + roundings / 2) · eps(dtype) · Σ|t_k|.

    Args:
        abs_sum: ``Σ|t_k|`` (already scaled like the compared sum, e.g. divided by a count), or a
            tensor of them, one per compared sum; the largest bound is returned.
        reduction: ``n``, the number of terms (a tensor like ``abs_sum`` for several sums).
        roundings: the roundings of one term and of the scaling of the sum, both sides together.
        dtype: the dtype both computations ran in.

    Example: the masked MSE of 1,413 squared errors ``t_k`` (``roundings=8``) gets
    ``≈ 1.8e-5 · mean(t_k)``; dropping a single median term moves it by ``≈ 3e-4 · mean(t_k)``
    (``test_masked_mse_tolerance_catches_one_dropped_entry``). The worst-case ``(n - 1) u`` bound
    would be ``≈ 1.7e-4 · mean(t_k)`` there, too loose to see a dropped median term beyond ~2,000 terms.
    """
    s = torch.as_tensor(abs_sum).detach().to(torch.float64)
    n = torch.as_tensor(reduction, dtype=torch.float64).clamp(min=1).expand_as(s)
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()) or roundings < 0:
        raise ValueError(f"sum_tol needs finite abs_sum >= 0 and roundings >= 0, got abs_sum={s.tolist()}, "
                         f"roundings={roundings}")
    if s.numel() == 0:
        return 0.0
    return float(((LAMBDA * n.sqrt() + roundings / 2) * torch.finfo(dtype).eps * s).max())


def affine_tol(*, value: float, scale: torch.Tensor, shift: torch.Tensor,
               dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between two computations of ``x · scale + shift`` with the same ``scale``, ``shift``.

    Each side rounds the product and the sum (once only where they are fused into a multiply-add,
    which a vectorised kernel may do and a loop may not): ``|fl(fl(x s) + h) - (x s + h)| ≤
    u · |x s| + u · |x s + h| ≤ 2u · (|x| |s| + |h|)``. Two sides differ by twice that:

        atol = eps(dtype) · 2 · max_t (value · |scale_t| + |shift_t|).

    Unpack (``y · std + mean``) is this map with ``scale = std``, ``shift = mean``.

    Args:
        value: the largest ``|x|``.
        scale, shift: (T,) the per-tensor scale and shift.
        dtype: the dtype of the computation.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"affine_tol needs a finite value >= 0, got {value}")
    s, h = scale.detach().double().abs(), shift.detach().double().abs()
    return 2 * torch.finfo(dtype).eps * float((value * s + h).max())


def normalize_tol(*, value: float, mean: torch.Tensor, std: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between pack's ``x · fl(1 / std) + fl(-mean / std)`` and ``(x - mean) / std``.

    Pack rounds ``1 / std`` and ``-mean / std`` once each (from float64), then the product and the
    sum: at most ``u · (3 |x| + 2 |mean|) / std``. The specification rounds the difference and the
    quotient: at most ``2u · (|x| + |mean|) / std``. Together ``5u · (|x| + |mean|) / std``, and
    with one ``u`` for the second-order terms

        atol = 3 · eps(dtype) · max_t (value + |mean_t|) / std_t.

    Gradients of pack by ``flat`` (``g · fl(1 / std)`` against ``g / std``) are the case ``mean = 0``.

    Args:
        value: the largest ``|x|``.
        mean, std: (T,) the per-tensor statistics.
        dtype: the dtype of the computation.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"normalize_tol needs a finite value >= 0, got {value}")
    m, s = mean.detach().double().abs(), std.detach().double().abs()
    return 3 * torch.finfo(dtype).eps * float(((value + m) / s).max())


def roundtrip_tol(*, value: float, mean: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between ``unpack(pack(x))`` and ``x``.

    Pack's result is off by at most ``u · (3 |x| + 2 |mean|) / std`` (:func:`normalize_tol`), which
    unpack multiplies back by ``std``; unpack then rounds the product ``y · std`` (at most
    ``u · (|x| + |mean|)``) and the sum (at most ``u · |x|``). Together ``5u · (|x| + |mean|)``, and
    with one ``u`` for the second-order terms

        atol = 3 · eps(dtype) · (value + max_t |mean_t|).

    ``std`` drops out: a wrong ``std`` on either side moves entries by ``|x - mean|`` times the
    relative error, far above this.

    Args:
        value: the largest ``|x|``.
        mean: (T,) the per-tensor means.
        dtype: the dtype of the computation.
    """
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"roundtrip_tol needs a finite value >= 0, got {value}")
    return 3 * torch.finfo(dtype).eps * (value + float(mean.detach().double().abs().max()))


def ridge_prediction_tol(features: torch.Tensor, new_features: torch.Tensor, coef: torch.Tensor,
                         intercept: torch.Tensor, alpha: float, *, dtype: torch.dtype = torch.float32) -> float:
    """Absolute tolerance between a ridge fit's predictions and the exact map ``y = x · W + b`` it was fitted to.

    The fit standardises the features, ``z = (x - μ) / s`` (``Z`` the centred training rows,
    ``G = ZᵀZ``, ``λ_min`` its smallest eigenvalue), in whose coordinates the map's coefficients
    are ``β = s ⊙ W`` (per output column). The prediction at ``z₀`` is
    ``ŷ = ȳ + z₀ᵀ (G + αI)⁻¹ Zᵀ y``, and it departs from ``x₀ · W + b`` in four ways:

    * the targets were rounded to ``dtype``: ``|e_i| ≤ (C + 1) u · (|x_i| |W| + |b|)`` (a sum of
      ``C`` products and ``b``; Higham §3.1), and ``ŷ`` moves by ``h · e`` with
      ``‖h‖₂ ≤ sqrt(1 / n + ‖z₀‖² / λ_min)``;
    * the penalty shrinks the coefficients to ``β - α (G + αI)⁻¹ β``: at most
      ``α · ‖z₀‖ · ‖β‖ / (λ_min + α)``;
    * the float64 Cholesky solve is backward stable: ``eps(float64) · cond(G + αI)`` relative to
      ``‖z₀‖ ‖β‖ + |ȳ|``;
    * the prediction is rounded to ``dtype`` (``u · |ŷ|``) and the reference ``x₀ · W + b``
      computed in it (``(C + 1) u · (|x₀| |W| + |b|)``).

    Each is a first-order bound, not an estimate, so no safety factor is applied; the largest sum
    over new rows and output columns is returned. For 40 standard-normal rows of 3 features and
    ``α = 1e-6`` this is ~4e-6; ``α = 1e-3`` shrinks predictions by ~1e-4.

    Args:
        features: (n, C) the training conditions.
        new_features: (m, C) the conditions predicted at.
        coef, intercept: (C, P) and (P,) the exact map.
        alpha: the ridge penalty of the fit.
        dtype: the dtype of the targets, the prediction and the reference.
    """
    x, x0 = features.detach().double(), new_features.detach().double()
    w, b = coef.detach().double(), intercept.detach().double()
    n, c = x.shape
    if n < 2 or alpha < 0:
        raise ValueError(f"ridge_prediction_tol needs >= 2 training rows and alpha >= 0, got n={n}, alpha={alpha}")
    u = torch.finfo(dtype).eps / 2
    mu, s = x.mean(0), x.std(0)
    z, z0 = (x - mu) / s, (x0 - mu) / s
    eig = torch.linalg.eigvalsh(z.T @ z)
    lam_min, lam_max = float(eig[0]), float(eig[-1])
    beta = s[:, None] * w  # (C, P)
    beta_norm = beta.norm(dim=0)  # (P,)
    z0_norm = z0.norm(dim=1, keepdim=True)  # (m, 1)
    target_err = (c + 1) * u * (x.abs() @ w.abs() + b.abs())  # (n, P)
    hat = (1 / n + z0_norm ** 2 / lam_min).sqrt()  # (m, 1)
    y_mean = (x @ w + b).mean(0).abs()  # (P,)
    cond = (lam_max + alpha) / (lam_min + alpha)
    bound = (hat * target_err.norm(dim=0)
             + alpha * z0_norm * beta_norm / (lam_min + alpha)
             + torch.finfo(torch.float64).eps * cond * (z0_norm * beta_norm + y_mean)
             + u * (x0 @ w + b).abs() + (c + 1) * u * (x0.abs() @ w.abs() + b.abs()))
    return float(bound.max())
