"""Denoisers over weight tokens."""

from weightdiff.models.dit import (
    WeightDiT,
    WeightDiT_B,
    WeightDiT_models,
    WeightDiT_S,
    WeightDiT_XS,
    cu_seqlens_to_lengths,
    lengths_to_cu_seqlens,
    pad_packed,
    pad_ragged,
    unpad,
)

__all__ = [
    "WeightDiT",
    "WeightDiT_B",
    "WeightDiT_S",
    "WeightDiT_XS",
    "WeightDiT_models",
    "cu_seqlens_to_lengths",
    "lengths_to_cu_seqlens",
    "pad_packed",
    "pad_ragged",
    "unpad",
]
