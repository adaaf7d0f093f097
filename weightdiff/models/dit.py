"""A diffusion transformer (DiT) over weight tokens.

The network follows DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") with
image patches replaced by weight tokens: a flattened checkpoint is cut into tokens of ``D``
entries (see :mod:`weightdiff.weights.tokenizer`), each token is projected to the model width and tagged
with learned embeddings of where it comes from (tensor index, chunk index inside the tensor,
layer depth, tensor kind), and every block is modulated by adaLN-Zero from the sum of the
timestep embedding and the task condition (already embedded to the model width by a provider in
:mod:`weightdiff.models.conditioning`). Blocks may also cross-attend to a sequence of condition vectors.

Ragged batches (checkpoints with different numbers of tokens) are padded and carry a key mask:
padded keys are never attended, padded inputs are zeroed before use, and padded outputs are
zero, so a sequence's output does not depend on what it is batched with.

Example::

    >>> model = WeightDiT(token_size=64, num_tensors=6, max_chunks=40, max_depth=3, num_kinds=4)
    >>> x = torch.randn(2, 50, 64); t = torch.tensor([10, 900]); c = torch.randn(2, 256)
    >>> ids = torch.zeros(50, dtype=torch.long)
    >>> model(x, t, c, tensor_index=ids, chunk_index=ids, depth=ids, kind=ids).shape
    torch.Size([2, 50, 64])
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.errors import LayoutMismatchError

#: Per-token id fields, in the order of the embedding tables.
ID_FIELDS = ("tensor_index", "chunk_index", "depth", "kind")


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: x (B, L, H) * (1 + scale (B, H)) + shift (B, H)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------ embedders
class TimestepEmbedder(nn.Module):
    """Embeds scalar diffusion timesteps (int or float) into vectors (B,) -> (B, H)."""

    def __init__(self, hidden: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden, bias=True),
            nn.SiLU(),
            nn.Linear(hidden, hidden, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding (Vaswani et al. 2017, as in GLIDE/DiT): t (B,) -> (B, dim) float32."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))  # (B, H)


class TokenEmbedder(nn.Module):
    """Projects weight tokens to the model width: (B, L, D) -> (B, L, H)."""

    def __init__(self, token_size: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(token_size, hidden, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PositionTypeEmbedder(nn.Module):
    """Learned embeddings of where a token comes from, summed: ids (B, L) each -> (B, L, H).

    Weight tokens have no grid to put a sinusoidal code on; what identifies a token is the tensor
    it belongs to, its chunk inside that tensor, the layer depth and the tensor kind (weight,
    bias, LoRA A/B, ...). Depth and kind are shared across tensors, so layers of the same role
    can share what they learn.
    """

    def __init__(self, hidden: int, num_tensors: int, max_chunks: int, max_depth: int, num_kinds: int):
        super().__init__()
        self.sizes = {"tensor_index": num_tensors, "chunk_index": max_chunks, "depth": max_depth, "kind": num_kinds}
        self.tables = nn.ModuleDict({name: nn.Embedding(size, hidden) for name, size in self.sizes.items()})

    def check_ids(self, ids: dict[str, torch.Tensor]) -> None:
        """Raise :class:`LayoutMismatchError` naming the field whose ids fall outside its table.

        One host sync for all four fields (an out-of-range id would otherwise be an opaque
        device-side assert on GPU).
        """
        bounds = torch.stack([torch.stack([v.min(), v.max()]) if v.numel() else v.new_zeros(2)
                              for v in ids.values()]).tolist()
        for (name, size), (lo, hi) in zip(self.sizes.items(), bounds):
            if lo < 0 or hi >= size:
                raise LayoutMismatchError(f"token id field '{name}' has values in [{lo}, {hi}], but the model's "
                                          f"embedding table has {size} rows (expected 0 <= id < {size}); "
                                          "the token layout does not match this model")

    def forward(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.tables[name](ids[name]) for name in self.sizes)


# ---------------------------------------------------------------------------------------- blocks
class Attention(nn.Module):
    """Multi-head attention through ``F.scaled_dot_product_attention``.

    Self-attention when ``context`` is None, otherwise cross-attention from x to context.
    ``mask (B, S)``: True at keys that may be attended.
    """

    def __init__(self, hidden: int, heads: int, attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(hidden, hidden, bias=True)
        self.kv = nn.Linear(hidden, 2 * hidden, bias=True)
        self.proj = nn.Linear(hidden, hidden, bias=True)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(proj_dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, length, h = x.shape
        context = x if context is None else context
        q = self.q(x).view(b, length, self.heads, -1).transpose(1, 2)  # (B, nh, L, hd)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # (B, nh, S, hd)
        # A row with no valid key would softmax over nothing (NaN); let it attend everywhere
        # instead: such rows belong to empty sequences whose outputs are masked anyway.
        mask = mask | ~mask.any(dim=1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :],
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, length, h)))  # (B, L, H)


class Mlp(nn.Module):
    """Token-wise feed-forward network: (B, L, H) -> (B, L, H)."""

    def __init__(self, hidden: int, mlp_hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(hidden, mlp_hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(mlp_hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning and optional cross-attention.

    x = x + gate_msa · SelfAttn(modulate(LN(x), shift_msa, scale_msa))
    x = x + CrossAttn(LN'(x), cond_seq)                     (when ``cross_attention``)
    x = x + gate_mlp · MLP(modulate(LN(x), shift_mlp, scale_mlp))
    with (shift, scale, gate) × 2 = Linear(SiLU(c)), DiT §3.2.
    """

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, cross_attention: bool = False,
                 dropout: float = 0.0, attn_dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, attn_dropout, dropout)
        if cross_attention:
            # Not modulated (as in PixArt-α): the condition sequence itself carries the signal.
            self.norm_cross = nn.LayerNorm(hidden, eps=1e-6)
            self.cross_attn = Attention(hidden, heads, attn_dropout, dropout)
        else:
            self.norm_cross = self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, key_mask: torch.Tensor,
                cond_seq: torch.Tensor | None = None, cond_seq_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, H), c: (B, H), key_mask: (B, L), cond_seq: (B, S, H), cond_seq_mask: (B, S)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), key_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), cond_seq_mask, context=cond_seq)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, L, H)


class FinalLayer(nn.Module):
    """adaLN + linear read-out to token space: (B, L, H) -> (B, L, D)."""

    def __init__(self, hidden: int, token_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, token_size, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------- model
class WeightDiT(nn.Module):
    """DiT denoiser over weight tokens.

    Args:
        token_size: entries per token (D).
        num_tensors, max_chunks, max_depth, num_kinds: sizes of the tensor-index, chunk-index,
            depth and kind embedding tables (ids must be smaller; see
            :class:`weightdiff.weights.layout.TokenLayout`).
        hidden: model width (H); condition vectors must have this width.
        depth: number of DiT blocks.
        heads: attention heads (must divide ``hidden``).
        mlp_ratio: MLP width as a multiple of ``hidden``.
        cross_attention: add a cross-attention sub-layer to every block.
        dropout: dropout on attention/MLP outputs.
        attn_dropout: dropout on attention probabilities.
        window: attend only within consecutive windows of this many tokens (None: the whole
            sequence). Every other sub-layer is token-wise, so a window's output depends on its
            own tokens, ids, timestep and condition alone: a long sequence can be denoised one
            window at a time (:mod:`weightdiff.models.windows`) with memory bounded by the window.
            Windows are counted from the first token of the input, which must therefore start at
            a window boundary of the full sequence.
    """

    def __init__(self, token_size: int, num_tensors: int, max_chunks: int, max_depth: int, num_kinds: int,
                 hidden: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 cross_attention: bool = False, dropout: float = 0.0, attn_dropout: float = 0.0,
                 window: int | None = None):
        super().__init__()
        if window is not None and int(window) < 1:
            raise ValueError(f"WeightDiT: 'window' must be a positive integer or None, got {window}")
        sizes = dict(token_size=token_size, num_tensors=num_tensors, max_chunks=max_chunks, max_depth=max_depth,
                     num_kinds=num_kinds, hidden=hidden, depth=depth, heads=heads)
        for name, value in sizes.items():
            if int(value) < 1:
                raise ValueError(f"WeightDiT: '{name}' must be a positive integer, got {value}")
        if hidden % heads:
            raise ValueError(f"WeightDiT: hidden={hidden} is not divisible by heads={heads}")
        self._config = dict(sizes, mlp_ratio=float(mlp_ratio), cross_attention=bool(cross_attention),
                            dropout=float(dropout), attn_dropout=float(attn_dropout),
                            window=None if window is None else int(window))
        self.hidden = hidden
        self.cross_attention = cross_attention

        self.token_embedder = TokenEmbedder(token_size, hidden)
        self.pos_embedder = PositionTypeEmbedder(hidden, num_tensors, max_chunks, max_depth, num_kinds)
        self.t_embedder = TimestepEmbedder(hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, heads, mlp_ratio, cross_attention, dropout, attn_dropout)
                                     for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, token_size)
        self.initialize_weights()

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (JSON-serialisable): ``WeightDiT(**model.config)`` rebuilds it."""
        return dict(self._config)

    def initialize_weights(self) -> None:
        # Linear layers: Xavier-uniform, zero bias (as DiT / ViT).
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        # Position/type tables: small, so token content dominates at first (ViT's 0.02).
        for table in self.pos_embedder.tables.values():
            nn.init.normal_(table.weight, std=0.02)
        # Timestep MLP: normal(0.02), as DiT.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: zero the modulation so every gate is 0 and every block starts as the identity
        # (DiT §3.2); cross-attention is not gated, so its output projection is zeroed for the
        # same reason.
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
            if block.cross_attn is not None:
                nn.init.constant_(block.cross_attn.proj.weight, 0)
                nn.init.constant_(block.cross_attn.proj.bias, 0)
        # Zero the read-out: the untrained model predicts exactly 0 (the mean of a normalised
        # target) instead of noise.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, *, tensor_index: torch.Tensor,
                chunk_index: torch.Tensor, depth: torch.Tensor, kind: torch.Tensor,
                key_mask: torch.Tensor | None = None, cond_seq: torch.Tensor | None = None,
                cond_seq_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Predict the denoising target for noisy tokens.

        Args:
            x: noisy tokens (B, L, D).
            t: timesteps (B,) int or float (a scalar is broadcast).
            c: condition (B, H), embedded by a provider from :mod:`weightdiff.models.conditioning`.
            tensor_index, chunk_index, depth, kind: per-token ids, (L,) or (B, L) integer tensors.
            key_mask: (B, L) bool, True at real tokens; None means every token is real.
            cond_seq: (B, S, H) condition sequence for cross-attention; defaults to ``c`` as a
                one-element sequence.
            cond_seq_mask: (B, S) bool, True at real condition vectors; None means all real.
        Returns:
            (B, L, D); zero at padded positions.
        """
        b, length, d = x.shape
        if d != self._config["token_size"]:
            raise ValueError(f"WeightDiT: tokens have size {d}, the model was built for token_size="
                             f"{self._config['token_size']}")
        if tuple(c.shape) != (b, self.hidden):
            raise ValueError(f"WeightDiT: condition has shape {tuple(c.shape)}, expected ({b}, {self.hidden})")
        if key_mask is None:
            key_mask = torch.ones(b, length, dtype=torch.bool, device=x.device)
        elif tuple(key_mask.shape) != (b, length):
            raise ValueError(f"WeightDiT: key_mask has shape {tuple(key_mask.shape)}, expected ({b}, {length})")
        key_mask = key_mask.to(device=x.device, dtype=torch.bool)

        ids = {}
        for name, v in zip(ID_FIELDS, (tensor_index, chunk_index, depth, kind)):
            v = torch.as_tensor(v, device=x.device)
            if v.dim() == 1:
                v = v.unsqueeze(0).expand(b, -1)
            if tuple(v.shape) != (b, length):
                raise ValueError(f"WeightDiT: '{name}' has shape {tuple(v.shape)}, "
                                 f"expected ({length},) or ({b}, {length})")
            ids[name] = v.long().masked_fill(~key_mask, 0)  # padding may carry any id
        if not torch.compiler.is_compiling():
            self.pos_embedder.check_ids(ids)

        if cond_seq is not None and not self.cross_attention:
            raise ValueError("WeightDiT: cond_seq given but the model was built with cross_attention=False")
        if self.cross_attention:
            if cond_seq is None:
                cond_seq, cond_seq_mask = c.unsqueeze(1), None
            if cond_seq.dim() != 3 or cond_seq.shape[0] != b or cond_seq.shape[2] != self.hidden:
                raise ValueError(f"WeightDiT: cond_seq has shape {tuple(cond_seq.shape)}, "
                                 f"expected ({b}, S, {self.hidden})")
            if cond_seq_mask is None:
                cond_seq_mask = torch.ones(cond_seq.shape[:2], dtype=torch.bool, device=x.device)
            cond_seq_mask = cond_seq_mask.to(device=x.device, dtype=torch.bool)

        t = torch.as_tensor(t, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        valid = key_mask.unsqueeze(-1)
        # Zero padded inputs so that whatever they hold (even NaN) cannot reach valid tokens.
        x = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))
        h = self.token_embedder(x) + self.pos_embedder(ids)  # (B, L, H)
        cond = self.t_embedder(t).to(h.dtype) + c.to(h.dtype)  # (B, H)
        window = self._config["window"]
        if window is not None and length > window:
            h, cond, key_mask, cond_seq, cond_seq_mask = _split_windows(window, h, cond, key_mask, cond_seq,
                                                                         cond_seq_mask)
        for block in self.blocks:
            h = block(h, cond, key_mask, cond_seq, cond_seq_mask)  # (B, L, H) or (B · n, W, H)
        out = self.final_layer(h, cond)  # (B, L, D) or (B · n, W, D)
        out = out.reshape(b, -1, d)[:, :length]  # windows back in sequence order: (B, L, D)
        return out.masked_fill(~valid, 0.0)


def _split_windows(window: int, h: torch.Tensor, cond: torch.Tensor, key_mask: torch.Tensor,
                   cond_seq: torch.Tensor | None, cond_seq_mask: torch.Tensor | None) -> tuple:
    """Fold ``n = ceil(L / W)`` windows into the batch: ``h (B, L, H) -> (B · n, W, H)``.

    The last window is padded with masked tokens; each window row carries its sequence's
    condition (and condition sequence), so attention never crosses a window boundary.
    """
    b, length, hidden = h.shape
    n = -(-length // window)
    pad = n * window - length
    h = F.pad(h, (0, 0, 0, pad)).reshape(b * n, window, hidden)
    key_mask = F.pad(key_mask, (0, pad), value=False).reshape(b * n, window)
    cond = cond.repeat_interleave(n, 0)
    if cond_seq is not None:
        cond_seq = cond_seq.repeat_interleave(n, 0)
        cond_seq_mask = cond_seq_mask.repeat_interleave(n, 0)
    return h, cond, key_mask, cond_seq, cond_seq_mask
