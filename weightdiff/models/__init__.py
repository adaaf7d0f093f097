"""Denoisers over weight tokens."""

from weightdiff.models.dit import WeightDiT

__all__ = ["WeightDiT"]
