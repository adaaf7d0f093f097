"""Tests for weightdiff.kernels: pack, unpack and masked_mse.

Triton decides at import time whether ``@triton.jit`` kernels are interpreted, and other test
modules may import the kernels first. So the Triton kernels are tested in a child pytest process
started with ``TRITON_INTERPRET=1 WEIGHTDIFF_FORCE_TRITON=1``, which runs this same file: there
the public ops dispatch to Triton and every test compares them with the short specifications
(``*_ref``) and with a naive autograd oracle. In this process the ops run the optimised torch
path, with each of its two strategies (``torch_path``).

Moving entries is exact, so pack and unpack without normalisation are compared exactly; with it
the sides round the affine map differently, and sums (the masked MSE, the gradients of the
statistics) add in another order. Those comparisons use the bounds of ``tests/_tolerance.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests._tolerance import affine_tol, normalize_tol, roundtrip_tol, sum_tol
from weightdiff.kernels import _ragged, masked_mse, masked_mse_ref, pack, pack_ref, unpack, unpack_ref

CHILD_ENV = "WEIGHTDIFF_KERNEL_TEST_CHILD"
IN_CHILD = os.environ.get(CHILD_ENV) == "1"
torch_path_only = pytest.mark.skipif(IN_CHILD, reason="tests internals of the torch path")

SIZES = [1, 15, 100, 301]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_layout(sizes: list[int], token_size: int, order: str = "contiguous", seed: int = 0):
    """Per-token (src_offset, length, tensor_index), num_params and random (mean, std) (T,)."""
    src, length, tidx = [], [], []
    offset = 0
    for t, n in enumerate(sizes):
        for c in range(0, n, token_size):
            src.append(offset + c)
            length.append(min(token_size, n - c))
            tidx.append(t)
        offset += n
    if order == "with_empty":  # a zero-length token (the tokenizer's padding tokens look like this)
        src.insert(2, offset)
        length.insert(2, 0)
        tidx.insert(2, 0)
    src, length, tidx = (torch.tensor(v, dtype=torch.long) for v in (src, length, tidx))
    if order == "shuffled":  # tokens out of flat order: every token is a run of its own
        perm = torch.randperm(src.numel(), generator=torch.Generator().manual_seed(seed))
        src, length, tidx = src[perm], length[perm], tidx[perm]
    g = torch.Generator().manual_seed(seed + 1)
    mean = torch.randn(len(sizes), generator=g)
    std = torch.rand(len(sizes), generator=g) + 0.5
    return src, length, tidx, offset, mean, std


def valid_mask(length: torch.Tensor, token_size: int) -> torch.Tensor:
    return torch.arange(token_size) < length[:, None]  # (L, D)


def naive_pack(flat, src, length, tidx, mean, std, token_size):
    """Oracle: the definition of pack, written with differentiable gathers."""
    valid = valid_mask(length, token_size)
    idx = (src[:, None] + torch.arange(token_size)).masked_fill(~valid, 0)
    y = (flat[..., idx] - mean[tidx][:, None]) / std[tidx][:, None]
    return torch.where(valid, y, 0.0)


def per_tensor_sums(values: torch.Tensor, tidx: torch.Tensor, length: torch.Tensor,
                    num_tensors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums (T,) of ``values`` (B, L, D) over the batch and the real entries of each tensor, and their counts (T,)."""
    real = valid_mask(length, values.shape[-1])
    per_token = (values.double() * real).sum((0, 2))
    sums = torch.zeros(num_tensors, dtype=torch.float64).index_add_(0, tidx, per_token)
    counts = torch.zeros(num_tensors, dtype=torch.float64).index_add_(0, tidx, length.double()) * values.shape[0]
    return sums, counts


def mse_tol(pred: torch.Tensor, target: torch.Tensor, length: torch.Tensor,
            weight: torch.Tensor | None = None) -> float:
    """Bound between two computations of the masked MSE: a mean of n weighted squared errors.

    Each side rounds a term's difference, its square and its product by the weight, and the
    quotient by n: 8 roundings in all (``sum_tol``'s ``roundings``).
    """
    real = valid_mask(length, pred.shape[1])
    w = torch.ones(pred.shape[0]) if weight is None else weight
    terms = (w.double()[:, None] * (pred.detach().double() - target.detach().double()) ** 2)[real]
    n = max(terms.numel(), 1)
    return sum_tol(terms.sum() / n, reduction=n, roundings=8)


def naive_unpack(tokens, src, length, tidx, mean, std, num_params):
    """Oracle: the definition of unpack (tokens cover [0, P) exactly once, so a sort inverts it)."""
    token_size = tokens.shape[-1]
    valid = valid_mask(length, token_size)
    y = tokens * std[tidx][:, None] + mean[tidx][:, None]
    pos = (src[:, None] + torch.arange(token_size))[valid]
    assert torch.equal(pos.sort().values, torch.arange(num_params))
    return y[..., valid][..., torch.argsort(pos)]


@pytest.fixture(params=["loop", "gather"])
def torch_path(request, monkeypatch):
    """Force the torch path's strategy: the loop over contiguous runs, or one gather over all tokens.

    Under Triton (the child process) the strategy does not apply, so only one variant runs there.
    """
    if IN_CHILD:
        if request.param == "gather":
            pytest.skip("the torch path's strategy does not apply to the Triton kernels")
        return
    threshold = 0 if request.param == "loop" else 1 << 62
    for name in ("_PACK_MIN_ELEMENTS_PER_RUN", "_UNPACK_MIN_ELEMENTS_PER_RUN"):
        monkeypatch.setattr(_ragged, name, threshold)


LAYOUTS = [(d, order) for d in (7, 16, 64) for order in ("contiguous", "shuffled")] + [(16, "with_empty")]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("token_size,order", LAYOUTS)
def test_pack_matches_reference_and_pads_with_exact_zeros(token_size, order, batch, torch_path):
    src, length, tidx, num_params, mean, std = make_layout(SIZES, token_size, order)
    flat = torch.randn(batch, num_params)
    out = pack(flat, src, length, tidx, mean, std, token_size)
    assert out.shape == (batch, src.numel(), token_size) and out.dtype == torch.float32
    atol = normalize_tol(value=float(flat.abs().max()), mean=mean, std=std)
    torch.testing.assert_close(out, pack_ref(flat, src, length, tidx, mean, std, token_size), rtol=0, atol=atol)
    torch.testing.assert_close(out, naive_pack(flat, src, length, tidx, mean, std, token_size), rtol=0, atol=atol)
    pad = ~valid_mask(length, token_size)
    assert pad.any() and bool((out[:, pad] == 0).all())
    # Padding stays exactly zero even with a mean that maps real zeros far from 0.
    out_shifted = pack(flat, src, length, tidx, mean + 100.0, std, token_size)
    assert bool((out_shifted[:, pad] == 0).all())


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("token_size,order", LAYOUTS)
def test_unpack_matches_reference_and_drops_padding(token_size, order, batch, torch_path):
    src, length, tidx, num_params, mean, std = make_layout(SIZES, token_size, order)
    tokens = torch.randn(batch, src.numel(), token_size)
    flat = unpack(tokens, src, length, tidx, mean, std, num_params)
    assert flat.shape == (batch, num_params) and flat.dtype == torch.float32
    atol = affine_tol(value=float(tokens.abs().max()), scale=std, shift=mean)
    torch.testing.assert_close(flat, unpack_ref(tokens, src, length, tidx, mean, std, num_params), rtol=0, atol=atol)
    torch.testing.assert_close(flat, naive_unpack(tokens, src, length, tidx, mean, std, num_params), rtol=0,
                               atol=atol)
    garbage = tokens.clone()
    garbage[:, ~valid_mask(length, token_size)] = float("nan")
    assert torch.equal(unpack(garbage, src, length, tidx, mean, std, num_params), flat)


# Tensor sizes at every ragged boundary of the token sizes below: empty, a single entry, one short
# of, exactly and one past a whole token (D = 7 and 16), and large odd sizes.
BOUNDARY_SIZES = [0, 1, 6, 7, 8, 15, 16, 17, 100, 301]
EPS = torch.finfo(torch.float32).eps
# The masked MSE's gradient 2 w (pred - target) / n is products and quotients only: each side
# rounds the difference, the products by w and by 2 (exact) and the quotient by n, at most 4
# roundings of u = eps / 2 each, so the two sides agree to 8u relative.
GRAD_RTOL = 4 * EPS


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("order", ["contiguous", "shuffled", "with_empty"])
@pytest.mark.parametrize("token_size", [1, 7, 16, 64])
def test_ops_match_specification_on_ragged_boundaries(token_size, order, batch, torch_path):
    """The optimised paths against the short ``*_ref`` specifications, with rounding-derived bounds."""
    src, length, tidx, num_params, mean, std = make_layout(BOUNDARY_SIZES, token_size, order)
    zeros, ones = torch.zeros_like(mean), torch.ones_like(std)
    layout = (src, length, tidx)
    flat = torch.randn(batch, num_params) * 3
    # Without normalisation pack and unpack only move entries: exact.
    identity = pack(flat, *layout, zeros, ones, token_size)
    torch.testing.assert_close(identity, pack_ref(flat, *layout, zeros, ones, token_size), rtol=0, atol=0)
    torch.testing.assert_close(unpack(identity, *layout, zeros, ones, num_params),
                               unpack_ref(identity, *layout, zeros, ones, num_params), rtol=0, atol=0)

    # pack computes x * fl(1 / std) + fl(-mean / std), the specification (x - mean) / std.
    tokens = pack(flat, *layout, mean, std, token_size)
    atol = normalize_tol(value=float(flat.abs().max()), mean=mean, std=std)
    torch.testing.assert_close(tokens, pack_ref(flat, *layout, mean, std, token_size), rtol=0, atol=atol)
    # unpack computes mean + std * y, possibly fused; the specification rounds y * std, then the sum.
    y = torch.randn(batch, src.numel(), token_size) * 3
    atol = affine_tol(value=float(y.abs().max()), scale=std, shift=mean)
    torch.testing.assert_close(unpack(y, *layout, mean, std, num_params),
                               unpack_ref(y, *layout, mean, std, num_params), rtol=0, atol=atol)

    # masked_mse sums n weighted squared errors in another order than the specification.
    rows = length.repeat(batch)
    pred = tokens.reshape(-1, token_size).requires_grad_()
    target = torch.randn_like(pred)
    weight = torch.rand(rows.numel()) + 0.5
    loss = masked_mse(pred, target, rows, weight)
    loss_ref = masked_mse_ref(pred, target, rows, weight)
    torch.testing.assert_close(loss, loss_ref, rtol=0, atol=mse_tol(pred, target, rows, weight))
    (grad,), (grad_ref,) = torch.autograd.grad(loss, pred), torch.autograd.grad(loss_ref, pred)
    torch.testing.assert_close(grad, grad_ref, rtol=GRAD_RTOL, atol=0)


@pytest.mark.parametrize("token_size,order", LAYOUTS)
def test_roundtrip(token_size, order, torch_path):
    src, length, tidx, num_params, mean, std = make_layout(SIZES, token_size, order)
    flat = torch.randn(3, num_params) * 0.1 + 0.02
    tokens = pack(flat, src, length, tidx, mean, std, token_size)
    torch.testing.assert_close(unpack(tokens, src, length, tidx, mean, std, num_params), flat,
                               rtol=0, atol=roundtrip_tol(value=float(flat.abs().max()), mean=mean))
    zeros, ones = torch.zeros_like(mean), torch.ones_like(std)
    identity = pack(flat, src, length, tidx, zeros, ones, token_size)
    assert torch.equal(unpack(identity, src, length, tidx, zeros, ones, num_params), flat)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("token_size,order", [(7, "contiguous"), (16, "shuffled"), (16, "with_empty")])
def test_pack_and_unpack_gradients_match_autograd_oracle(token_size, order, batch, torch_path):
    src, length, tidx, num_params, mean, std = make_layout(SIZES, token_size, order)
    layout = (src, length, tidx)

    def grads(fn, *inputs):
        inputs = [x.clone().requires_grad_(True) for x in inputs]
        out = fn(inputs[0], *layout, inputs[1], inputs[2], size)
        out.backward(upstream)
        return [x.grad for x in inputs]

    zeros, ones, num_tensors = torch.zeros_like(mean), torch.ones_like(std), mean.numel()
    flat = torch.randn(batch, num_params)
    upstream = torch.randn(batch, src.numel(), token_size)
    size = token_size
    got, want = grads(pack, flat, mean, std), grads(naive_pack, flat, mean, std)
    # d/d flat: g * fl(1 / std) against g / std, entry by entry.
    torch.testing.assert_close(got[0], want[0], rtol=0,
                               atol=normalize_tol(value=float(upstream.abs().max()), mean=zeros, std=std))
    # d/d mean = -sum g / std over each tensor's entries: 3 roundings besides the sum's.
    sums, counts = per_tensor_sums(upstream.abs() / std[tidx][:, None], tidx, length, num_tensors)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=sum_tol(sums, reduction=counts, roundings=3))
    # d/d std = -sum g (x - mean) / std^2; pack multiplies by its own output, within
    # normalize_tol of (x - mean) / std, so the terms are bounded by |g| (|x| + |mean|) / std^2 and
    # carry 10 roundings (6 of pack's, 4 of the oracle's: the difference, two quotients, the product).
    x = naive_pack(flat, *layout, zeros, ones, token_size)  # the entries each token reads, 0 in padding
    bound = upstream.abs() * (x.abs() + mean.abs()[tidx][:, None]) / std[tidx][:, None] ** 2
    sums, counts = per_tensor_sums(bound, tidx, length, num_tensors)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=sum_tol(sums, reduction=counts, roundings=10))

    tokens = torch.randn(batch, src.numel(), token_size)
    upstream = torch.randn(batch, num_params)
    size = num_params
    got, want = grads(unpack, tokens, mean, std), grads(naive_unpack, tokens, mean, std)
    # d/d tokens = g * std: the same single product on both sides.
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert bool((got[0][:, ~valid_mask(length, token_size)] == 0).all())
    # d/d mean = sum g, d/d std = sum g * tokens over each tensor's entries.
    g_tok = naive_pack(upstream, *layout, zeros, ones, token_size)  # upstream at each token's entries
    sums, counts = per_tensor_sums(g_tok.abs(), tidx, length, num_tensors)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=sum_tol(sums, reduction=counts))
    sums, counts = per_tensor_sums((g_tok * tokens).abs(), tidx, length, num_tensors)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=sum_tol(sums, reduction=counts, roundings=2))


def test_gradcheck_float64(torch_path):
    token_size = 4
    src, length, tidx, num_params, mean, std = make_layout([1, 6], token_size, "with_empty")
    mean, std = mean.double().requires_grad_(), std.double().requires_grad_()
    flat = torch.randn(2, num_params, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(2, src.numel(), token_size, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, m, s: pack(f, src, length, tidx, m, s, token_size),
                                    (flat, mean, std))
    assert torch.autograd.gradcheck(lambda t, m, s: unpack(t, src, length, tidx, m, s, num_params),
                                    (tokens, mean, std))


def test_one_dimensional_inputs():
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    flat = torch.randn(num_params)
    tokens = pack(flat, src, length, tidx, mean, std, 16)
    assert tokens.shape == (src.numel(), 16)
    torch.testing.assert_close(tokens, pack(flat[None], src, length, tidx, mean, std, 16)[0], rtol=0, atol=0)
    assert unpack(tokens, src, length, tidx, mean, std, num_params).shape == (num_params,)


def test_float64_and_float16_inputs(torch_path):
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    flat64 = torch.randn(2, num_params, dtype=torch.float64)
    out64 = pack(flat64, src, length, tidx, mean, std, 16)
    assert out64.dtype == torch.float64
    atol = normalize_tol(value=float(flat64.abs().max()), mean=mean, std=std, dtype=torch.float64)
    torch.testing.assert_close(out64, naive_pack(flat64, src, length, tidx, mean.double(), std.double(), 16),
                               rtol=0, atol=atol)
    flat16 = flat64.half()
    out16 = pack(flat16, src, length, tidx, mean, std, 16)
    assert out16.dtype == torch.float32
    # float16 widens to float32 exactly; the rest is float32 pack.
    atol = normalize_tol(value=float(flat16.float().abs().max()), mean=mean, std=std)
    torch.testing.assert_close(out16, naive_pack(flat16.float(), src, length, tidx, mean, std, 16), rtol=0, atol=atol)


def test_out_buffer_is_filled_and_refused_with_grad():
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    flat = torch.randn(2, num_params)
    buf = torch.full((2, src.numel(), 16), 7.0)
    assert pack(flat, src, length, tidx, mean, std, 16, out=buf) is not None
    torch.testing.assert_close(buf, naive_pack(flat, src, length, tidx, mean, std, 16), rtol=0,
                               atol=normalize_tol(value=float(flat.abs().max()), mean=mean, std=std))
    flat_buf = torch.empty(2, num_params)
    unpack(buf, src, length, tidx, mean, std, num_params, out=flat_buf)
    torch.testing.assert_close(flat_buf, flat, rtol=0, atol=roundtrip_tol(value=float(flat.abs().max()), mean=mean))
    with pytest.raises(ValueError, match="out="):
        pack(flat.requires_grad_(), src, length, tidx, mean, std, 16, out=buf)
    with pytest.raises(ValueError, match="out must be"):
        pack(flat.detach(), src, length, tidx, mean, std, 16, out=torch.empty(2, 3, 16))


def test_layout_errors_name_the_argument():
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    flat = torch.randn(num_params)
    tokens = pack(flat, src, length, tidx, mean, std, 16)
    bad_src = src.clone()
    bad_src[-1] = num_params  # runs past the end
    with pytest.raises(ValueError, match=r"src_offset\[\d+\] is out of range"):
        pack(flat, bad_src, length, tidx, mean, std, 16)
    with pytest.raises(ValueError, match=r"length\[\d+\] is out of range.*token_size=8"):
        pack(flat, src, length, tidx, mean, std, 8)
    with pytest.raises(ValueError, match=r"tensor_index\[\d+\] is out of range"):
        pack(flat, src, length, tidx, mean[:2], std[:2], 16)
    overlapping = src.clone()
    overlapping[2] -= 1  # token 2 now also reads the last entry of token 1
    with pytest.raises(ValueError, match="overlap"):
        pack(flat, overlapping, length, tidx, mean, std, 16)
    with pytest.raises(ValueError, match="exactly once"):
        unpack(tokens[1:], src[1:], length[1:], tidx[1:], mean, std, num_params)
    with pytest.raises(ValueError, match="std has shape"):
        pack(flat, src, length, tidx, mean, std[:2], 16)
    with pytest.raises(ValueError, match="tensor_index has shape"):
        pack(flat, src, length, tidx[1:], mean, std, 16)
    with pytest.raises(ValueError, match="tokens has"):
        unpack(tokens[1:], src, length, tidx, mean, std, num_params)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("token_size", [7, 16, 64])
def test_masked_mse_matches_reference_and_ignores_padding(token_size, weighted):
    g = torch.Generator().manual_seed(token_size)
    rows = 37
    length = torch.randint(0, token_size + 1, (rows,), generator=g)
    length[:3] = torch.tensor([0, token_size, 1])
    pred = torch.randn(rows, token_size, generator=g)
    target = torch.randn(rows, token_size, generator=g)
    weight = torch.rand(rows, generator=g) + 0.5 if weighted else None
    pad = ~valid_mask(length, token_size)

    def loss_and_grads(fn, p, t):
        p, t = p.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(p, t, length, weight)
        loss.backward()
        return loss, p.grad, t.grad

    loss, gp, gt = loss_and_grads(masked_mse, pred, target)
    ref_loss, ref_gp, ref_gt = loss_and_grads(masked_mse_ref, pred, target)
    atol = mse_tol(pred, target, length, weight)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=atol)
    torch.testing.assert_close(gp, ref_gp, rtol=GRAD_RTOL, atol=0)
    torch.testing.assert_close(gt, ref_gt, rtol=GRAD_RTOL, atol=0)
    w = weight if weighted else torch.ones(rows)
    explicit = (((pred - target) ** 2) * ~pad * w[:, None]).sum() / length.sum()
    torch.testing.assert_close(loss, explicit, rtol=0, atol=atol)
    assert bool((gp[pad] == 0).all()) and bool((gt[pad] == 0).all())
    # Anything in the padding, even NaN, changes neither the loss nor the gradients: padding is
    # never read, so the computation is the same one, bit for bit.
    noisy_pred, noisy_target = pred.clone(), target.clone()
    noisy_pred[pad], noisy_target[pad] = float("nan"), 1e6
    noisy = loss_and_grads(masked_mse, noisy_pred, noisy_target)
    for got, want in zip(noisy, (loss, gp, gt)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_masked_mse_tolerance_catches_one_dropped_entry():
    """The bound on the loss is far below what losing a single median squared error costs."""
    _, length, _, _, _, _ = make_layout(BOUNDARY_SIZES, 16)
    rows = length.repeat(3)
    pred = torch.randn(rows.numel(), 16) * 3
    target = torch.randn_like(pred)
    loss = masked_mse(pred, target, rows)
    atol = mse_tol(pred, target, rows)
    torch.testing.assert_close(loss, masked_mse_ref(pred, target, rows), rtol=0, atol=atol)
    real = valid_mask(rows, 16)
    squared = ((pred - target) ** 2)[real]
    row, col = real.nonzero()[squared.argsort()[squared.numel() // 2]].tolist()
    dropped = pred.clone()
    dropped[row, col] = target[row, col]  # as if a kernel skipped that entry
    assert abs(float(masked_mse(dropped, target, rows) - loss)) > 10 * atol


def test_masked_mse_row_weight_gradient_and_edge_cases():
    pred, target = torch.randn(5, 8), torch.randn(5, 8)
    length = torch.tensor([8, 3, 0, 5, 1])
    weight = torch.rand(5, requires_grad=True)
    masked_mse(pred, target, length, weight).backward()
    weight_ref = weight.detach().clone().requires_grad_()
    masked_mse_ref(pred, target, length, weight_ref).backward()
    # d loss / d w[n] = sum_j (pred - target)^2 / count over row n's entries, 8 roundings besides the sum's.
    real = valid_mask(length, 8)
    row_sums = ((pred - target) ** 2 * real).sum(1) / length.sum()
    torch.testing.assert_close(weight.grad, weight_ref.grad, rtol=0,
                               atol=sum_tol(row_sums, reduction=length, roundings=8))
    assert weight.grad[2] == 0  # a padding row
    # All-padding batch: 0, not 0 / 0.
    assert masked_mse(pred, target, torch.zeros(5, dtype=torch.long)).item() == 0.0
    # The weight scales the numerator only: weight 2 on every row doubles the loss, exactly (a
    # factor of 2 only moves the exponent, through every product, sum and the division).
    torch.testing.assert_close(masked_mse(pred, target, length, torch.full((5,), 2.0)),
                               2 * masked_mse(pred, target, length), rtol=0, atol=0)


def test_masked_mse_errors_name_the_argument():
    pred = torch.randn(4, 8)
    length = torch.full((4,), 8)
    with pytest.raises(ValueError, match="target"):
        masked_mse(pred, torch.randn(4, 7), length)
    with pytest.raises(ValueError, match="length"):
        masked_mse(pred, pred, length[:3])
    with pytest.raises(ValueError, match="length"):
        masked_mse(pred, pred, length.float())
    with pytest.raises(ValueError, match="row_weight"):
        masked_mse(pred, pred, length, torch.ones(5))
    with pytest.raises(ValueError, match=r"pred.*\(B \* L, D\)"):
        masked_mse(pred[None], pred[None], length)


@torch_path_only
@pytest.mark.parametrize("op", ["pack", "unpack"])
def test_run_loop_and_gather_paths_agree(op, monkeypatch):
    """The per-run loop (contiguous layouts) and the general gather agree to float32 rounding."""
    threshold = f"_{op.upper()}_MIN_ELEMENTS_PER_RUN"
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    if op == "pack":
        x = torch.randn(3, num_params)
        args = (x, src, length, tidx, mean, std, 16)
    else:
        x = torch.randn(3, src.numel(), 16)
        args = (x, src, length, tidx, mean, std, num_params)
    fn = pack if op == "pack" else unpack
    monkeypatch.setattr(_ragged, threshold, 0)  # always the loop
    loop = fn(*args)
    monkeypatch.setattr(_ragged, threshold, 1 << 62)  # always the gather
    # Both compute x * scale + shift, the loop by add(alpha=), the gather by addcmul: fused or not.
    scale, shift = (1 / std, -mean / std) if op == "pack" else (std, mean)
    torch.testing.assert_close(fn(*args), loop, rtol=0,
                               atol=affine_tol(value=float(x.abs().max()), scale=scale, shift=shift))


@torch_path_only
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_match_reference():
    src, length, tidx, num_params, mean, std = make_layout(SIZES * 3, 64, "with_empty")
    flat = torch.randn(5, num_params)
    cuda = [t.cuda() for t in (src, length, tidx, mean, std)]
    tokens = pack(flat.cuda(), *cuda, 64)
    value = float(flat.abs().max())
    torch.testing.assert_close(tokens.cpu(), pack_ref(flat, src, length, tidx, mean, std, 64), rtol=0,
                               atol=normalize_tol(value=value, mean=mean, std=std))
    torch.testing.assert_close(unpack(tokens, *cuda, num_params).cpu(), flat, rtol=0,
                               atol=roundtrip_tol(value=value, mean=mean))
    n = tokens.shape[0] * tokens.shape[1]
    rows = length.repeat(tokens.shape[0])
    pred, zeros = tokens.cpu().reshape(n, 64), torch.zeros(n, 64)
    loss = masked_mse(tokens.reshape(n, 64), zeros.cuda(), rows.cuda())
    torch.testing.assert_close(loss.cpu(), masked_mse_ref(pred, zeros, rows), rtol=0, atol=mse_tol(pred, zeros, rows))


@torch_path_only
def test_triton_kernels_under_interpreter():
    """Run this file again with the ops dispatched to the Triton kernels (on CPU, interpreted)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "WEIGHTDIFF_FORCE_TRITON": "1", CHILD_ENV: "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-o", "addopts=", "-q", "-x", "-p", "no:cacheprovider"],
        env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, \
        f"interpreted Triton tests failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert " passed" in proc.stdout and "failed" not in proc.stdout, proc.stdout[-2000:]


@pytest.mark.skipif(not IN_CHILD, reason="Triton launch detail")
def test_batch_axis_is_launched_in_chunks(monkeypatch):
    # CUDA caps grid axis 1 at 65535 programs; a tiny cap exercises the chunked launch.
    monkeypatch.setattr(_ragged, "MAX_GRID_Y", 2)
    src, length, tidx, num_params, mean, std = make_layout(SIZES, 16)
    flat = torch.randn(5, num_params)
    tokens = pack(flat, src, length, tidx, mean, std, 16)
    torch.testing.assert_close(tokens, pack_ref(flat, src, length, tidx, mean, std, 16), rtol=0,
                               atol=normalize_tol(value=float(flat.abs().max()), mean=mean, std=std))
    torch.testing.assert_close(unpack(tokens, src, length, tidx, mean, std, num_params),
                               unpack_ref(tokens, src, length, tidx, mean, std, num_params), rtol=0,
                               atol=affine_tol(value=float(tokens.abs().max()), scale=std, shift=mean))


@pytest.mark.skipif(not IN_CHILD, reason="checks the interpreter subprocess itself")
def test_child_dispatches_to_interpreted_triton():
    from triton.runtime.interpreter import InterpretedFunction

    from weightdiff.kernels._dispatch import use_triton

    kernels = [_ragged._pack_kernel, _ragged._unpack_kernel,
               sys.modules["weightdiff.kernels.masked_mse"]._masked_mse_kernel]
    assert all(isinstance(k, InterpretedFunction) for k in kernels)
    assert use_triton(torch.zeros(1))
