"""The target networks of the built-in task families.

Small plain stacks (conv → ReLU → ... → flatten → linear) and a small vision transformer
(:class:`DigitsViT`, the ``cordigits`` base), all with named modules, so state-dict keys are
stable (``conv1.weight``, ``blocks.0.attn.q.weight``) and there is no BatchNorm (no running
statistics; hidden-unit permutations act on weights alone).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

IMAGE_SIDE = 8  # the digits images are IMAGE_SIDE × IMAGE_SIDE


class DigitsCNN(nn.Sequential):
    """CNN for 8×8 digit images: two 3×3 convs (the second strided) and a linear head.

    Input ``(N, 1, 8, 8)`` → logits ``(N, num_classes)``. The default widths keep a full training
    run at ~1 s on one CPU core.
    """

    def __init__(self, channels: tuple[int, int] = (8, 16), num_classes: int = 10) -> None:
        c1, c2 = channels
        super().__init__(OrderedDict(
            conv1=nn.Conv2d(1, c1, 3, padding=1),              # (N, c1, 8, 8)
            act1=nn.ReLU(),
            conv2=nn.Conv2d(c1, c2, 3, stride=2, padding=1),   # (N, c2, 4, 4)
            act2=nn.ReLU(),
            flatten=nn.Flatten(),                              # (N, 16 c2)
            fc=nn.Linear(16 * c2, num_classes),                # (N, C)
        ))


class DigitsMLP(nn.Sequential):
    """MLP for 8×8 digit images: the frozen base of the ``rotdigits`` LoRA family.

    Input ``(N, 1, 8, 8)`` → flatten ``(N, 64)`` → ``fc1`` → ReLU → ``fc2`` → logits ``(N, C)``.
    Chosen over :class:`DigitsCNN` as the adapter base because a LoRA adapter on it trains in
    ~0.17 s of CPU (100 full-batch Adam steps) against ~6 s on the CNN, at the same ~95 %
    accuracy on rotated digits (measurements in :mod:`weightdiff.tasks.rotdigits`).
    """

    def __init__(self, hidden: int = 64, num_classes: int = 10) -> None:
        super().__init__(OrderedDict(
            flatten=nn.Flatten(),                  # (N, 64)
            fc1=nn.Linear(64, hidden),             # (N, hidden)
            act1=nn.ReLU(),
            fc2=nn.Linear(hidden, num_classes),    # (N, C)
        ))


class MNIST1DCNN(nn.Sequential):
    """1-D CNN for MNIST-1D: a stride-1 conv, three strided convs and a linear head.

    Input ``(N, 1, 40)`` → logits ``(N, num_classes)``; the sequence length halves at each
    strided conv (40 → 20 → 10 → 5). With 32 channels it reaches 94.6 % test accuracy (3 seeds,
    40 epochs, ~5 s on one core), matching the dataset paper's CNN baseline (94 %, Greydanus 2020).
    """

    def __init__(self, channels: int = 32, num_classes: int = 10) -> None:
        c = channels
        super().__init__(OrderedDict(
            conv1=nn.Conv1d(1, c, 5, padding=2),               # (N, c, 40)
            act1=nn.ReLU(),
            conv2=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 20)
            act2=nn.ReLU(),
            conv3=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 10)
            act3=nn.ReLU(),
            conv4=nn.Conv1d(c, c, 3, stride=2, padding=1),     # (N, c, 5)
            act4=nn.ReLU(),
            flatten=nn.Flatten(),                              # (N, 5 c)
            fc=nn.Linear(5 * c, num_classes),                  # (N, C)
        ))


class ViTAttention(nn.Module):
    """Multi-head self-attention with separate ``q``, ``k``, ``v`` and ``proj`` projections.

    Separate modules (not one fused ``qkv``) so that LoRA can adapt the query and value maps
    alone (PEFT ``target_modules=["q", "v"]``, as LoRA adapts ``W_q`` and ``W_v`` in Hu et al.
    2021, §4.2). ``(N, L, D)`` → ``(N, L, D)``.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"ViT width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, width // self.heads).transpose(1, 2)  # (N, h, L, D/h)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # softmax(q kᵀ / √d) v (Vaswani et al. 2017, eq. 1), written out rather than through
        # F.scaled_dot_product_attention: under torch.func.vmap (Target.forward_batched) that op's
        # CPU kernel has no batching rule and runs once per weight set, ~3× slower with gradients.
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (N, h, L, L)
        out = weights @ v                                                              # (N, h, L, D/h)
        return self.proj(out.transpose(1, 2).reshape(n, length, width))                # (N, L, D)


class ViTBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + fc2(GELU(fc1(LN(x))))``."""

    def __init__(self, width: int, heads: int, mlp_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))                      # (N, L, D)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))  # (N, L, D)


class DigitsViT(nn.Module):
    """Vision transformer for 8×8 digit images: the frozen base of the ``cordigits`` LoRA family.

    Input ``(N, 1, 8, 8)`` → non-overlapping ``patch × patch`` patches, flattened and embedded by
    the linear ``patch_embed`` ``(N, L, width)`` with ``L = (8 / patch)²`` → plus learned positions
    ``pos`` → ``depth`` pre-LN :class:`ViTBlock` s → final LayerNorm → mean over tokens → ``head``
    → logits ``(N, C)``. LayerNorm only (no BatchNorm: no running statistics, and a batch of
    corrupted images cannot shift what the frozen base computes). Module names are fixed so that
    PEFT ``target_modules`` such as ``["q", "v"]`` or ``["q", "v", "fc1", "fc2"]`` match every block.

    The defaults were measured on one CPU core with the ``digits`` training of a base
    (``FULL_DEFAULTS``, 30 epochs): 4×4 patches (4 tokens) reach 97.6 % / 97.0 % clean test
    accuracy (seeds 0 / 1) in ~2 s, and their LoRA adapters 92 % on digits turned 90°; 2×2 patches
    (16 tokens) 94.8 % / 87.4 % in ~5 s, adapters 81 %; three blocks of 2×2 patches 90 %.
    """

    def __init__(self, patch: int = 4, width: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: float = 2.0,
                 num_classes: int = 10) -> None:
        super().__init__()
        if IMAGE_SIDE % patch:
            raise ValueError(f"ViT patch size {patch} does not divide the image side {IMAGE_SIDE}")
        self.patch = patch
        tokens = (IMAGE_SIDE // patch) ** 2
        self.patch_embed = nn.Linear(patch * patch, width)
        self.pos = nn.Parameter(torch.zeros(1, tokens, width))
        self.blocks = nn.ModuleList(ViTBlock(width, heads, int(width * mlp_ratio)) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        nn.init.trunc_normal_(self.pos, std=0.02)  # ViT's position init (Dosovitskiy et al. 2021)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, p = x.shape[0], self.patch
        g = IMAGE_SIDE // p
        patches = x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p)  # (N, L, p²) row-major
        h = self.patch_embed(patches) + self.pos                                            # (N, L, D)
        for block in self.blocks:
            h = block(h)                                                                    # (N, L, D)
        return self.head(self.norm(h).mean(dim=1))                                          # (N, C)


class WideMLP(nn.Sequential):
    """Two-hidden-layer MLP of width ``width``: the target network of the ``digits-mlp`` family.

    Input ``(N, *input_shape)`` → flatten ``(N, in_features)`` → ``fc1`` → ReLU → ``fc2`` → ReLU →
    ``fc3`` → logits ``(N, C)``. It has ``in·w + w + w² + w + w·C + C`` parameters: with the 8×8
    digits (``in_features = 64``), ``width = 1024`` and ten classes that is
    ``66,560 + 1,049,600 + 10,250 = 1,126,410``, a whole network of over a million weights that
    still trains in seconds on one CPU core (the ``fc2`` square matrix holds 93 % of them).
    """

    def __init__(self, in_features: int = IMAGE_SIDE * IMAGE_SIDE, width: int = 1024, num_classes: int = 10) -> None:
        super().__init__(OrderedDict(
            flatten=nn.Flatten(),                      # (N, in)
            fc1=nn.Linear(in_features, width),         # (N, w)
            act1=nn.ReLU(),
            fc2=nn.Linear(width, width),               # (N, w)
            act2=nn.ReLU(),
            fc3=nn.Linear(width, num_classes),         # (N, C)
        ))
