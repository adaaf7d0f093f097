"""Training loops for the zoo: full runs with spread-out late checkpoints, and LoRA adapters.

All loops are deterministic given their seed and leave the global RNG state untouched (they
run inside ``torch.random.fork_rng``). The thread count is the caller's choice.

Late checkpoints (``train_full_run``): plain late-epoch checkpoints of one run differ by a few
optimizer steps, closer together than 5 % noise copies, so a generator trained on them learns
nothing about the basin. With ``late_lr_schedule="cyclic"`` the run trains at ``lr`` until the
late phase, then each checkpoint ends one cosine cycle that restarts at ``late_lr_peak · lr``
and anneals to ``late_lr_min · lr`` (snapshot-ensemble style, Huang et al. 2017): every
checkpoint is a well-converged point, and consecutive checkpoints are far apart in the basin
(measurements beside :data:`FULL_DEFAULTS`).

LoRA adapters (``train_lora_adapter``) train through PEFT with full-batch Adam; the
``rotdigits`` setup and its measurements are in :mod:`weightdiff.tasks.rotdigits`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from weightdiff.base_networks import base_call
from weightdiff.errors import ZooBuildError
from weightdiff.tasks import Task, TaskData, get_family, get_task, list_families

LateSchedule = Literal["cyclic", "constant", "cosine"]

# Recipes measured on one CPU core, 3 seeds; distances are RMS over entries after dividing each tensor
# by its std over all checkpoints (5 % noise copies sit at 0.05, independent runs at √2):
#   digits (DigitsCNN), 30 epochs, ~1 s/run:
#     plain last 4 epochs, constant lr   within-run 0.026   between-run 1.44   test 96.9 %
#     plain last 4 epochs, cosine decay  within-run 0.000   between-run 1.43   test 96.7 %
#     cyclic, 4-epoch cycles, peak 4·lr  within-run 0.159   between-run 1.53   test 97.1 %
#   mnist1d (MNIST1DCNN), 40 epochs, ~5 s/run:
#     plain last 4 epochs, constant lr   within-run 0.146   between-run 1.44   test 93.1 %
#     cyclic, 4-epoch cycles, peak 1·lr  within-run 0.042   between-run 1.42   test 95.8 %
#     cyclic, 4-epoch cycles, peak 1.5·lr within-run 0.242  between-run 1.47   test 94.8 %
#     cyclic, 4-epoch cycles, peak 2·lr  within-run 0.396   between-run 1.51   test 94.5 %
FULL_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {"epochs": 30, "lr": 3e-3, "batch_size": 64, "checkpoint_epochs": [18, 22, 26, 30],
               "late_lr_schedule": "cyclic", "late_lr_peak": 4.0},
    "mnist1d": {"epochs": 40, "lr": 2e-2, "batch_size": 100, "checkpoint_epochs": [28, 32, 36, 40],
                "late_lr_schedule": "cyclic", "late_lr_peak": 1.5},
}
"""Per-family keyword arguments of :func:`train_full_run` (a zoo recipe may override any)."""


@torch.no_grad()
def evaluate_module(module: nn.Module, data: TaskData) -> dict[str, float]:
    """Train/val/test accuracy of a module on a task's splits (called as its ``BaseCall`` says)."""
    was_training = module.training
    module.eval()
    call = base_call(module)
    out = {}
    for split in ("train", "val", "test"):
        x, y = data.split(split)
        out[f"{split}_acc"] = float((call(module, x).argmax(-1) == y).float().mean())
    module.train(was_training)
    return out


def lr_at(progress: float, *, lr: float, epochs: int, checkpoint_epochs: Sequence[int],
          schedule: LateSchedule, late_lr_peak: float, late_lr_min: float) -> float:
    """Learning rate at fractional epoch ``progress`` ∈ [0, epochs).

    ``cyclic``: ``lr`` before the late phase; then one cosine cycle per checkpoint, from
    ``late_lr_peak·lr`` down to ``late_lr_min·lr`` exactly at the checkpoint epoch. The cycle
    length is the spacing of the checkpoints (the first cycle has the length of the second).
    ``constant``: ``lr`` throughout. ``cosine``: one cosine decay to 0 over all epochs.
    """
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress / epochs))
    if schedule != "cyclic":
        raise ValueError(f"late_lr_schedule must be 'cyclic', 'constant' or 'cosine', got {schedule!r}")
    ends = sorted(checkpoint_epochs)
    first_len = ends[1] - ends[0] if len(ends) > 1 else max(1, ends[0] // 4)
    starts = [ends[0] - first_len] + ends[:-1]
    for start, end in zip(starts, ends):
        if start <= progress < end:
            phase = (progress - start) / (end - start)
            lo, hi = late_lr_min * lr, late_lr_peak * lr
            return lo + (hi - lo) * 0.5 * (1.0 + math.cos(math.pi * phase))
    return lr


def train_full_run(
    task: Task | str,
    seed: int,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    checkpoint_epochs: Sequence[int],
    late_lr_schedule: LateSchedule = "cyclic",
    late_lr_peak: float = 2.0,
    late_lr_min: float = 0.02,
    weight_decay: float = 0.0,
    network: Callable[[], nn.Module] | None = None,
) -> list[tuple[int, dict[str, torch.Tensor], dict[str, float]]]:
    """Train one network from scratch and return several late checkpoints.

    Args:
        task: a full-network task (``"digits"``, ``"mnist1d"``) or its name.
        seed: sets the initialisation and the data order.
        epochs: total epochs; ``checkpoint_epochs`` are 1-based epochs in ``[1, epochs]`` at whose
            end a checkpoint is taken.
        lr, batch_size, weight_decay: Adam(W) settings.
        network: builds the network to train (default ``task.build_network``).
        late_lr_schedule, late_lr_peak, late_lr_min: see :func:`lr_at`; ``"cyclic"`` spreads the
            checkpoints within their basin.

    Returns:
        ``[(epoch, state_dict, metrics)]`` in epoch order; state dicts are detached CPU copies;
        metrics hold ``train_acc, val_acc, test_acc, train_loss, seconds``.
    """
    task = get_task(task) if isinstance(task, str) else task
    ends = sorted(set(int(e) for e in checkpoint_epochs))
    if not ends or ends[0] < 1 or ends[-1] > epochs:
        raise ValueError(f"checkpoint_epochs must be non-empty and within [1, {epochs}], got {list(checkpoint_epochs)}")
    data = task.data()
    x, y = data.x_train, data.y_train
    n = len(y)
    steps_per_epoch = math.ceil(n / batch_size)
    out: list[tuple[int, dict[str, torch.Tensor], dict[str, float]]] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (network or task.build_network)()
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        model.train()
        for epoch in range(epochs):
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for step in range(steps_per_epoch):
                idx = perm[step * batch_size:(step + 1) * batch_size]
                for group in opt.param_groups:
                    group["lr"] = lr_at(epoch + step / steps_per_epoch, lr=lr, epochs=epochs, checkpoint_epochs=ends,
                                        schedule=late_lr_schedule, late_lr_peak=late_lr_peak, late_lr_min=late_lr_min)
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            if epoch + 1 in ends:
                metrics = evaluate_module(model, data)
                metrics.update(train_loss=total / n, seconds=time.perf_counter() - start)
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                out.append((epoch + 1, state, metrics))
    return out


def base_architecture_task(task_family: str) -> Task:
    """The task whose ``build_network()`` gives the base network for ``task_family``.

    ``task_family`` may name an adapter family or task (``"rotdigits"``, or
    ``"rotdigits:angle=40"``) or the base family whose data the base is trained on
    (``"digits"``): both resolve to the adapter family's base architecture (for a base family
    under several adapter families, the first by name whose tasks have numeric factors only:
    ``digits`` gives ``rotdigits``, not ``cordigits``). A full family with no adapter family on
    top (``"mnist1d"``) resolves to itself.
    """
    family = task_family.partition(":")[0].strip()
    if get_family(family).kind == "lora":
        return get_task(task_family if ":" in task_family else _example_task_string(family))
    for name in list_families():  # sorted: the first adapter family on this base that can name a task
        cls = get_family(name)
        if cls.kind == "lora" and cls.base_family == family:
            try:
                return get_task(_example_task_string(name))
            except ZooBuildError:
                continue  # its tasks are named (e.g. cordigits' corruptions): its recipes name their base
    return get_task(task_family)


def _example_task_string(family: str) -> str:
    # Every member of a family has the same base architecture; fill the required factors with
    # their lowest allowed value.
    specs = get_family(family).factor_specs
    named = [f.name for f in specs if f.default is None and f.kind == "name"]
    if named:  # e.g. `dataset:name=...`: the tasks share no architecture the family could build
        raise ZooBuildError(f"task family '{family}' names its tasks by '{named[0]}' and has no network of its "
                            "own: give the zoo's base network (`zoo import --base-config`, a class_path or a "
                            "Hugging Face folder)")
    parts = [f"{f.name}={f.choices[0] if f.choices else f.low:g}" for f in specs if f.default is None]
    return family + (":" + ",".join(parts) if parts else "")


def train_base(task_family: str = "digits", seed: int = 0, **overrides: Any) -> nn.Module:
    """Train the frozen base network of an adapter family (eval mode, gradients off).

    ``"digits"`` and ``"rotdigits"`` both give the ``rotdigits`` base: a
    :class:`~weightdiff.targets.DigitsMLP` trained on upright digits (see
    :func:`base_architecture_task`). Uses :data:`FULL_DEFAULTS` of the base family with a cosine
    decay to one final checkpoint; ``overrides`` replace any of ``epochs, lr, batch_size``.
    """
    arch = base_architecture_task(task_family)
    data_family = arch.base_family or arch.family
    data_task = get_task(data_family)
    hp = {k: FULL_DEFAULTS[data_family][k] for k in ("epochs", "lr", "batch_size")}
    hp.update(overrides)
    (_, state, _), = train_full_run(data_task, seed, checkpoint_epochs=[hp["epochs"]], late_lr_schedule="cosine",
                                    network=arch.build_network, **hp)
    model = arch.build_network()
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


def few_shot_indices(y: torch.Tensor, examples_per_class: int, seed: int) -> torch.Tensor:
    """Indices of ``examples_per_class`` examples of each class (seeded; sorted)."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        if len(members) < examples_per_class:
            raise ValueError(f"class {int(c)} has {len(members)} training examples, fewer than "
                             f"examples_per_class={examples_per_class}")
        picks.append(members[torch.randperm(len(members), generator=gen)[:examples_per_class]])
    return torch.sort(torch.cat(picks)).values


def train_lora_adapter(
    task: Task | str,
    base_module: nn.Module,
    *,
    rank: int,
    alpha: float,
    target_modules: Sequence[str],
    steps: int,
    lr: float,
    seed: int,
    examples_per_class: int | None = None,
    batch_size: int | None = None,
    init_adapter: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Train a PEFT LoRA adapter on a frozen copy of ``base_module`` with Adam.

    Args:
        task: an adapter task or its name, e.g. ``"rotdigits:angle=40,flip=0"``.
        base_module: the trained base network (not modified).
        rank, alpha, target_modules: ``LoraConfig(r=rank, lora_alpha=alpha, target_modules=...)``.
        steps, lr: Adam steps and learning rate.
        seed: sets the LoRA initialisation (and the few-shot subset and batches).
        examples_per_class: train on this many labelled examples per class (few-shot SGD);
            ``None`` uses the whole training split.
        batch_size: ``None`` for full-batch steps.
        init_adapter: start from these adapter tensors (one adapter, keyed as the returned state
            dict) instead of PEFT's seeded initialisation (``B = 0``, the base alone); the seed
            still draws the initialisation first, so the few-shot subset and batches are unchanged.

    Returns:
        ``(adapter_state_dict, metrics)``: tensors keyed as ``get_peft_model_state_dict`` (e.g.
        ``base_model.model.fc1.lora_A.weight``), and ``train_acc, val_acc, test_acc, train_loss,
        seconds`` (wall), ``cpu_seconds`` (process CPU time) and ``num_train``; the times cover
        building the PEFT model and the optimisation, not the evaluation.
    """
    task = get_task(task) if isinstance(task, str) else task
    data = task.data()
    x, y = data.x_train, data.y_train
    start, cpu_start = time.perf_counter(), time.process_time()
    if examples_per_class is not None:
        idx = few_shot_indices(y, examples_per_class, seed)
        x, y = x[idx], y[idx]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        call = base_call(base_module)  # attention mask of padded token ids; a ModelOutput's logits
        model = get_peft_model(copy.deepcopy(base_module).requires_grad_(False), config)
        if init_adapter is not None:
            _load_adapter(model, init_adapter)
        model.eval()  # no dropout/BN; LoRA layers train fine in eval mode
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            if batch_size is None or batch_size >= len(y):
                xb, yb = x, y
            else:
                idx = torch.randint(len(y), (batch_size,), generator=gen)
                xb, yb = x[idx], y[idx]
            loss = F.cross_entropy(call(model, xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        metrics = evaluate_module(model, data)
        with torch.no_grad():
            metrics["train_loss"] = float(F.cross_entropy(call(model, x), y))
    metrics.update(seconds=seconds, cpu_seconds=cpu_seconds, num_train=float(len(y)))
    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return state, metrics


def _load_adapter(model: nn.Module, adapter: Mapping[str, torch.Tensor]) -> None:
    """Copy one adapter's tensors into a PEFT model's LoRA parameters, checking every key and shape.

    Raises:
        ValueError: naming a missing or unexpected key, or a tensor of the wrong shape.
    """
    expected = get_peft_model_state_dict(model)
    missing = [k for k in expected if k not in adapter]
    unexpected = [k for k in adapter if k not in expected]
    if missing or unexpected:
        which = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise ValueError(f"init_adapter: {which}; expected keys {list(expected)}")
    for k, want in expected.items():
        if tuple(adapter[k].shape) != tuple(want.shape):
            raise ValueError(f"init_adapter: tensor '{k}' has shape {tuple(adapter[k].shape)}, "
                             f"expected {tuple(want.shape)}")
    set_peft_model_state_dict(model, {k: adapter[k].to(want) for k, want in expected.items()})
