"""The honest benchmark: a generator beside every baseline, on the same tasks, in one run.

:func:`run_benchmark` evaluates, for each task, the rows of the protocol (see ``DESIGN.md``):
zoo checkpoints, generated samples, base without adapter (LoRA), retrieval, linear and MLP
hypernetworks, average, gaussian, noise-added at several scales, few-shot SGD and the floor;
with the novelty of every model (wrong-set IoU, nearest-zoo distance). Seen tasks (training
tasks of the zoo) and unseen tasks (the zoo's held-out tasks, also split by near / far / combo)
are reported apart. Full-network suites have a single task, which the generator saw: it is the
"seen" section, and there is no unseen section.

Every row is scored with the tasks' own metric (:attr:`weightdiff.tasks.Task.metric`, as
:func:`~weightdiff.evaluate.weights.score_params` computes it; top-1 accuracy unless the tasks name
another), named in ``results.json`` (``metric``); "best" is the lowest score when lower is better,
and all tasks of a run must share one metric. Wrong-set IoU and few-shot SGD compare and train
class predictions in accuracy: for any other metric they are not applicable (``null`` / ``–``);
the floor is then one constant output fitted to the training targets, and the MLP
hypernetwork's functional (cross-entropy) loss is dropped for targets that are not classes.

Outputs under ``out``: ``results.json``, ``results.md``, ``predictions/*.npz`` (every model's
test predictions; for a metric other than accuracy ``scores/*.npz``, every model's score) and the
plots ``accuracy_distributions.png`` (the metric's distributions) and, for accuracy,
``accuracy_vs_iou.png`` and ``accuracy_vs_distance.png`` (novelty as wrong-set IoU and as
nearest-zoo distance).
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from weightdiff.errors import BenchmarkError, ModelDirError
from weightdiff.evaluate.adaptation import generate_then_refine
from weightdiff.evaluate.fewshot import DEFAULT_KS, few_shot_sgd, recipe_value
from weightdiff.evaluate.baselines import NOISE_SCALES, unstack
from weightdiff.evaluate.novelty import wrong_set_iou
from weightdiff.evaluate.report import (
    aggregate, plot_accuracy_distributions, plot_accuracy_vs_distance, plot_accuracy_vs_iou, save_predictions,
    save_scores, task_stats, write_results,
)
from weightdiff.evaluate.rows import AdaptationState, Models, ZooState, pick_best, suite_metric, task_rows
from weightdiff.evaluate.weights import evaluate_params, score_params
from weightdiff.tasks import Metric, Task, get_task
from weightdiff.tasks.suites import load_suite
from weightdiff.models.generator import load_generator, mean_tokens
from weightdiff.models.schedule import ScheduleConfig
from weightdiff.sampling import SamplerSettings, check_settings_fit, generate_tokens, make_condition, num_examples
from weightdiff.zoo import Zoo

log = logging.getLogger(__name__)

TENT_EXAMPLES = 32
"""Unlabelled test inputs per task of test-time adaptation when no ``unlabelled`` generator is in the run."""
REFINE_LR_FACTOR = 0.1
"""Generate-then-refine's learning rate as a fraction of the recipe's: the recipe's rate, tuned to train
from the base, undoes much of a good start on few examples (measurements in
:func:`~weightdiff.evaluate.adaptation.generate_then_refine`)."""

def heldout_description(task: Task, descriptions: Mapping[str, Any] | None = None) -> str:
    """A paraphrase of the task phrased unlike any training template (for ``--from-description``).

    Args:
        task: the task.
        descriptions: a generator's ``descriptions.json`` record
            (:data:`~weightdiff.models.generator.DESCRIPTIONS_FILE`); the held-out description it
            gives the task (an imported zoo's own) is used, else the family's.
    """
    recorded = ((descriptions or {}).get("tasks", {}).get(task.name) or {}).get("heldout")
    if recorded is not None:
        return recorded
    try:
        return task.heldout_description()
    except NotImplementedError as exc:
        raise BenchmarkError(str(exc)) from None


def model_evaluations(sampler: str, steps: int, guidance: float = 1.0) -> int:
    """Denoiser evaluations per sample: one per step of ``ddim`` / ``ddpm`` / ``dpm`` / ``euler`` (one for ``x0``),
    twice with guidance."""
    per_step = 1 if guidance == 1.0 else 2
    return per_step * (1 if sampler == "x0" else steps)


def _spread(items: Sequence[Any], k: int | None) -> list[Any]:
    """``k`` items evenly spread over ``items`` (all when ``k`` is None or large enough)."""
    items = list(items)
    if k is None or k >= len(items):
        return items
    if k <= 1:
        return items[:max(k, 0)]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def hypernet_functional_weight(trained: dict[str, Any]) -> float:
    """The MLP hypernetwork's task-loss weight that matches a generator's training options
    (``model_index.json``'s ``training``): the largest task-loss weight of any of its parts — the
    DiT's, a latent generator's autoencoder's, a conditional mean's (μ is a hypernetwork) — and
    1.0 when none is recorded; a trained weight of 0 stays 0."""
    weights = [float(trained.get("functional_loss_weight", 1.0))]
    if trained.get("latent_tokens"):
        weights.append(float(trained.get("autoencoder_functional_weight") or 0.0))
    if trained.get("mean_head") and trained.get("mean_functional_weight") is not None:
        weights.append(float(trained["mean_functional_weight"]))
    return max(weights)


def run_benchmark(suite: str | Path, model: str | Path | Sequence[str | Path] | None, zoo: str | Path,
                  out: str | Path, *, num: int = 32,
                  steps: int | None = None, sampler: str | None = None, guidance: float = 1.0,
                  latent_noise: float | None = None, from_description: bool = False,
                  seed: int = 0, max_seen_tasks: int | None = 8, max_unseen_tasks: int | None = None,
                  sgd_tasks: int | None = None, sgd_ks: Sequence[int | str] = DEFAULT_KS,
                  sgd_seeds: Sequence[int] = (0,),
                  hypernet_steps: int | None = None, functional_loss_weight: float | None = None,
                  noise_scales: Sequence[float] = NOISE_SCALES, batch_size: int = 64,
                  select_per_class: int | None = 10, ensemble: bool = True, adaptation: bool = True,
                  multitask_steps: int | None = None,
                  refine_lr_factor: float = REFINE_LR_FACTOR, polish_steps: int = 0, polish_lr: float = 1e-3,
                  progress: bool = True) -> dict[str, Any]:
    """Run the whole protocol on one suite and write the results under ``out``.

    Args:
        suite: a shipped suite (``"digits-cnn"``, ``"mnist1d-cnn"``, ``"adapt-lora"``) or the path of a
            suite YAML file (:func:`weightdiff.tasks.suites.load_suite`).
        model: exported generator directory; ``None`` runs the baselines alone (no "generated" row).
            Several directories (generators of one zoo with different conditions, e.g. text and
            unlabelled examples): the first is the row "generated" (with its one-step, best-of-N
            and few-shot rows); each other adds a row "generated (<its condition>)", sampled with
            its own validated sampler, in the same run.
        zoo: the zoo directory (its training split is what the generator saw).
        out: output directory.
        num: samples per task (generated, gaussian) and the cap on noise-added sources per task.
        steps, sampler, guidance, latent_noise, seed: generator sampling settings; ``None`` steps,
            sampler and latent noise are the generator's own (``gen.config["sampling"]``).
        from_description: condition the generator on :func:`heldout_description` (free text; an
            imported zoo's held-out descriptions, as the generator recorded them).
        max_seen_tasks, max_unseen_tasks: evenly spread subsets of the tasks (``None``: all).
        sgd_tasks: how many unseen tasks (seen for full suites), spread over the held-out kinds,
            get few-shot SGD (``None``: all; 0 skips it).
        sgd_ks, sgd_seeds: examples per class and seeds of few-shot SGD.
        hypernet_steps, functional_loss_weight: MLP hypernetwork training. By default both follow
            the generator: as many steps as it was trained for (at least 2000) and its functional
            loss weight (a latent generator: the larger of it and its autoencoder's; one with a
            conditional mean: the larger of it and μ's ``mean_functional_weight``), so the
            baseline gets the same losses and the same step budget (1.0 and 2000 without a generator).
        noise_scales: noise-added scales (fractions of each tensor's std).
        select_per_class: adds the row "generated best-of-N": the one sample (of N) that scores
            best on this many labelled training examples per class — compare it with few-shot SGD
            at the same k, not with zero-shot rows (``None`` or 0: no such row; none either for
            targets that are not classes).
        ensemble: add the row "generated ensemble of N": the N samples as one model, predicting the
            argmax of their mean softmax (zero-shot, at N times one adapter's inference cost;
            accuracy suites).
        adaptation: (adapter suites) add the rows "multi-task LoRA", "kNN LoRA average" and, when
            the base has normalisation parameters, "test-time adaptation (TENT)" on the unlabelled
            test inputs an ``unlabelled`` generator reads (its K; 32 without one)
            (:class:`~weightdiff.evaluate.rows.AdaptationState`); and, beside few-shot SGD,
            generate-then-refine: the same fits started from a generated adapter (the best-of-N
            pick, else the first sample) at ``refine_lr_factor`` times the recipe's learning rate.
        multitask_steps: steps of the multi-task adapter (``None``: the recipe's steps per task
            times the training tasks).
        polish_steps, polish_lr: (whole-network classification suites; 0: off) add the rows
            "generated + K task-loss steps" and "zoo + K task-loss steps": the samples, and the
            task's zoo checkpoints the noise-added rows start from, after K full-batch Adam steps
            of the cross-entropy on the task's training split at ``polish_lr``
            (:func:`~weightdiff.evaluate.baselines.polished_params`). They show what continued
            training alone buys in accuracy and in distance from the zoo, beside what the
            generator's samples buy.

    Returns:
        The results dict written to ``results.json`` (keys listed in ``report.RESULT_KEYS``, and
        ``metric``: ``{name, higher_is_better}``).

    Raises:
        BenchmarkError: the suite does not fit the zoo, or the benchmarked tasks have different
            metrics (:func:`suite_metric`).
    """
    spec = load_suite(suite)
    suite, kind, family = spec.name, spec.kind, spec.family
    zoo_obj = Zoo.open(zoo)
    if zoo_obj.kind != kind or zoo_obj.family != family:
        raise BenchmarkError(f"suite '{suite}' needs a {kind} zoo of family '{family}', but {zoo} is a "
                             f"{zoo_obj.kind} zoo of family '{zoo_obj.family}'")
    if polish_steps < 0:
        raise BenchmarkError(f"polish_steps must be >= 0, got {polish_steps}")
    if polish_steps and kind != "full":
        raise BenchmarkError(f"polish_steps is for whole-network suites, and suite '{suite}' is a {kind} suite "
                             "(adapter suites refine from few labels: sgd_tasks)")
    if polish_steps and not polish_lr > 0:
        raise BenchmarkError(f"polish_lr must be > 0, got {polish_lr}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    paths = [] if model is None else [model] if isinstance(model, (str, Path)) else list(model)
    gens = [load_generator(path) for path in paths]
    for path, g in zip(paths, gens):
        if g.kind != kind or g.config["zoo"].get("family") != family:
            raise ModelDirError(f"generator {path} was trained on a {g.kind} zoo of family "
                                f"'{g.config['zoo'].get('family')}', but suite '{suite}' is {kind}/{family}")
    gen = gens[0] if gens else None
    model = paths[0] if paths else None
    extras = _extra_generators(paths[1:], gens[1:], guidance, seed)  # checked before the long baselines
    trained = gen.config.get("training", {}) if gen is not None else {}
    if functional_loss_weight is None:
        functional_loss_weight = hypernet_functional_weight(trained)
    if gen is not None:
        validated = gen.config.get("sampling", {})
        steps = validated.get("steps", SamplerSettings.steps) if steps is None else steps
        sampler = validated.get("sampler", SamplerSettings.sampler) if sampler is None else sampler
        latent_noise = validated.get("latent_noise", 0.0) if latent_noise is None else latent_noise
        check_settings_fit(gen, SamplerSettings(sampler=sampler, latent_noise=latent_noise))
        # before the long baselines: ddim / ddpm / dpm sample ddpm generators, euler flow-matching ones
        ScheduleConfig(**gen.config.get("schedule", {})).check_sampler(sampler)
    if hypernet_steps is None:
        hypernet_steps = max(2000, int(gen.config.get("global_step", 0)) if gen is not None else 0)
    z = ZooState(zoo_obj, num=num, seed=seed, progress=progress, condition=spec.baseline_condition)
    seen_tasks = _spread(sorted(z.index, key=lambda t: (z.codes[t].tolist(), t)), max_seen_tasks)
    kinds: dict[str, str] = {}
    for r in z.heldout:
        kinds.setdefault(r["task"], r.get("heldout_kind") or "heldout")
    unseen_tasks = _spread(sorted(kinds), max_unseen_tasks) if kind == "lora" else []
    sections = [("seen", t) for t in seen_tasks] + [("unseen", t) for t in unseen_tasks]
    metric = suite_metric([t for _, t in sections])  # before the long fits: a mixed suite fails at once
    accuracy = metric.name == "accuracy"
    if polish_steps and not metric.classification:
        raise BenchmarkError(f"polish_steps: the task-loss steps are a cross-entropy over classes, and suite "
                             f"'{suite}' scores {metric.name}")
    if not metric.classification:
        functional_loss_weight = 0.0  # the MLP hypernetwork's functional loss is a cross-entropy over classes
    log.info("fitting hypernetworks (%d steps)", hypernet_steps)
    hyper = z.fit_hypernets(hypernet_steps, functional_loss_weight)
    sgd_list = _by_kind_round_robin(unseen_tasks, kinds)[:sgd_tasks] if unseen_tasks else seen_tasks[:sgd_tasks]
    adapt = None
    if adaptation and kind == "lora" and accuracy:  # its adapters train on class labels, as few-shot SGD's
        unlabelled = [g for g in gens if g.config["model"]["condition"] == "unlabelled"]
        log.info("fitting the multi-task adapter")
        adapt = AdaptationState(z, zoo_obj.base_module(), unlabelled_k=num_examples(unlabelled[0]) if unlabelled
                                else TENT_EXAMPLES, multitask_steps=multitask_steps, seed=seed, progress=progress)
    refine_start: dict[str, dict[str, torch.Tensor]] = {}

    gen_seconds, gen_calls, gen_total, nonfinite = 0.0, 0, 0, 0
    one_step_settings = None
    recorded = getattr(gen, "descriptions", None)  # None: no generator, or one exported without them
    if gen is not None:
        settings = SamplerSettings(steps=steps, sampler=sampler, guidance=guidance, seed=seed,
                                   latent_noise=latent_noise)
        one_step_settings = replace(settings, sampler="x0") if sampler != "x0" else None
        warm = make_condition(gen, task=sections[0][1]) if not from_description else \
            make_condition(gen, description=heldout_description(get_task(sections[0][1]), recorded))
        generate_tokens(gen, warm, 1, settings, use_cache=False, batch_size=batch_size, progress=False)  # warm-up

    per_task: dict[str, dict[str, dict[str, Any]]] = {"seen": {}, "unseen": {}}
    generated_mean: dict[str, float] = {}
    dist_accs: dict[str, dict[str, list[float]]] = {"seen": defaultdict(list), "unseen": defaultdict(list)}
    points: dict[str, dict[str, tuple[list[float], list[float]]]] = {"seen": {}, "unseen": {}}
    # per-model (accuracies, nearest-zoo distances / zoo spacing) of each row, for accuracy_vs_distance.png
    distance_points: dict[str, dict[str, tuple[list[float], list[float]]]] = {"seen": {}, "unseen": {}}
    descriptions: dict[str, str] = {}
    one_step_seconds, generated_runs = 0.0, []
    for section, name in tqdm(sections, desc="benchmark tasks", unit="task", disable=_bar_disabled(progress)):
        task = get_task(name)
        generated = one_step = mean = None
        if gen is not None:
            if from_description:
                descriptions[name] = heldout_description(task, recorded)
                cond = make_condition(gen, description=descriptions[name])
            else:
                cond = make_condition(gen, task=name)
            t0 = time.perf_counter()
            tokens, _ = generate_tokens(gen, cond, num, settings, use_cache=False, batch_size=batch_size,
                                        progress=False)
            generated = {k: v.detach().float().cpu() for k, v in gen.tokenizer.decode_float(tokens).items()}
            gen_seconds += time.perf_counter() - t0
            finite = torch.stack([torch.isfinite(v.flatten(1)).all(1) for v in generated.values()]).all(0)
            nonfinite += int((~finite).sum())
            gen_calls += 1
            gen_total += num
            if one_step_settings is not None:
                t0 = time.perf_counter()
                tokens, _ = generate_tokens(gen, cond, num, one_step_settings, use_cache=False,
                                            batch_size=batch_size, progress=False)
                one_step = {k: v.detach().float().cpu() for k, v in gen.tokenizer.decode_float(tokens).items()}
                one_step_seconds += time.perf_counter() - t0
            if getattr(getattr(gen, "generator", None), "mean_net", None) is not None:
                mean = {k: v.detach().float().cpu()
                        for k, v in gen.tokenizer.decode_float(mean_tokens(gen.generator, cond.raw)).items()}
        _, y_test = task.data().split("test")
        if accuracy:
            _, zoo_preds = evaluate_params(z.target, task, z.params)              # (Z, N)
        stats = per_task[section].setdefault(name, {})
        best_of = None
        if generated is not None and select_per_class and metric.classification:
            best_of = (f"generated best-of-{num} ({select_per_class}/class labelled)",
                       pick_best(z.target, task, generated, select_per_class, seed))
        rows = task_rows(z, task, section == "seen", generated, noise_scales, best_of, one_step,
                         description=descriptions.get(name), ensemble=ensemble and accuracy, mean=mean,
                         polish=(polish_steps, polish_lr) if polish_steps else None)
        if adapt is not None:
            rows = _insert_before(rows, "average", adapt.rows(z, task, descriptions.get(name)))
        if adapt is not None and generated is not None and name in sgd_list:
            refine_start[name] = unstack(generated, best_of[1] if best_of is not None else 0)
        if extras:
            rows = _with_extra_rows(rows, extras, task, from_description, recorded, num, batch_size)
        for row, m in rows.items():
            distance = None
            if m.params is not None:
                distance, nearest_index = z.space.nearest(m.params, m.exclude)
                if row == "generated" and kind == "full":
                    generated_runs += [z.rows[int(i)]["run_id"] for i in nearest_index if int(i) >= 0]
            if accuracy:
                if m.params is not None:
                    scores, preds = evaluate_params(z.target, task, m.params)
                else:
                    preds = m.preds
                    scores = (preds == y_test[None]).float().mean(1)
                iou = wrong_set_iou(preds, y_test, zoo_preds, m.exclude)
                pa, pi = points[section].setdefault(row, ([], []))
                pa += scores.tolist()
                pi += iou.tolist()
                if distance is not None and z.spacing and math.isfinite(z.spacing):
                    da, dd = distance_points[section].setdefault(row, ([], []))
                    da += scores.tolist()
                    dd += (distance / z.spacing).tolist()
                save_predictions(out, section, name, row, m.ids, preds, y_test)
            else:
                scores = (score_params(z.target, task, m.params) if m.params is not None
                          else metric.score(m.outputs, y_test))
                iou = None  # wrong-set IoU compares wrong class predictions: not applicable
                save_scores(out, section, name, row, m.ids, scores, metric.name)
            stats[row] = task_stats(scores, iou, distance, metric.higher_is_better)
            dist_accs[section][row] += scores.tolist()
        if "generated" in stats:
            generated_mean[name] = stats["generated"]["mean"]

    results: dict[str, Any] = {
        "suite": suite,
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better},
        "seen": aggregate(per_task["seen"], seen_tasks, z.spacing),
        "unseen": aggregate(per_task["unseen"], unseen_tasks, z.spacing) if unseen_tasks else {},
        "unseen_by_kind": {k: aggregate(per_task["unseen"], [t for t in unseen_tasks if kinds[t] == k], z.spacing)
                           for k in sorted({kinds[t] for t in unseen_tasks})},
        "latency_ms_per_sample": 1000 * gen_seconds / gen_total if gen_total else None,
        "latency_ms_per_batch": 1000 * gen_seconds / gen_calls if gen_calls else None,
        "generation_seconds": gen_seconds if gen is not None else None,
        "latency_ms_per_sample_one_step": (1000 * one_step_seconds / gen_total
                                           if gen_total and one_step_settings is not None else None),
        "sampler": ({"sampler": sampler, "steps": steps, "model_evaluations": model_evaluations(sampler, steps, guidance),
                     "latent_noise": latent_noise}
                    if gen is not None else None),
        "generated_nonfinite_samples": nonfinite if gen is not None else None,
        "other_generators": {e.row: e.record() for e in extras},
    }

    if kind == "full":
        results["runs_in_zoo"] = len(set(z.run_ids))
        results["within_run_spacing"] = z.within_run_spacing()
        results["hidden_units_aligned"] = not z.one_parent  # one parent: its units already correspond
        results["basins_covered"] = len(set(generated_runs)) if gen is not None else None

    sgd: dict[str, dict[str, float]] = {}
    sgd_per_task: dict[str, dict[str, dict[str, float]]] = {}
    refine_per_task: dict[str, dict[str, dict[str, float]]] = {}
    refine_lr = float(recipe_value(zoo_obj.recipe, "lr")) * refine_lr_factor if refine_start else None
    if accuracy and sgd_list and (sgd_tasks is None or sgd_tasks > 0):
        base = zoo_obj.base_module() if kind == "lora" else None
        fits = len(sgd_list) * len(sgd_ks) * len(sgd_seeds) * (2 if refine_start else 1)  # every (task, k, seed) fit
        with tqdm(total=fits, desc="few-shot SGD", unit="fit", disable=_bar_disabled(progress)) as bar:
            for name in sgd_list:
                bar.set_postfix_str(name)
                sgd_per_task[name] = few_shot_sgd(get_task(name), sgd_ks, kind=kind, recipe=zoo_obj.recipe,
                                                  base_module=base, seeds=sgd_seeds,
                                                  on_fit=lambda k, seed: bar.update())
                if name in refine_start:
                    refine_per_task[name] = generate_then_refine(get_task(name), refine_start[name], sgd_ks,
                                                                 recipe=zoo_obj.recipe, base_module=base,
                                                                 seeds=sgd_seeds, lr=refine_lr,
                                                                 on_fit=lambda k, seed: bar.update())
        sgd = _mean_over_tasks(sgd_per_task)
    refine = _mean_over_tasks(refine_per_task) if len(refine_per_task) == len(sgd_list) else {}
    gen_ref = (sum(generated_mean[t] for t in sgd_list) / len(sgd_list)
               if sgd and all(t in generated_mean for t in sgd_list) else None)
    match: int | str | None = next((k for k in sgd if gen_ref is not None and sgd[k]["accuracy"] >= gen_ref), None)
    if match is not None and match != "all":
        match = int(match)
    results.update({  # few-shot SGD trains and scores class predictions: null for another metric
        "sgd": sgd if accuracy else None,
        "sgd_examples_to_match": match,
        "sgd_per_task": sgd_per_task if accuracy else None,
        "refine": refine or None,
        "refine_per_task": refine_per_task or None,
        "adaptation": adapt.record() if adapt is not None else None,
        "generated_mean_on_sgd_tasks": gen_ref,
        "settings": {
            "model": str(model) if model is not None else None, "zoo": str(zoo), "num": num, "steps": steps,
            "sampler": sampler, "guidance": guidance, "latent_noise": latent_noise, "seed": seed,
            "from_description": from_description,
            "select_per_class": select_per_class, "hypernet_functional_loss_weight": functional_loss_weight,
            "refine_lr": refine_lr,
            "condition": gen.config["model"]["condition"] if gen is not None else None,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "seen_tasks": seen_tasks, "unseen_tasks": unseen_tasks,
            "unseen_tasks_by_kind": {k: [t for t in unseen_tasks if kinds[t] == k]
                                     for k in sorted({kinds[t] for t in unseen_tasks})},
            "sgd_tasks": sgd_list if sgd else [], "sgd_ks": [str(k) for k in sgd_ks], "sgd_seeds": list(sgd_seeds),
            "noise_scales": list(noise_scales), "polish_steps": polish_steps,
            "polish_lr": polish_lr if polish_steps else None, "baseline_condition": spec.baseline_condition,
            "retrieval_metric": "L2 distance between " + ("description embeddings" if spec.baseline_condition == "text"
                                                           else "task codes"),
            "descriptions": descriptions,
        },
        "zoo": {"train_checkpoints": len(z.rows), "train_tasks": len(z.index), "heldout_checkpoints": len(z.heldout),
                "nn_spacing": z.spacing},
        "hypernetworks": hyper,
        "notes": _notes(kind, gen, from_description, num, metric, spec.baseline_condition,
                        adapt.record() if adapt is not None else None, aligned=not z.one_parent),
        "per_task": per_task,
        "seconds": time.perf_counter() - t_start,
    })
    write_results(out, results)
    plot_accuracy_distributions({s: dict(v) for s, v in dist_accs.items()}, out / "accuracy_distributions.png",
                                results=results)
    if accuracy:  # their y axis is accuracy; x: the wrong-set IoU, the nearest-zoo distance
        plot_accuracy_vs_iou(results, out / "accuracy_vs_iou.png", points)
        plot_accuracy_vs_distance(results, out / "accuracy_vs_distance.png", distance_points)
    log.info("benchmark written to %s (%.0f s)", out, results["seconds"])
    return results


def _mean_over_tasks(per_task: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """``{k: {accuracy, seconds}}`` averaged over the tasks of ``{task: {k: {accuracy, seconds}}}``."""
    per_k: dict[str, list[Mapping[str, float]]] = defaultdict(list)
    for by_k in per_task.values():
        for k, v in by_k.items():
            per_k[k].append(v)
    return {k: {"accuracy": sum(v["accuracy"] for v in vs) / len(vs),
                "seconds": sum(v["seconds"] for v in vs) / len(vs)} for k, vs in per_k.items()}


def _insert_before(rows: dict[str, Models], key: str, new: Mapping[str, Models]) -> dict[str, Models]:
    """``rows`` with ``new`` placed just before ``key`` (at the end if ``key`` is absent)."""
    keys = list(rows)
    at = keys.index(key) if key in keys else len(keys)
    return {**{k: rows[k] for k in keys[:at]}, **new, **{k: rows[k] for k in keys[at:]}}


@dataclass
class _ExtraGenerator:
    """A generator beside the first one of a run: its row name, model, sampler settings and timing."""

    row: str
    path: str
    gen: Any
    settings: SamplerSettings
    condition: str
    seconds: float = 0.0
    samples: int = 0

    def record(self) -> dict[str, Any]:
        """Its entry in ``results.json`` (``other_generators``)."""
        s = self.settings
        return {"model": self.path, "condition": self.condition, "sampler": s.sampler,
                "steps": s.steps, "model_evaluations": model_evaluations(s.sampler, s.steps, s.guidance),
                "latency_ms_per_sample": 1000 * self.seconds / self.samples if self.samples else None}


def _extra_generators(paths: Sequence[str | Path], gens: Sequence[Any], guidance: float, seed: int
                      ) -> list[_ExtraGenerator]:
    """The run's other generators, each named by its condition (``generated (unlabelled)``), sampled with
    the sampler it was validated with."""
    extras: list[_ExtraGenerator] = []
    for path, g in zip(paths, gens):
        validated = g.config.get("sampling", {})
        settings = SamplerSettings(steps=validated.get("steps", SamplerSettings.steps),
                                   sampler=validated.get("sampler", SamplerSettings.sampler), guidance=guidance,
                                   seed=seed, latent_noise=validated.get("latent_noise", 0.0))
        ScheduleConfig(**g.config.get("schedule", {})).check_sampler(settings.sampler)
        condition = g.config["model"]["condition"]
        row = f"generated ({condition})"
        if any(e.row == row for e in extras):
            row = f"generated ({condition}, {Path(path).name})"
        extras.append(_ExtraGenerator(row, str(path), g, settings, condition))
    return extras


def _with_extra_rows(rows: dict[str, Models], extras: Sequence[_ExtraGenerator], task: Task, from_description: bool,
                     recorded: Any, num: int, batch_size: int) -> dict[str, Models]:
    """``rows`` with each other generator's samples for ``task`` placed after the first generator's rows
    (a text generator reads the held-out description when the run does, the others their own condition)."""
    extra_rows: dict[str, Models] = {}
    for e in extras:
        text = from_description and e.condition == "text"
        cond = (make_condition(e.gen, description=heldout_description(task, getattr(e.gen, "descriptions", recorded)))
                if text else make_condition(e.gen, task=task.name))
        t0 = time.perf_counter()
        tokens, _ = generate_tokens(e.gen, cond, num, e.settings, use_cache=False, batch_size=batch_size,
                                    progress=False)
        params = {k: v.detach().float().cpu() for k, v in e.gen.tokenizer.decode_float(tokens).items()}
        e.seconds += time.perf_counter() - t0
        e.samples += num
        extra_rows[e.row] = Models([f"{e.condition}_{i:04d}" for i in range(num)], params)
    keys = list(rows)
    first = [i for i, k in enumerate(keys) if k.startswith("generated")]
    at = first[-1] + 1 if first else int(bool(keys) and keys[0] == "zoo (original)")
    return {**{k: rows[k] for k in keys[:at]}, **extra_rows, **{k: rows[k] for k in keys[at:]}}


def _bar_disabled(progress: bool) -> bool | None:
    """tqdm's ``disable``: off when the caller says so; ``None`` lets tqdm show a bar only on a terminal."""
    return None if progress else True


def _spread_order(items: Sequence[Any]) -> list[Any]:
    """``items`` reordered so that every prefix is spread evenly over the original order."""
    out: list[Any] = []
    for k in range(1, len(items) + 1):
        out += [x for x in _spread(items, k) if x not in out]
    return out


def _by_kind_round_robin(tasks: Sequence[str], kinds: dict[str, str]) -> list[str]:
    """Tasks interleaved across held-out kinds (combo, far, near, combo, ...): every prefix covers each kind
    and spreads over each kind's tasks."""
    groups = defaultdict(list)
    for t in tasks:
        groups[kinds[t]].append(t)
    order = [_spread_order(groups[k]) for k in sorted(groups)]
    out = []
    for i in range(max((len(g) for g in order), default=0)):
        out += [g[i] for g in order if i < len(g)]
    return out


def _notes(kind: str, gen: Any, from_description: bool, num: int, metric: Metric,
           baseline_condition: str = "code", adaptation: Mapping[str, Any] | None = None,
           aligned: bool = True) -> list[str]:
    notes = []
    if baseline_condition == "text":
        read = "the sentence embeddings of the tasks' descriptions (the held-out description when the run uses one)"
        read_one = "a task's description embedding"
    else:
        read, read_one = "task codes", "the task code"
    if kind == "full":
        notes.append("Full-network suite: the zoo has a single task, which the generator was trained on; it is "
                     "reported as the seen task and there are no unseen tasks. With one task the condition is "
                     "constant, so the linear hypernetwork equals the average checkpoint and the MLP hypernetwork "
                     "is one network fitted to the zoo (weight MSE) and to the task (cross-entropy). Run average: "
                     "one network per training run, the mean of that run's checkpoints (no alignment needed: they "
                     "share their hidden units); where a generator's samples sit at the run averages' accuracy and "
                     "distance, it reproduces what the zoo's runs already average to.")
    else:
        notes.append("Unseen tasks are the zoo's held-out tasks (never in the generator's training data); their "
                     "'zoo (original)' row is the held-out oracle adapters trained directly on them.")
    if gen is None:
        notes.append("No generator given: baselines only.")
    else:
        cond = gen.config["model"]["condition"]
        how = "a held-out free-text paraphrase of each task" if from_description else f"the task ({cond} condition)"
        notes.append(f"Generated: {num} samples per task, conditioned on {how}.")
    mlp_loss = ("the weight MSE plus the functional (cross-entropy) loss" if metric.classification else
                "the weight MSE alone (its functional loss is a cross-entropy over classes, and these targets are "
                "not classes)")
    notes += [
        f"Retrieval: checkpoints of the training task nearest by L2 distance between {read} (on seen tasks, the "
        "task's own checkpoints).",
        f"Linear (ridge, alpha by leave-tasks-out CV) and MLP hypernetworks map {read_one} to canonicalised "
        f"weights; the MLP is trained with {mlp_loss}.",
        ("Average and gaussian use canonicalised checkpoints (LoRA SVD gauge / hidden units aligned to a reference); "
         if aligned else "Average and gaussian use the checkpoints as they are (one parent: their hidden units "
         "correspond); ") + "average is per task on seen tasks and over all training checkpoints on unseen tasks.",
        f"Noise-added: up to {num} checkpoints of the own (seen) or nearest (unseen) training task, plus Gaussian "
        "noise at the given fraction of each tensor's std.",
    ]
    if adaptation is not None:
        mt, knn, tta = adaptation["multitask"], adaptation["knn"], adaptation["tent"]
        notes.append(f"Multi-task LoRA: one adapter trained with the zoo's adapter recipe on the union of the "
                     f"{mt['tasks']} training tasks ({mt['steps']} steps of {mt['batch_size']} examples).")
        notes.append(f"kNN LoRA average: the {knn['k']} training tasks nearest by {read}, one adapter each (the first "
                     "seed's), weighted by inverse distance; their merged updates B·A averaged and re-factored to the "
                     "adapter's rank by SVD.")
        if tta is not None:
            notes.append(f"Test-time adaptation (TENT): the base's normalisation affine parameters trained for "
                         f"{tta['steps']} Adam steps (lr {tta['lr']:g}) to minimise the prediction entropy on "
                         f"{tta['unlabelled_examples']} unlabelled test inputs of the task (the batch an unlabelled "
                         "generator reads), then run on the test split; no adapter.")
    if metric.name != "accuracy":
        way = "higher" if metric.higher_is_better else "lower"
        notes.append(f"Metric: {metric.name} ({metric.axis}), the tasks' own; {way} is better, and 'best' is the "
                     f"{'highest' if metric.higher_is_better else 'lowest'} score. Wrong-set IoU and few-shot SGD "
                     "compare and train class predictions in accuracy: not applicable (–).")
        notes.append("Floor: one constant output for every input, fitted to the training targets: "
                     + ("the log of their class frequencies, add-one smoothed." if metric.classification
                        else "their mean (the constant of least squared error)."))
        return notes
    notes.append("Few-shot SGD: " + ("an adapter trained on the frozen base with the zoo's adapter recipe"
                                     if kind == "lora" else "a network trained from random initialisation with the "
                                     "zoo's optimiser settings and the step budget of one zoo run")
                 + ", on k labelled training examples per class; seconds are training wall time per model.")
    notes.append("Floor: the majority class of the training labels.")
    return notes
