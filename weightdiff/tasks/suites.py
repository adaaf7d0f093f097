"""Benchmark suites: which zoo kind and task family each ``weightdiff benchmark --suite`` runs on."""

from __future__ import annotations

SUITES: dict[str, tuple[str, str]] = {  # suite → (zoo kind, task family)
    "digits-cnn": ("full", "digits"),
    "mnist1d-cnn": ("full", "mnist1d"),
    "adapt-lora": ("lora", "rotdigits"),
}
