"""Evaluation of weights inside their target networks, baselines, novelty and the benchmark.

* :mod:`~weightdiff.evaluate.weights` — load weight sets, batched evaluation, ``weightdiff evaluate``;
* :mod:`~weightdiff.evaluate.baselines` — zoo / average / gaussian / noise-added / retrieval /
  zero-adapter / floor baselines;
* :mod:`~weightdiff.evaluate.hypernet` — ridge and MLP hypernetworks;
* :mod:`~weightdiff.evaluate.fewshot` — few-shot SGD;
* :mod:`~weightdiff.evaluate.novelty` — wrong-set IoU and nearest-zoo distance;
* :mod:`~weightdiff.evaluate.report` — JSON / Markdown / plots;
* :mod:`~weightdiff.evaluate.benchmark` — :func:`run_benchmark`, the whole protocol in one run.

Submodules are imported on first use, so ``import weightdiff.evaluate`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["WeightSet", "evaluate_params", "heldout_description", "load_weight_sets", "run_benchmark"]

_EXPORTS = {
    "WeightSet": "weightdiff.evaluate.weights",
    "evaluate_params": "weightdiff.evaluate.weights",
    "load_weight_sets": "weightdiff.evaluate.weights",
    "run_benchmark": "weightdiff.evaluate.benchmark",
    "heldout_description": "weightdiff.evaluate.benchmark",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'weightdiff.evaluate' has no attribute {name!r}")
