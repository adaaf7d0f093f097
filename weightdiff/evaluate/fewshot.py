"""Few-shot SGD baseline: train with k labelled examples per class and time it.

For LoRA zoos an adapter is trained on the frozen base with the zoo's own adapter recipe (rank,
alpha, modules, steps, learning rate) — the same procedure that made the zoo, given only k
examples per class; given a start adapter (generate-then-refine: a generated one) the same
training starts from it instead of from the base. For full zoos a network is trained from its
random initialisation with the zoo's optimiser settings and the same number of optimiser steps
as one zoo run, on k examples per class (``k = None``: the whole training split).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from weightdiff.tasks import Task
from weightdiff.zoo.training import evaluate_module, few_shot_indices, train_lora_adapter

ALL = "all"
DEFAULT_KS: tuple[int | str, ...] = (1, 5, 10, 50, ALL)


def recipe_value(recipe: Any, key: str, default: Any = None) -> Any:
    """A recipe field from a ``Recipe`` object or its dict form."""
    if isinstance(recipe, Mapping):
        return recipe.get(key, default)
    return getattr(recipe, key, default)


def lora_settings(recipe: Any) -> dict[str, Any]:
    """The zoo recipe's adapter training settings as :func:`train_lora_adapter` keyword arguments.

    Returns:
        ``{rank, alpha, target_modules, steps, lr, batch_size}`` (``batch_size`` None: full-batch steps).
    """
    batch = recipe_value(recipe, "lora_batch_size")
    return {"rank": int(recipe_value(recipe, "rank")), "alpha": float(recipe_value(recipe, "alpha")),
            "target_modules": list(recipe_value(recipe, "target_modules")),
            "steps": int(recipe_value(recipe, "steps")), "lr": float(recipe_value(recipe, "lr")),
            "batch_size": None if batch is None else int(batch)}


def train_full_few_shot(task: Task, examples_per_class: int | None, *, steps: int, lr: float, batch_size: int,
                        seed: int, weight_decay: float = 0.0) -> dict[str, float]:
    """Train ``task.build_network()`` from its seeded initialisation on k examples per class.

    Adam(W) for ``steps`` minibatch steps with a cosine decay. Returns ``train/val/test_acc`` and
    ``seconds`` (training wall time).
    """
    data = task.data()
    x, y = data.x_train, data.y_train
    start = time.perf_counter()
    if examples_per_class is not None:
        idx = few_shot_indices(y, examples_per_class, seed)
        x, y = x[idx], y[idx]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model: nn.Module = task.build_network()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        model.train()
        for _ in range(steps):
            b = torch.randint(len(y), (min(batch_size, len(y)),), generator=gen)
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    metrics = evaluate_module(model, data)
    metrics["seconds"] = seconds
    return metrics


def few_shot_sgd(task: Task, ks: Sequence[int | str], *, kind: str, recipe: Any, base_module: nn.Module | None = None,
                 seeds: Sequence[int] = (0,), on_fit: Callable[[str, int], None] | None = None,
                 start: Mapping[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Few-shot SGD on one task for each k; mean over ``seeds``: ``len(ks) * len(seeds)`` fits.

    Args:
        task: the task to train on (its training split supplies the examples).
        ks: examples per class; ``"all"`` for the whole training split.
        kind: ``"lora"`` (adapter on ``base_module``) or ``"full"`` (network from scratch).
        recipe: the zoo's recipe (``Recipe`` or dict): the training settings reused here.
        base_module: the frozen base network (LoRA).
        seeds: a fit per seed for every k.
        on_fit: called as ``on_fit(str(k), seed)`` after each fit (e.g. to advance a progress bar).
        start: (LoRA) one adapter ``{name: tensor}`` (no S dimension) every fit starts from, instead
            of PEFT's initialisation (``B = 0``: the base alone).

    Returns:
        ``{str(k): {"accuracy": test accuracy, "seconds": wall time per model}}``.
    """
    if start is not None and kind != "lora":
        raise ValueError(f"a start adapter needs kind 'lora', got {kind!r}")
    out: dict[str, dict[str, float]] = {}
    for k in ks:
        per_class = None if k == ALL else int(k)
        accs, secs = [], []
        for seed in seeds:
            if kind == "lora":
                if base_module is None:
                    raise ValueError("few-shot LoRA training needs the base module")
                _, m = train_lora_adapter(task, base_module, seed=seed, examples_per_class=per_class,
                                          init_adapter=start, **lora_settings(recipe))
            else:
                n = task.data().x_train.shape[0]
                batch = int(recipe_value(recipe, "batch_size", 64))
                steps = int(recipe_value(recipe, "epochs", 30)) * math.ceil(n / batch)
                m = train_full_few_shot(task, per_class, steps=steps, lr=float(recipe_value(recipe, "lr", 3e-3)),
                                        batch_size=batch, seed=seed,
                                        weight_decay=float(recipe_value(recipe, "weight_decay", 0.0)))
            accs.append(m["test_acc"])
            secs.append(m["seconds"])
            if on_fit is not None:
                on_fit(str(k), seed)
        out[str(k)] = {"accuracy": sum(accs) / len(accs), "seconds": sum(secs) / len(secs)}
    return out
