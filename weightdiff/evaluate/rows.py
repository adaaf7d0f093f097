"""The rows of the honest benchmark for one task: which models each baseline contributes.

:class:`ZooState` loads the training zoo once and derives what the baselines need from it (the
canonicalised checkpoints, the comparison space of novelty, the hypernetworks fitted on the
tasks' conditions); :func:`task_rows` returns, for one task, every row's models (stacked
parameters, or fixed predictions / outputs where a row has no weights), which
:func:`weightdiff.evaluate.benchmark.run_benchmark` scores and reports.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from weightdiff.errors import BenchmarkError
from weightdiff.evaluate.adaptation import (
    KNN_K, TENT_LR, TENT_STEPS, knn_lora_average, norm_parameters, tent, train_multitask_lora,
)
from weightdiff.evaluate.baselines import (
    average_params, canonical_params, floor_predictions, gaussian_params, nearest_task, noise_added_params,
    polished_params, select,
    stack_params, zero_adapter,
)
from weightdiff.evaluate.hypernet import HypernetTrainConfig, ParamCodec, RidgeHypernet, train_mlp_hypernet
from weightdiff.evaluate.novelty import ComparisonSpace
from weightdiff.models.conditioning import text_condition, unlabelled_inputs
from weightdiff.targets import Target
from weightdiff.tasks import Metric, Task, get_task
from weightdiff.zoo import Zoo
from weightdiff.zoo.training import few_shot_indices

log = logging.getLogger(__name__)

#: The benchmark row of a generator's conditional mean μ(c) (generators with ``mean_head``).
MEAN_ROW = "generated mean μ(c)"
RUN_AVERAGE_ROW = "run average"  # whole networks: each training run's checkpoints averaged


@dataclass
class Models:
    """One row's models on one task: params (or fixed predictions ``(S, N)`` / outputs ``(S, N, ...)``),
    ids, zoo indices to exclude."""

    ids: list[str]
    params: dict[str, torch.Tensor] | None = None
    preds: torch.Tensor | None = None
    outputs: torch.Tensor | None = None
    exclude: list[int | None] | None = None


def suite_metric(tasks: Sequence[str]) -> Metric:
    """The one metric of ``tasks`` (:attr:`Task.metric`), which a benchmark averages over.

    Raises:
        BenchmarkError: the tasks have different metrics (naming each metric's tasks).
    """
    by_name: dict[str, list[str]] = defaultdict(list)
    metrics: dict[str, Metric] = {}
    for name in tasks:
        metric = get_task(name).metric
        by_name[metric.name].append(name)
        metrics[metric.name] = metric
    if len(by_name) > 1:
        listed = "; ".join(f"{m}: {', '.join(ts)}" for m, ts in sorted(by_name.items()))
        raise BenchmarkError(f"the benchmark's tasks are scored with different metrics ({listed}); one table "
                             "averages one metric: benchmark the tasks of each metric apart")
    return next(iter(metrics.values()))


def constant_outputs(task: Task, split: str = "test") -> torch.Tensor:
    """Outputs ``(1, N, ...)`` of the trivial predictor for a metric other than accuracy: one constant for every input.

    Class targets: the log of the training class frequencies, add-one smoothed so that a class
    missing from the training split costs a finite loss (its argmax is the majority class).
    Other targets: the mean training target (the constant of least squared error).
    """
    data = task.data()
    n = data.split(split)[0].shape[0]
    if task.metric.classification:
        counts = torch.bincount(data.y_train, minlength=task.num_classes).double() + 1.0
        constant = (counts / counts.sum()).log().float()                    # (C,)
    else:
        constant = data.y_train.float().mean(0)                              # target shape
    return constant.expand(1, n, *constant.shape)


class ZooState:
    """The training zoo loaded once, with everything the baselines and novelty derive from it
    (``progress``: a bar over the MLP hypernetwork's steps, on a terminal).

    ``condition`` is what retrieval and the hypernetworks read of a task: ``"code"``, its task
    code; ``"text"``, the sentence embedding (and numeric features) of its descriptions, as a
    text-conditioned generator reads them (a training task: the mean over its zoo descriptions;
    a queried task: its description, or the mean over the family's descriptions of it).
    """

    def __init__(self, zoo: Any, *, num: int, seed: int, progress: bool = False,
                 condition: Literal["code", "text"] = "code") -> None:
        self.zoo, self.kind = zoo, zoo.kind
        self.target = zoo.target()
        self.rows = list(zoo.rows("train"))
        if not self.rows:
            raise BenchmarkError(f"zoo {getattr(zoo, 'path', '')} has no training checkpoints")
        self.heldout = list(zoo.rows("heldout"))
        log.info("loading %d training checkpoints", len(self.rows))
        self.params = stack_params([zoo.load(r["id"]) for r in self.rows])     # (Z, *shape)
        self.target.check(self.params, "zoo checkpoints", batched=True)
        # Runs that all fine-tune one parent keep its hidden units in order: nothing to align.
        self.one_parent = self.kind == "full" and int((getattr(zoo, "recipe", None) or {}).get("parents") or 0) == 1
        self.canon = self.params if self.one_parent else canonical_params(self.params, self.kind)[0]
        self.codec = ParamCodec.fit(self.canon)
        self.space = ComparisonSpace(self.target, self.params, align=not self.one_parent,
                                     groups=self.run_ids if self.kind == "full" else None)
        self.spacing = self.space.spacing()
        self.index: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(self.rows):
            self.index[r["task"]].append(i)
        self.codes = {t: torch.tensor(self.rows[ix[0]]["code"], dtype=torch.float32) for t, ix in self.index.items()}
        self.num, self.seed, self.progress = num, seed, progress
        if condition not in ("code", "text"):
            raise BenchmarkError(f"baseline condition must be 'code' or 'text', got {condition!r}")
        self.condition = condition
        if condition == "code":
            self.features = self.codes
        else:
            self.features = {t: self._text_features(self.rows[ix[0]].get("descriptions") or [], t)
                             for t, ix in self.index.items()}

    @classmethod
    def whole_network(cls, path: str, *, num: int = 1, seed: int = 0) -> ZooState:
        """The state of the whole-network zoo at ``path`` (for the probe scripts).

        Raises:
            BenchmarkError: the zoo holds adapters, not whole networks (naming it).
        """
        zoo = Zoo.open(path)
        if zoo.kind != "full":
            raise BenchmarkError(f"zoo {path}: a whole-network zoo is needed (this one holds {zoo.kind} checkpoints)")
        return cls(zoo, num=num, seed=seed)

    @property
    def run_ids(self) -> list[str]:
        """The training run of each training checkpoint (whole-network zoos)."""
        return [r["run_id"] for r in self.rows]

    def within_run_spacing(self) -> float:
        """Median distance of a checkpoint to its nearest run-mate, as the benchmark measures it."""
        return self.space.within_group_spacing(self.run_ids)

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Test inputs and labels of the zoo's first training task (a whole-network zoo's one task)."""
        return get_task(self.rows[0]["task"]).data().split("test")

    def _text_features(self, descriptions: Sequence[str], task: str) -> torch.Tensor:
        if not descriptions:
            raise BenchmarkError(f"task '{task}' has no descriptions in the zoo, and the suite's baselines read text")
        return text_condition(list(descriptions), self.zoo.family).mean(0)       # (384 + F,)

    def query(self, task: Task, description: str | None = None) -> torch.Tensor:
        """What retrieval and the hypernetworks read of ``task``: ``(d,)`` (see the class docstring)."""
        if self.condition == "code":
            return task.code().float()
        if description is not None:
            return self._text_features([description], task.name)
        if task.name in self.features:
            return self.features[task.name]
        return self._text_features(task.descriptions(), task.name)

    def heldout_params(self, task: str) -> tuple[list[str], dict[str, torch.Tensor]] | None:
        rows = [r for r in self.heldout if r["task"] == task]
        if not rows:
            return None
        return [r["id"] for r in rows], stack_params([self.zoo.load(r["id"]) for r in rows])

    def fit_hypernets(self, steps: int, functional_loss_weight: float) -> dict[str, Any]:
        feats = torch.stack([self.features[r["task"]] for r in self.rows])                 # (Z, d)
        flat = self.codec.flatten(self.canon)                                                # (Z, P)
        groups = [r["task"] for r in self.rows]
        t0 = time.perf_counter()
        self.ridge = RidgeHypernet().fit(feats, flat, groups)
        ridge_s = time.perf_counter() - t0
        tasks = sorted(self.index)
        task_of = {t: i for i, t in enumerate(tasks)}
        data = [get_task(t).data() for t in tasks]
        t0 = time.perf_counter()
        cfg = HypernetTrainConfig(steps=steps, functional_loss_weight=functional_loss_weight, seed=self.seed)
        self.mlp, history = train_mlp_hypernet(self.target, self.codec, feats, flat,
                                               torch.tensor([task_of[g] for g in groups]),
                                               [(d.x_train, d.y_train) for d in data], cfg, progress=self.progress)
        mlp_s = time.perf_counter() - t0
        tail = max(1, len(history) // 20)
        return {"ridge_alpha": self.ridge.alpha_, "ridge_seconds": ridge_s, "mlp_steps": steps,
                "mlp_functional_loss_weight": functional_loss_weight, "mlp_seconds": mlp_s,
                "mlp_loss_first": sum(history[:tail]) / tail, "mlp_loss_last": sum(history[-tail:]) / tail}

    @torch.no_grad()
    def hypernet_params(self, task: Task, description: str | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        code = self.query(task, description)[None]
        linear = self.codec.unflatten(self.ridge.predict(code))
        mlp = self.codec.unflatten(self.mlp(code))
        return linear, mlp


def pick_best(target: Target, task: Task, generated: dict[str, torch.Tensor], per_class: int, seed: int) -> int:
    """Index of the generated sample that scores best in ``target`` (the task's metric, a
    classification one) on ``per_class`` labelled training examples per class."""
    x, y = task.data().split("train")
    idx = few_shot_indices(y, per_class, seed)
    metric = task.metric
    if metric.name == "accuracy":
        scores = target.accuracy(generated, x[idx], y[idx])
    else:
        scores = metric.score(target.forward_batched(generated, x[idx]), y[idx])
    return metric.argbest(scores)  # first of the best on ties: deterministic


@torch.no_grad()
def ensemble_predictions(target: Target, task: Task, params: dict[str, torch.Tensor], split: str = "test",
                         chunk: int = 64) -> torch.Tensor:
    """Classes ``(N,)`` predicted by the ensemble of S weight sets in ``target``: the argmax of their mean softmax."""
    x = task.data().split(split)[0]
    s = next(iter(params.values())).shape[0]
    total = torch.zeros(x.shape[0], task.num_classes)
    for i in range(0, s, chunk):
        part = {k: v[i:i + chunk] for k, v in params.items()}
        total += target.forward_batched(part, x).float().softmax(-1).sum(0)        # (N, C)
    return total.argmax(-1)


def task_rows(z: ZooState, task: Task, seen: bool, generated: dict[str, torch.Tensor] | None,
              noise_scales: Sequence[float], best_of: tuple[str, int] | None = None,
              one_step: dict[str, torch.Tensor] | None = None, description: str | None = None,
              ensemble: bool = False, mean: dict[str, torch.Tensor] | None = None,
              polish: tuple[int, float] | None = None) -> dict[str, Models]:
    """Every row's models for one task; ``best_of`` = (row name, index of the picked sample);
    ``polish`` = (steps, lr): add the rows "generated + K task-loss steps" and "zoo + K task-loss
    steps" (:func:`~weightdiff.evaluate.baselines.polished_params` on the task's training split;
    classification tasks);
    ``mean``: (a generator with a conditional mean) the one adapter μ(c) its samples are drawn around;
    ``description``: the text that retrieval and the hypernetworks read of an unseen task (text suites);
    ``ensemble``: add the row "generated ensemble of N" (one model: the N samples' mean softmax)."""
    rows: dict[str, Models] = {}
    own = z.index.get(task.name, [])
    if seen:
        rows["zoo (original)"] = Models([z.rows[i]["id"] for i in own], select(z.params, own), exclude=list(own))
    else:
        held = z.heldout_params(task.name)
        if held is not None:  # oracle checkpoints trained on this held-out task; the generator never saw them
            rows["zoo (original)"] = Models(held[0], held[1])
    if generated is not None:
        n = next(iter(generated.values())).shape[0]
        rows["generated"] = Models([f"sample_{i:04d}" for i in range(n)], generated)
        if one_step is not None:  # the same model's one-step clean estimate from the same noise
            rows["generated one-step"] = Models([f"one_step_{i:04d}" for i in range(n)], one_step)
        if mean is not None:  # what the diffusion adds to its own conditional mean
            rows[MEAN_ROW] = Models(["conditional_mean"], mean)
        if best_of is not None:  # uses labelled data: its own row, never mixed with zero-shot samples
            name, i = best_of
            rows[name] = Models([f"sample_{i:04d}"], select(generated, [i]))
        if ensemble:  # zero-shot, at N times the inference cost of one adapter
            rows[f"generated ensemble of {n}"] = Models([f"ensemble_{n}"],
                                                        preds=ensemble_predictions(z.target, task, generated)[None])
        if polish is not None:  # trained further on the task's labels: never mixed with the zero-shot rows
            rows[polish_row("generated", polish[0])] = Models([f"sample_{i:04d}+polish" for i in range(n)],
                                                              _polished(z, task, generated, polish))
    if z.kind == "lora":
        rows["base without adapter"] = Models(["zero-adapter"], zero_adapter(z.target))
    nearest = task.name if seen else nearest_task(z.query(task, description), z.features)
    near = z.index[nearest]
    rows["retrieval"] = Models([z.rows[i]["id"] for i in near], select(z.params, near), exclude=list(near))
    linear, mlp = z.hypernet_params(task, description)
    rows["linear hypernetwork"] = Models(["ridge"], linear)
    rows["MLP hypernetwork"] = Models(["mlp"], mlp)
    avg_src = select(z.canon, own) if seen else z.canon
    rows["average"] = Models(["average"], average_params(avg_src))
    runs = run_groups(z, own) if seen and z.kind == "full" else {}
    if any(len(ix) > 1 for ix in runs.values()):  # what averaging a run's own checkpoints gives, no generator
        rows[RUN_AVERAGE_ROW] = Models([f"{run}/average" for run in runs], run_average_params(z, runs))
    rows["gaussian"] = Models([f"gaussian_{i:04d}" for i in range(z.num)], gaussian_params(z.canon, z.num, z.seed))
    src = near[:z.num]
    for scale in noise_scales:
        rows[f"noise-added {scale:g}"] = Models([f"{z.rows[i]['id']}+noise{scale:g}" for i in src],
                                                 noise_added_params(select(z.params, src), scale, z.seed))
    if polish is not None:  # what continued training alone buys: the zoo's own checkpoints, polished alike
        rows[polish_row("zoo", polish[0])] = Models([f"{z.rows[i]['id']}+polish" for i in src],
                                                    _polished(z, task, select(z.params, src), polish))
    if task.metric.name == "accuracy":
        rows["floor"] = Models(["majority-class"], preds=floor_predictions(task))
    else:
        rows["floor"] = Models(["constant-output"], outputs=constant_outputs(task))
    return rows


def run_groups(z: ZooState, indices: Sequence[int]) -> dict[str, list[int]]:
    """``{run id: [zoo indices]}`` of ``indices``, runs in order of first appearance. A run's
    checkpoints share their hidden units' identity, so their mean needs no alignment."""
    runs: dict[str, list[int]] = defaultdict(list)
    for i in indices:
        run = z.rows[i].get("run_id")
        if run is not None:
            runs[run].append(i)
    return dict(runs)


def run_average_params(z: ZooState, runs: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """One network per run of ``runs`` (:func:`run_groups`): the mean of its checkpoints, stacked."""
    return {k: torch.stack([v[ix].mean(0) for ix in runs.values()]) for k, v in z.params.items()}


def polish_row(start: str, steps: int) -> str:
    """The name of the row of ``start`` weights ("generated", "zoo") after ``steps`` task-loss steps."""
    return f"{start} + {steps} task-loss steps"


def _polished(z: ZooState, task: Task, params: dict[str, torch.Tensor], polish: tuple[int, float]
              ) -> dict[str, torch.Tensor]:
    x, y = task.data().split("train")
    return polished_params(z.target, params, x, y, polish[0], polish[1])


class AdaptationState:
    """What the adaptation baselines of an adapter suite share across tasks, fitted once per run.

    * multi-task LoRA: one adapter trained on the union of the training tasks
      (:func:`~weightdiff.evaluate.adaptation.train_multitask_lora`);
    * kNN LoRA averaging: one adapter per training task (its run of the first seed; the runs of one
      seed share their LoRA initialisation) and the tasks' condition vectors (``z.features``);
    * test-time entropy minimisation, when the base has normalisation parameters, on the same
      ``unlabelled_k`` unlabelled test inputs an ``unlabelled`` generator reads
      (:func:`~weightdiff.models.conditioning.unlabelled_inputs`, seed 0).

    Args:
        z: the zoo state (a LoRA zoo).
        base: the frozen base module.
        unlabelled_k: unlabelled inputs per task for test-time adaptation.
        multitask_steps: steps of the multi-task adapter (``None``: the recipe's steps per task
            times the number of training tasks).
        seed, progress: the multi-task adapter's seed, and a bar over its steps.
    """

    def __init__(self, z: ZooState, base: Any, *, unlabelled_k: int, multitask_steps: int | None = None,
                 seed: int = 0, progress: bool = False) -> None:
        self.base, self.unlabelled_k = base, unlabelled_k
        self.multitask = train_multitask_lora(sorted(z.index), base, z.zoo.recipe, steps=multitask_steps, seed=seed,
                                              progress=progress)
        self.knn_tasks = sorted(z.index)
        first = min(int(r.get("seed") or 0) for r in z.rows)
        picked = [next((i for i in z.index[t] if int(z.rows[i].get("seed") or 0) == first), z.index[t][0])
                  for t in self.knn_tasks]
        self.knn_adapters = select(z.params, picked)                                    # (T, *shape)
        self.knn_vectors = torch.stack([z.features[t] for t in self.knn_tasks])        # (T, d)
        self.knn_k = min(KNN_K, len(self.knn_tasks))
        self.has_norms = bool(norm_parameters(base))
        self.tent_seconds: list[float] = []

    def record(self) -> dict[str, Any]:
        """The settings and costs of the adaptation rows, for ``results.json``."""
        mt = self.multitask
        return {"multitask": {"steps": mt.steps, "batch_size": mt.batch_size, "tasks": mt.num_tasks,
                              "seconds": mt.seconds, "loss_first": mt.loss_first, "loss_last": mt.loss_last},
                "knn": {"k": self.knn_k, "merge": "delta-svd", "weighting": "inverse", "tasks": len(self.knn_tasks)},
                "tent": ({"steps": TENT_STEPS, "lr": TENT_LR, "unlabelled_examples": self.unlabelled_k,
                          "seconds_per_task": sum(self.tent_seconds) / len(self.tent_seconds)
                          if self.tent_seconds else None} if self.has_norms else None)}

    def rows(self, z: ZooState, task: Task, description: str | None = None) -> dict[str, Models]:
        """The adaptation rows of one task: multi-task LoRA, kNN LoRA average and (if the base has
        normalisation parameters) test-time adaptation."""
        out = {"multi-task LoRA": Models(["multi-task"], self.multitask.params)}
        knn = knn_lora_average(z.query(task, description), self.knn_vectors, self.knn_adapters, k=self.knn_k)
        out[f"kNN LoRA average (k={self.knn_k})"] = Models([f"knn-{self.knn_k}"], knn.params)
        if self.has_norms:
            x_test = task.data().x_test
            result = tent(self.base, unlabelled_inputs(task, self.unlabelled_k, seed=0), x_test)
            self.tent_seconds.append(result.seconds)
            if task.metric.name == "accuracy":
                out["test-time adaptation (TENT)"] = Models(["tent"], preds=result.predictions[None])
            else:
                out["test-time adaptation (TENT)"] = Models(["tent"], outputs=result.logits[None])
        return out
