"""Canonicalise a zoo checkpoint before tokenising it (function-preserving).

LoRA adapters: each (A, B) pair is replaced by the SVD form of B·A, which removes the A→RA,
B→BR⁻¹ gauge freedom. Whole networks: hidden units are permuted to match a reference
checkpoint (weight matching). Both leave the network's outputs unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from weightdiff.canonical import align_to_reference, canonicalize_lora, sequential_permutation_spec


def prepare_state(sd: Mapping[str, torch.Tensor], kind: str, reference: Mapping[str, torch.Tensor] | None,
                  *, canonicalize: bool = True) -> dict[str, torch.Tensor]:
    """Canonical form of a checkpoint from a zoo of ``kind`` ("full" | "lora")."""
    if not canonicalize:
        return dict(sd)
    if kind == "lora":
        return canonicalize_lora(sd)
    if reference is None:
        return dict(sd)
    return align_to_reference(sd, reference, sequential_permutation_spec(reference))
