"""Ops on the ragged token layout of flattened weights: pack, unpack and a masked loss.

A network's tensors are concatenated in layout order into one flat vector (P,), and each tensor
is cut into tokens of ``D = token_size`` entries; the last token of a tensor is zero-padded. A
layout is three per-token (L,) integer tensors: ``src_offset`` (flat position of the token's
first entry), ``length`` (real entries, the rest is padding) and ``tensor_index``; plus per-tensor
(T,) ``mean`` and ``std`` for normalisation.

Worked example, tensors of 6, 2 and 9 entries (``w`` (2, 3), ``b`` (2,), ``v`` (3, 3)), D = 4::

    flat (P = 17):  w0 w1 w2 w3 w4 w5 | b0 b1 | v0 v1 v2 v3 v4 v5 v6 v7 v8

    token l   src_offset  length  tensor_index   tokens[l] (before normalisation)
       0          0          4          0          w0 w1 w2 w3
       1          4          2          0          w4 w5  0  0
       2          6          2          1          b0 b1  0  0
       3          8          4          2          v0 v1 v2 v3
       4         12          4          2          v4 v5 v6 v7
       5         16          1          2          v8  0  0  0

    pack:   tokens[b, l, j] = (flat[b, src_offset[l] + j] - mean[t]) / std[t],  t = tensor_index[l]
    unpack: flat[b, src_offset[l] + j] = tokens[b, l, j] * std[t] + mean[t]    (padding dropped)
    masked_mse(pred.reshape(B * L, D), target.reshape(B * L, D), length.repeat(B))

Each op lives in its own module with a short torch specification (``name_ref``: the formula
above, written so it can be checked by eye against this example) and a differentiable dispatcher
(``name``) that runs a Triton kernel on CUDA tensors, or anywhere with ``WEIGHTDIFF_FORCE_TRITON=1``
(tests add ``TRITON_INTERPRET=1`` to run it on CPU), and an optimised torch path otherwise; tests
compare both with the specification. Pack and unpack are each other's gradient, so their kernels
and torch paths (an affine gather into tokens and an affine scatter back) live together in the
private ``_ragged`` module; masked_mse keeps its kernels beside it.
"""

from weightdiff.kernels.masked_mse import masked_mse, masked_mse_ref
from weightdiff.kernels.pack import pack, pack_ref
from weightdiff.kernels.unpack import unpack, unpack_ref

__all__ = ["masked_mse", "masked_mse_ref", "pack", "pack_ref", "unpack", "unpack_ref"]
