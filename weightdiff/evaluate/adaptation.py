"""Adaptation baselines of adapter suites: each adapts the frozen base to a task without a generator.

* **Test-time entropy minimisation** (:func:`tent`; Wang et al., "Tent: Fully Test-Time
  Adaptation by Entropy Minimization", ICLR 2021): a copy of the base whose normalisation affine
  parameters alone are trained to minimise the mean prediction entropy on a batch of unlabelled
  inputs of the task, then run on the test split. It changes norm parameters, not the adapter,
  so it gives predictions, not adapter tensors.
* **Multi-task LoRA** (:func:`train_multitask_lora`): one adapter trained with the zoo's adapter
  recipe on the union of the training tasks' training splits, evaluated on every task.
* **kNN LoRA averaging** (:func:`knn_lora_average`; LoRA routing / LoraHub-style composition,
  Huang et al. 2023): the weighted mean of the adapters of the ``k`` training tasks whose
  condition vectors are nearest to the query's.
* **Generate-then-refine** (:func:`generate_then_refine`): few-shot SGD
  (:func:`~weightdiff.evaluate.fewshot.few_shot_sgd`) started from a given (generated) adapter
  instead of from the base.

Adapter tensors are keyed as the zoo's files (``base_model.model.fc1.lora_A.weight``); batched
params are ``{name: (S, *shape)}`` as every other row of the benchmark.
"""

from __future__ import annotations

import copy
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from tqdm.auto import tqdm

from weightdiff.base_networks import base_call
from weightdiff.evaluate.fewshot import DEFAULT_KS, few_shot_sgd, lora_settings, recipe_value
from weightdiff.tasks import Task, get_task
from weightdiff.weights.canonical import canonicalize_lora

TENT_STEPS = 10
"""Adam steps of :func:`tent` on its one unlabelled batch (measurements in :func:`tent`)."""
TENT_LR = 1e-3
"""Adam learning rate of :func:`tent`, the paper's."""
KNN_K = 3
"""Neighbours of :func:`knn_lora_average`."""
_LOSS_SHOWN_EVERY = 50  # steps between updates of the multi-task bar's loss

Weighting = Literal["inverse", "softmax"]
Merge = Literal["factors", "delta-svd"]

# torch's normalisation layers, and foreign ones by name (transformers' LlamaRMSNorm, T5LayerNorm, timm's
# LayerNorm2d, ...): their own parameters are the affine (scale and shift) of the normalisation.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
               nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_NORM_NAME = re.compile(r"Norm(\dd)?$")
_LORA_A_PARTS = ("lora_A", "lora_embedding_A")  # factors (r, in...): the rank is axis 0
_LORA_B_PARTS = ("lora_B", "lora_embedding_B")  # factors (out, r, 1...): the rank is axis 1
_LORA_RECIPE_KEYS = ("rank", "alpha", "target_modules", "steps", "lr", "lora_batch_size")  # read by lora_settings


# ----------------------------------------------------------------------------------- TENT
@dataclass
class TentResult:
    """The outcome of :func:`tent`.

    Attributes:
        predictions: ``(N,)`` classes predicted on ``x_test``.
        logits: ``(N, C)`` outputs on ``x_test``.
        module: the adapted copy of the base (eval mode, gradients off).
        entropy_before, entropy_after: mean prediction entropy (nats) on the unlabelled batch before
            and after adaptation.
        seconds: adaptation wall time (copy and optimisation, not the test predictions).
        num_params: adapted scalars (the normalisation affine parameters).
    """

    predictions: torch.Tensor
    logits: torch.Tensor
    module: nn.Module
    entropy_before: float
    entropy_after: float
    seconds: float
    num_params: int


def norm_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The affine parameters of every normalisation layer of ``module``: ``[(name, parameter)]``.

    A layer counts when it is one of torch's normalisation layers or its class name ends in
    ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``; ``LayerNorm2d``); its own parameters (not its
    children's) are taken. A layer built without affine parameters contributes none.
    """
    out = []
    for prefix, layer in module.named_modules():
        if isinstance(layer, _NORM_TYPES) or _NORM_NAME.search(type(layer).__name__):
            out += [(f"{prefix}.{n}" if prefix else n, p) for n, p in layer.named_parameters(recurse=False)]
    return out


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits (N, C)``: ``-mean_n Σ_c p log p`` (TENT eq. 1)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def tent(base_module: nn.Module, x_unlabelled: torch.Tensor, x_test: torch.Tensor, *, steps: int = TENT_STEPS,
         lr: float = TENT_LR, chunk_size: int = 1024) -> TentResult:
    """Test-time entropy minimisation of the base's normalisation parameters, then test predictions.

    A copy of ``base_module`` runs in eval mode with every parameter frozen except the affine
    parameters of its normalisation layers (:func:`norm_parameters`); Adam takes ``steps``
    full-batch steps on the mean prediction entropy of ``x_unlabelled`` (TENT, Wang et al. 2021,
    eq. 1). BatchNorm layers keep their running statistics (eval mode): only their affine part
    adapts. Deterministic: no randomness is drawn.

    Measured on a :class:`~weightdiff.tasks.networks.DigitsViT` base (94.8 % on clean digits) over
    11 corruptions (contrast, noise, invert, blur, salt-and-pepper, pixelate, rotate, shear, zoom,
    wave, occlusion at severities 0.25-1), 64 unlabelled training images each: the mean change of
    test accuracy over the base is +0.0 / -0.1 / -0.4 / -0.4 / -0.3 points after 1 / 5 / 10 / 20 /
    50 steps at lr 1e-3, and -1.0 after 10 steps at lr 1e-2. It is no uniform gain: at 50 steps,
    contrast +8 and zoom +6 points, blur -9 and pixelate -7. On rotated digits (an MLP base with
    LayerNorm) every setting is at or below the base.

    Args:
        base_module: the frozen base network (not modified).
        x_unlabelled: ``(B, *input_shape)`` unlabelled inputs of the task.
        x_test: ``(N, *input_shape)`` inputs to predict after adaptation.
        steps, lr: Adam steps and learning rate.
        chunk_size: test inputs per forward pass.

    Raises:
        ValueError: the base has no normalisation layer with affine parameters (naming its class),
            or the unlabelled batch is empty.
    """
    if x_unlabelled.shape[0] == 0:
        raise ValueError("tent needs at least one unlabelled input, got an empty batch")
    start = time.perf_counter()
    module = copy.deepcopy(base_module).eval().requires_grad_(False)
    params = [p for _, p in norm_parameters(module)]
    if not params:
        raise ValueError(f"tent adapts normalisation affine parameters, but the {type(base_module).__name__} base "
                         "has none (no LayerNorm, GroupNorm, BatchNorm, RMSNorm or other *Norm layer with "
                         "weights): test-time entropy minimisation does not apply to it")
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    call = base_call(module)  # attention mask of padded token ids; a ModelOutput's logits
    with torch.no_grad():
        before = float(mean_entropy(call(module, x_unlabelled)))
    for _ in range(steps):
        loss = mean_entropy(call(module, x_unlabelled))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    module.requires_grad_(False)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        after = float(mean_entropy(call(module, x_unlabelled)))
        logits = torch.cat([call(module, x_test[i:i + chunk_size]) for i in range(0, x_test.shape[0], chunk_size)])
    return TentResult(predictions=logits.argmax(-1), logits=logits, module=module, entropy_before=before,
                      entropy_after=after, seconds=seconds, num_params=sum(p.numel() for p in params))


# ------------------------------------------------------------------------ multi-task LoRA
@dataclass
class MultiTaskLora:
    """The outcome of :func:`train_multitask_lora`.

    Attributes:
        params: the adapter ``{name: (1, *shape)}``, keyed as the zoo's adapter files.
        steps, batch_size: Adam steps taken and examples per step.
        num_tasks, num_examples: training tasks and labelled examples in their union.
        loss_first, loss_last: mean minibatch loss over the first and the last 5 % of the steps.
        seconds: training wall time.
    """

    params: dict[str, torch.Tensor]
    steps: int
    batch_size: int
    num_tasks: int
    num_examples: int
    loss_first: float
    loss_last: float
    seconds: float


def train_multitask_lora(tasks: Sequence[Task | str], base_module: nn.Module, recipe: Any, *,
                         steps: int | None = None, batch_size: int | None = None, seed: int = 0,
                         progress: bool = False) -> MultiTaskLora:
    """One LoRA adapter trained on the union of ``tasks``' training splits.

    The LoRA config (rank, alpha, target modules), optimiser (Adam) and learning rate are the zoo
    recipe's (:func:`~weightdiff.evaluate.fewshot.lora_settings`), as for few-shot SGD; the
    seed draws the LoRA initialisation as the zoo's run of that seed does. Minibatches walk through
    seeded permutations of the union (every example once per epoch).

    Args:
        tasks: the training tasks (or their names).
        base_module: the frozen base network (not modified).
        recipe: the zoo's recipe (``Recipe`` or dict).
        steps: Adam steps; ``None``: the recipe's steps times the number of tasks (one zoo run's
            budget per task).
        batch_size: examples per step; ``None``: the recipe's ``lora_batch_size``, or where the zoo
            takes full-batch steps, the mean size of one task's training split (each step sees as
            many examples as a zoo step).
        seed: LoRA initialisation and data order.
        progress: a tqdm bar over the steps (on a terminal).

    Raises:
        ValueError: no tasks, or inputs of different shapes across tasks (naming the task).
    """
    tasks = [get_task(t) if isinstance(t, str) else t for t in tasks]
    if not tasks:
        raise ValueError("multi-task LoRA needs at least one training task")
    data = [t.data() for t in tasks]
    shape = tuple(data[0].x_train.shape[1:])
    for task, d in zip(tasks, data):
        if tuple(d.x_train.shape[1:]) != shape:
            raise ValueError(f"task '{task.name}' has inputs of shape {tuple(d.x_train.shape[1:])}, expected {shape} "
                             f"(as '{tasks[0].name}')")
    device = next(base_module.parameters()).device
    x = torch.cat([d.x_train for d in data]).to(device)
    y = torch.cat([d.y_train for d in data]).to(device)
    hp = lora_settings(recipe)
    steps = hp["steps"] * len(tasks) if steps is None else int(steps)
    if batch_size is None:
        batch_size = hp["batch_size"] or round(len(y) / len(tasks))
    batch_size = min(int(batch_size), len(y))
    config = LoraConfig(r=hp["rank"], lora_alpha=hp["alpha"], target_modules=hp["target_modules"], lora_dropout=0.0)
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        call = base_call(base_module)
        model = get_peft_model(copy.deepcopy(base_module).requires_grad_(False), config)
        model.eval()  # no dropout/BN, as the zoo's adapters train
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=hp["lr"])
        perm, pos = torch.randperm(len(y), generator=gen), 0
        bar = tqdm(range(steps), desc="multi-task LoRA", unit="step", disable=None if progress else True)
        for step in bar:
            if pos + batch_size > len(y):
                perm, pos = torch.randperm(len(y), generator=gen), 0
            idx = perm[pos:pos + batch_size].to(device)
            pos += batch_size
            loss = F.cross_entropy(call(model, x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step % _LOSS_SHOWN_EVERY == 0:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
    seconds = time.perf_counter() - start
    tail = max(1, len(losses) // 20)
    params = {k: v.detach().clone()[None] for k, v in get_peft_model_state_dict(model).items()}
    return MultiTaskLora(params=params, steps=steps, batch_size=batch_size, num_tasks=len(tasks),
                         num_examples=len(y), loss_first=sum(losses[:tail]) / tail if losses else math.nan,
                         loss_last=sum(losses[-tail:]) / tail if losses else math.nan, seconds=seconds)


# ------------------------------------------------------------------- kNN LoRA averaging
@dataclass
class KnnAverage:
    """The outcome of :func:`knn_lora_average`.

    Attributes:
        params: the averaged adapter ``{name: (1, *shape)}``.
        neighbours: ``(k,)`` rows of the task vectors, nearest first.
        weights: ``(k,)`` float64 weights of the neighbours (non-negative, summing to 1).
        distances: ``(k,)`` float64 L2 distances of the neighbours to the query.
    """

    params: dict[str, torch.Tensor]
    neighbours: torch.Tensor
    weights: torch.Tensor
    distances: torch.Tensor


def neighbour_weights(query: torch.Tensor, task_vectors: torch.Tensor, k: int = KNN_K, *,
                      weighting: Weighting = "inverse", temperature: float | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``k`` task vectors nearest to ``query`` in L2, and their weights.

    ``"inverse"``: ``w_i ∝ 1 / d_i`` (a neighbour at distance 0 takes all the weight, shared
    equally among several). ``"softmax"``: ``w_i ∝ exp(-d_i / τ)`` with ``τ = temperature``, by
    default the mean of the ``k`` distances (scale-free). Ties in distance go to the lower row.

    Args:
        query: ``(d,)`` the condition vector of the task to adapt to.
        task_vectors: ``(T, d)`` one condition vector per training task (task codes, embeddings...).
        k: neighbours, ``1 <= k <= T``.

    Returns:
        ``(rows (k,) long, weights (k,) float64 summing to 1, distances (k,) float64)``, nearest first.

    Raises:
        ValueError: shapes that do not match, ``k`` out of range or a temperature that is not positive.
    """
    if task_vectors.dim() != 2 or query.shape != task_vectors.shape[1:]:
        raise ValueError(f"knn: query of shape {tuple(query.shape)} and task vectors of shape "
                         f"{tuple(task_vectors.shape)}; expected (d,) and (T, d)")
    if not 1 <= k <= task_vectors.shape[0]:
        raise ValueError(f"knn: k={k} neighbours, expected 1 <= k <= {task_vectors.shape[0]} (the number of tasks)")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    dist = (task_vectors.double() - query.double()[None]).norm(dim=1)       # (T,)
    rows = torch.argsort(dist, stable=True)[:k]
    d = dist[rows]
    if weighting == "inverse":
        w = (d == 0).double() if bool((d == 0).any()) else 1.0 / d
    elif weighting == "softmax":
        tau = temperature if temperature is not None else float(d.mean())
        w = torch.softmax(-d / tau, 0) if tau > 0 else torch.ones_like(d)   # every distance 0: equal weights
    else:
        raise ValueError(f"knn: weighting must be 'inverse' or 'softmax', got {weighting!r}")
    return rows, w / w.sum(), d


def _rank_axis(name: str) -> int | None:
    """The rank axis of a LoRA factor by its name (0 for A, 1 for B); None for another tensor."""
    parts = name.split(".")
    if any(p in _LORA_A_PARTS for p in parts):
        return 0
    if any(p in _LORA_B_PARTS for p in parts):
        return 1
    return None


def _delta_svd_average(adapters: Mapping[str, torch.Tensor], rows: torch.Tensor,
                       weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """``Σ_i w_i B_i A_i`` of every LoRA pair re-factored to its rank by a truncated SVD (other tensors: ``Σ w_i t_i``).

    The weighted factors are stacked along the rank, ``[√w_1 B_1 … √w_k B_k] [√w_1 A_1; …; √w_k A_k]
    = Σ w_i B_i A_i``, so the SVD form of the stacked pair (:func:`canonicalize_lora`, in float64)
    is that of the averaged delta; its leading ``r`` singular directions are the nearest rank-``r``
    pair (Eckart-Young). Example: k=3 pairs of r=8 stack to ``A (24, in)``, ``B (out, 24)``,
    truncated to ``A (8, in)``, ``B (out, 8)``.
    """
    root = weights.sqrt()
    stacked, ranks, out = {}, {}, {}
    for name, v in adapters.items():
        axis = _rank_axis(name)
        picked = v[rows].double()                                            # (k, *shape)
        if axis is None:
            out[name] = (weights.view(-1, *[1] * (v.dim() - 1)) * picked).sum(0).to(v.dtype)[None]
            continue
        scaled = root.view(-1, *[1] * (v.dim() - 1)) * picked
        stacked[name] = torch.cat(list(scaled.unbind(0)), dim=axis)          # rank k·r
        ranks[name] = v.shape[1 + axis]
    for name, factor in canonicalize_lora(stacked).items():
        axis, r = _rank_axis(name), ranks[name]
        out[name] = factor.narrow(axis, 0, r).to(adapters[name].dtype)[None]
    return {name: out[name] for name in adapters}


def knn_lora_average(query: torch.Tensor, task_vectors: torch.Tensor, adapters: Mapping[str, torch.Tensor], *,
                     k: int = KNN_K, weighting: Weighting = "inverse", temperature: float | None = None,
                     merge: Merge = "delta-svd") -> KnnAverage:
    """The weighted average of the adapters of the ``k`` training tasks nearest to ``query``.

    ``merge="factors"``: every tensor, A and B separately, is ``Σ_i w_i t_i`` (a convex
    combination; with ``k = 1`` exactly the nearest adapter). It is meaningful because the runs of
    one seed start every task from the same LoRA initialisation (the zoo recipes share seed k
    across tasks), so their factors stay in one gauge; pass adapters of one seed.
    ``merge="delta-svd"``: the merged updates ``Σ_i w_i B_i A_i`` re-factored to rank ``r``
    (:func:`_delta_svd_average`): gauge-free, but rank-truncated.

    Measured on ``rotdigits-lora`` (324 training tasks, the seed-0 adapters; task codes; mean
    test accuracy over the near / far / combo held-out kinds, inverse-distance weights):
    k = 1: 84.8 %; k = 2 / 3 / 5 / 8: factors 81.0 / 80.9 / 80.1 / 78.1 %, delta-svd
    82.2 / 82.1 / 81.2 / 79.9 %; softmax weights within 0.2 points of these. Averaging rotation
    adapters does not make an adapter of the angle between them, so on this family no k > 1
    beats the nearest adapter alone; delta-svd is the better merge at every k > 1.

    Args:
        query: ``(d,)`` the condition of the task to adapt to.
        task_vectors: ``(T, d)`` the training tasks' conditions.
        adapters: ``{name: (T, *shape)}``, row t the adapter of task t.
        k, weighting, temperature: see :func:`neighbour_weights`.
        merge: ``"factors"`` or ``"delta-svd"``.

    Raises:
        ValueError: adapters whose first dimension is not T, or an unknown ``merge``.
    """
    for name, v in adapters.items():
        if v.shape[0] != task_vectors.shape[0]:
            raise ValueError(f"knn: adapter tensor '{name}' has {v.shape[0]} rows, expected one per task vector "
                             f"({task_vectors.shape[0]})")
    rows, w, d = neighbour_weights(query, task_vectors, k, weighting=weighting, temperature=temperature)
    if merge == "factors":
        params = {name: (w.view(-1, *[1] * (v.dim() - 1)) * v[rows].double()).sum(0).to(v.dtype)[None]
                  for name, v in adapters.items()}
    elif merge == "delta-svd":
        params = _delta_svd_average(adapters, rows, w)
    else:
        raise ValueError(f"knn: merge must be 'factors' or 'delta-svd', got {merge!r}")
    return KnnAverage(params=params, neighbours=rows, weights=w, distances=d)


# --------------------------------------------------------------------- generate-then-refine
def generate_then_refine(task: Task, start: Mapping[str, torch.Tensor], ks: Sequence[int | str] = DEFAULT_KS, *,
                         recipe: Any, base_module: nn.Module, seeds: Sequence[int] = (0,), lr: float | None = None,
                         on_fit: Callable[[str, int], None] | None = None) -> dict[str, dict[str, float]]:
    """Few-shot SGD on ``task`` started from the adapter ``start`` (a generated one) for each k.

    The same fits as :func:`~weightdiff.evaluate.fewshot.few_shot_sgd` from the base (the zoo's
    recipe, k labelled examples per class, the same seeds and subsets), with the LoRA tensors
    initialised to ``start``; a start equal to PEFT's seeded initialisation gives exactly the
    fits from the base.

    The recipe's learning rate is tuned for training from ``B = 0`` and can undo a good start on
    few examples. Measured on ``tiny-rotdigits-lora`` (30 full-batch steps, started from each
    task's own zoo adapter, 88 % test accuracy, mean of 6 tasks), accuracy at k = 1 / 5 / 10
    examples per class: lr 3e-2 (the recipe's) 62 / 85 / 88 %, 1e-2 72 / 86 / 88 %, 3e-3
    81 / 87 / 88 %, 1e-3 85 / 88 / 88 %.

    Args:
        task: the task (its training split supplies the examples).
        start: one adapter ``{name: tensor}`` (no S dimension), keyed as the zoo's files.
        ks, recipe, base_module, seeds, on_fit: as for ``few_shot_sgd``.
        lr: Adam learning rate; ``None``: the recipe's (the same fits as few-shot SGD from the base).

    Returns:
        ``{str(k): {"accuracy": test accuracy, "seconds": training wall time per model}}``.

    Raises:
        ValueError: ``start`` is all zero: with ``A = B = 0`` no gradient reaches either factor
            (a stationary point of LoRA), so it would never train; or its keys or shapes do not
            match the recipe's adapter (named).
    """
    if all(not bool(v.any()) for v in start.values()):
        raise ValueError("generate-then-refine: the start adapter is all zero (A = B = 0), a stationary point "
                         "where no gradient reaches either LoRA factor; start from a generated adapter, or use "
                         "few-shot SGD from the base (B = 0 with PEFT's random A)")
    if lr is not None:
        recipe = {**{key: recipe_value(recipe, key) for key in _LORA_RECIPE_KEYS}, "lr": float(lr)}
    return few_shot_sgd(task, ks, kind="lora", recipe=recipe, base_module=base_module, seeds=seeds, on_fit=on_fit,
                        start=start)
