"""Benchmark outputs: ``results.json``, ``results.md``, per-model predictions and PNG plots.

Numbers are aggregated in two steps: per task over the models of a row (best / mean / median
score, mean wrong-set IoU, mean nearest-zoo distance), then the per-task numbers are averaged
over the tasks of a section (seen / unseen / a held-out kind). ``distance_ratio`` divides the
distance by the zoo's median nearest-neighbour spacing. Missing values (e.g. the distance of the
floor predictor, which has no weights) are ``null`` in JSON and ``–`` in Markdown.

Scores are the suite's metric (``results["metric"]``: top-1 accuracy unless its tasks name
another, :mod:`weightdiff.tasks.metrics`); tables and axes name it with its unit, and "best" is
the lowest score when lower is better. A results dict without ``metric`` is one of accuracy.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from weightdiff.io import atomic_path, write_json
from weightdiff.tasks.metrics import Metric, get_metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure

RESULT_KEYS = ("suite", "seen", "unseen", "unseen_by_kind", "latency_ms_per_sample", "generation_seconds", "sgd",
               "sgd_examples_to_match", "settings")


def _nanmean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def result_metric(results: Mapping[str, Any]) -> Metric:
    """The metric a results dict reports (``results["metric"]["name"]``; accuracy when it names none)."""
    return get_metric((results.get("metric") or {}).get("name", "accuracy"))


def task_stats(scores: torch.Tensor, iou: torch.Tensor | None, distance: torch.Tensor | None,
               higher_is_better: bool = True) -> dict[str, Any]:
    """Per-task numbers of one row from per-model ``scores (S,)``, ``iou (S,)``, ``distance (S,)``
    (``best``: the lowest score when lower is better; ``distance``: the mean, ``distance_median``:
    the median over the models with a distance)."""
    a = scores.double()
    best = a.max() if higher_is_better else a.min()
    known = distance[~torch.isnan(distance)].double() if distance is not None else None
    return {"num": int(a.numel()), "best": float(best), "mean": float(a.mean()), "median": float(a.quantile(0.5)),
            "iou": _nanmean(iou.tolist()) if iou is not None else None,
            "distance": _nanmean(distance.tolist()) if distance is not None else None,
            "distance_median": float(known.quantile(0.5)) if known is not None and known.numel() else None}


def aggregate(per_task: Mapping[str, Mapping[str, Mapping[str, Any]]], tasks: Sequence[str],
              spacing: float | None) -> dict[str, dict[str, float | None]]:
    """Average per-task stats over ``tasks``: ``{row: {best, mean, median, iou, distance, distance_median,
    distance_ratio}}``.

    Args:
        per_task: ``{task: {row: task_stats(...)}}``.
        tasks: the tasks of the section.
        spacing: the zoo's nearest-neighbour spacing (for ``distance_ratio``).
    """
    rows: list[str] = []
    for t in tasks:
        rows += [r for r in per_task[t] if r not in rows]
    out = {}
    for row in rows:
        stats = [per_task[t][row] for t in tasks if row in per_task[t]]
        entry: dict[str, float | None] = {k: _nanmean([s.get(k) for s in stats])
                                          for k in ("best", "mean", "median", "iou", "distance", "distance_median")}
        d = entry["distance"]
        entry["distance_ratio"] = d / spacing if d is not None and spacing and not math.isnan(spacing) else None
        entry["tasks"] = len(stats)
        out[row] = entry
    return out


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/Inf → None, tensors/arrays → lists, tuples → lists."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _clean(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def slug(text: str) -> str:
    """File-name-safe form of a row or task name."""
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text.replace("=", "")).strip("_")


def save_predictions(out_dir: str | Path, section: str, task: str, row: str, ids: Sequence[str],
                     preds: torch.Tensor, labels: torch.Tensor) -> Path:
    """Write ``predictions/<section>__<task>__<row>.npz``: ``predictions (S, N)``, ``labels (N,)``, ``ids (S,)``.

    Accuracy, IoU against the zoo rows, etc. can all be recomputed from these files.
    """
    path = Path(out_dir) / "predictions" / f"{section}__{slug(task)}__{slug(row)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, predictions=preds.numpy().astype(np.int16), labels=labels.numpy().astype(np.int16),
                                ids=np.array(list(ids)), section=np.array(section), task=np.array(task),
                                row=np.array(row))
    return path


def save_scores(out_dir: str | Path, section: str, task: str, row: str, ids: Sequence[str], scores: torch.Tensor,
                metric: str) -> Path:
    """Write ``scores/<section>__<task>__<row>.npz``: ``scores (S,)`` float64 of ``metric``, ``ids (S,)``.

    The record of a row scored by a metric other than accuracy, whose outputs are no class
    predictions: its best / mean / median can be recomputed from these files.
    """
    path = Path(out_dir) / "scores" / f"{section}__{slug(task)}__{slug(row)}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, scores=scores.double().numpy(), ids=np.array(list(ids)), metric=np.array(metric),
                            section=np.array(section), task=np.array(task), row=np.array(row))
    return path


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def _fmt_score(v: Any, metric: Metric) -> str:
    """A score as tables show it: accuracy in percent with one decimal, others with four digits."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{metric.scale * v:.1f}" if metric.scale != 1.0 else f"{v:.4g}"


def _score_header(metric: Metric, stat: str) -> str:
    return f"{stat} {metric.label}" + ("" if metric.higher_is_better else " ↓")


def table_markdown(rows: Mapping[str, Mapping[str, Any]], metric: Metric | None = None) -> str:
    """One Markdown table: the metric's best / mean / median (accuracy by default, in %), IoU, distance,
    distance ratio."""
    metric = metric or get_metric("accuracy")
    scores = " | ".join(_score_header(metric, stat) for stat in ("best", "mean", "median"))
    lines = [f"| row | {scores} | wrong-set IoU ↓ | nearest-zoo distance | distance / zoo spacing |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_fmt_score(r.get('best'), metric)} | {_fmt_score(r.get('mean'), metric)} | "
                     f"{_fmt_score(r.get('median'), metric)} | {_fmt(r.get('iou'))} | {_fmt(r.get('distance'))} | "
                     f"{_fmt(r.get('distance_ratio'))} |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a benchmark's results dict."""
    s = results.get("settings", {})
    metric = result_metric(results)
    parts = [f"# Benchmark `{results['suite']}`", ""]
    for note in results.get("notes", []):
        parts.append(f"- {note}")
    parts.append("")
    for section, title in (("seen", "Seen tasks"), ("unseen", "Unseen (held-out) tasks")):
        rows = results.get(section) or {}
        tasks = s.get(f"{section}_tasks", [])
        parts += [f"## {title} ({len(tasks)} tasks)", ""]
        parts += [table_markdown(rows, metric) if rows else "_none in this suite_", ""]
    for kind, rows in (results.get("unseen_by_kind") or {}).items():
        n = len(s.get("unseen_tasks_by_kind", {}).get(kind, []))
        parts += [f"### Unseen tasks: {kind} ({n} tasks)", "", table_markdown(rows, metric), ""]
    sgd = results.get("sgd") or {}
    if metric.name != "accuracy":
        parts += ["## Few-shot SGD", "", f"– (not applicable: few-shot SGD is measured in accuracy on k labelled "
                                         f"examples per class; this suite's metric is {metric.name})", ""]
    elif sgd:
        parts += [f"## Few-shot SGD ({len(s.get('sgd_tasks', []))} tasks: {', '.join(s.get('sgd_tasks', []))})", ""]
        refine = results.get("refine") or {}
        if refine:
            parts += [f"From the base, and generate-then-refine: the same fits started from a generated adapter "
                      f"(lr {_fmt(s.get('refine_lr'))}).", "",
                      "| k per class | from the base % | seconds per model | generate-then-refine % | seconds per model |",
                      "|---|---:|---:|---:|---:|"]
        else:
            parts += ["| k per class | accuracy % | seconds per model |", "|---|---:|---:|"]
        for k, v in sgd.items():
            line = f"| {k} | {_fmt(v.get('accuracy'), True)} | {_fmt(v.get('seconds'))} |"
            if refine:
                r = refine.get(k, {})
                line += f" {_fmt(r.get('accuracy'), True)} | {_fmt(r.get('seconds'))} |"
            parts.append(line)
        match = results.get("sgd_examples_to_match")
        ref = results.get("generated_mean_on_sgd_tasks")
        parts += ["", f"Generated mean accuracy on these tasks: {_fmt(ref, True)} %. Smallest k whose SGD mean "
                      f"reaches it: **{match if match is not None else 'none'}**.", ""]
    lat = results.get("latency_ms_per_sample")
    parts += ["## Generation", "",
              f"- latency: {_fmt(lat)} ms per sample, {_fmt(results.get('latency_ms_per_batch'))} ms per batch of "
              f"{s.get('num')} (device: {s.get('device', 'cpu')}; warm-up call excluded)",
              f"- total generation time: {_fmt(results.get('generation_seconds'))} s",
              f"- samples with NaN/Inf weights: {results.get('generated_nonfinite_samples', '–')}"]
    sampler = results.get("sampler")
    if sampler:
        parts.append(f"- sampler: {sampler['sampler']}, {sampler['steps']} steps, {sampler['model_evaluations']} model "
                     f"evaluations per sample{_latent_noise(sampler)}; the row 'generated one-step' is the same model's one-step estimate "
                     f"from the same noise ({_fmt(results.get('latency_ms_per_sample_one_step'))} ms per sample)")
    for row, other in (results.get("other_generators") or {}).items():
        parts.append(f"- row '{row}': {other['model']} ({other['condition']} condition), {other['sampler']}, "
                     f"{other['steps']} steps, {other['model_evaluations']} model evaluations per sample, "
                     f"{_fmt(other.get('latency_ms_per_sample'))} ms per sample")
    if results.get("runs_in_zoo"):
        parts.append(f"- basins: the generated networks' nearest zoo checkpoints come from "
                     f"{results.get('basins_covered', '–')} of the zoo's {results['runs_in_zoo']} independent runs; "
                     f"within-run spacing {_fmt(results.get('within_run_spacing'))}{_generated_spacings(results)}")
    parts.append("")
    aligned = ("after hidden-unit alignment (full networks: each model aligned to every training run, whose "
               "checkpoints share one permutation)" if results.get("hidden_units_aligned", True) else
               "with hidden units as they are (every run fine-tunes one parent, whose units they keep)")
    distance = ("*Distance*: RMS distance to the nearest training checkpoint in the zoo's per-tensor z-scored "
                f"space, {aligned} or on merged ΔW = scaling·B·A (LoRA); *spacing* "
                "is the median nearest-neighbour distance among training checkpoints.")
    if metric.name == "accuracy":
        parts += ["Accuracies are on each task's test split. *Wrong-set IoU*: largest IoU between a model's set of "
                  "wrong test predictions and that of any training-zoo checkpoint (a checkpoint is not compared "
                  "with itself; two empty sets count as IoU 0); lower is more novel. " + distance, ""]
    else:
        way = "higher" if metric.higher_is_better else "lower"
        parts += [f"Scores are the tasks' metric, {metric.name} ({metric.axis}; {way} is better; *best* is the "
                  f"{'highest' if metric.higher_is_better else 'lowest'}), on each task's test split. *Wrong-set "
                  "IoU* compares sets of wrong class predictions: not applicable (–) to this metric. " + distance, ""]
    return "\n".join(parts)


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``results.md`` atomically; returns both paths.

    Raises:
        KeyError: a required key (:data:`RESULT_KEYS`) is missing from ``results``.
    """
    missing = [k for k in RESULT_KEYS if k not in results]
    if missing:
        raise KeyError(f"results dict is missing key '{missing[0]}'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", _clean(results))
    md = out / "results.md"
    with atomic_path(md) as tmp:
        tmp.write_text(results_markdown(_clean(results)))
    return out / "results.json", md


def _save_figure(fig, path: str | Path) -> Path:
    """Write a figure as PNG atomically and release it."""
    import matplotlib.pyplot as plt

    if fig.get_layout_engine() is None:  # figures laid out as they are built keep their layout
        fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


WRONG_SET_IOU = ("wrong-set IoU: the largest IoU between a model's set of wrong test predictions and that of any "
                 "training-zoo checkpoint (a checkpoint is not compared with itself; two empty sets count as 0); "
                 "lower = more novel")
DISTANCE_RATIO = ("nearest-zoo distance: the RMS distance, in the benchmark's z-scored comparison space (hidden "
                  "units aligned), from a model to the nearest training-zoo checkpoint (a checkpoint not to "
                  "itself), in units of the zoo's nearest-neighbour spacing; higher = more novel")
#: x axis of :func:`build_accuracy_vs_iou_figure`: (row stat, axis label, caption).
NOVELTY_AXES = {"iou": ("iou", "wrong-set IoU with nearest zoo checkpoint", WRONG_SET_IOU),
                "distance": ("distance_ratio", "nearest-zoo distance / zoo spacing", DISTANCE_RATIO)}
ROW_MARKERS = ("o", "s", "D", "^", "v", "X", "8", "<", ">", "h", "p", "d")
COINCIDENT_FRACTION = 0.025  # means closer than this fraction of both axis spans would hide each other
FAN_POINTS = 6.0             # radius (points) of the fan that spreads coinciding means around their position
DOT_SHIFT_POINTS = 1.5       # per-row shift (points) of the per-model dots, so identical rows stay visible


def _generated_spacings(results: Mapping[str, Any]) -> str:
    """"; generated: median (mean) nearest-zoo distance in within-run spacings" for the seen section."""
    row, spacing = (results.get("seen") or {}).get("generated") or {}, results.get("within_run_spacing")
    median, mean = row.get("distance_median"), row.get("distance")
    if not spacing or median is None or mean is None:
        return ""
    return (f"; generated: median nearest-zoo distance {median / spacing:.2f} within-run spacings "
            f"(mean {mean / spacing:.2f})")


def _latent_noise(sampler: Mapping[str, Any]) -> str:
    """", latent noise σ" when the samples' latents were noised before decoding, else ""."""
    std = sampler.get("latent_noise") or 0.0
    return f", latent noise {std:g} before decoding" if std > 0 else ""


def figure_title(results: Mapping[str, Any]) -> str:
    """``suite · model · sampler`` line naming what a benchmark figure shows."""
    s = results.get("settings") or {}
    sampler = results.get("sampler")
    how = (f"sampler {sampler['sampler']}, {sampler['steps']} steps, {sampler['model_evaluations']} model "
           f"evaluations per sample{_latent_noise(sampler)}" if sampler else "no generator (baselines only)")
    return f"suite {results.get('suite', '?')} · model {s.get('model') or 'none'} · {how}"


def fewshot_accuracies(results: Mapping[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Few-shot SGD test accuracies ``{section: {row: [one per task]}}`` from ``results["sgd_per_task"]``.

    A task counts in ``unseen`` when it is one of ``settings["unseen_tasks"]``, else in ``seen``.
    """
    unseen = set((results.get("settings") or {}).get("unseen_tasks") or [])
    out: dict[str, dict[str, list[float]]] = {}
    for task, per_k in (results.get("sgd_per_task") or {}).items():
        rows = out.setdefault("unseen" if task in unseen else "seen", {})
        for k, v in per_k.items():
            label = "whole training split" if k == "all" else f"k={k}/class"
            rows.setdefault(f"few-shot SGD, {label} (per task)", []).append(float(v["accuracy"]))
    return out


def build_accuracy_distributions_figure(accs: Mapping[str, Mapping[str, Sequence[float]]], *,
                                        fewshot: Mapping[str, Mapping[str, Sequence[float]]] | None = None,
                                        title: str | None = None, metric: Metric | None = None) -> Figure:
    """Box plots of per-model test scores, one panel per section, rows on one shared y axis.

    Args:
        accs: ``{section: {row: per-model scores}}`` (accuracies in [0, 1] by default).
        fewshot: extra rows ``{section: {row: accuracies}}`` appended below (few-shot SGD, one value per task).
        title: the figure's title (see :func:`figure_title`).
        metric: what the scores are (default accuracy, drawn in percent on a fixed 0-100 axis).

    Returns:
        The figure; the right-hand axis of each panel gives ``n=`` (values in the box) per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or get_metric("accuracy")
    data = {s: {**dict(accs.get(s) or {}), **dict((fewshot or {}).get(s) or {})} for s in (*accs, *(fewshot or {}))}
    sections = [s for s in data if data[s]] or ["seen"]
    names = list(dict.fromkeys(n for s in sections for n in data.get(s, {})))
    fig, axes = plt.subplots(1, len(sections), sharey=True, squeeze=False, layout="constrained",
                             figsize=(4.5 * len(sections) + 3, 0.32 * max(len(names), 4) + 1.6))
    for ax, section in zip(axes[0], sections):
        rows = data.get(section, {})
        present = [i for i, n in enumerate(names) if len(rows.get(n, ())) > 0]
        values = [np.asarray(rows[names[i]], dtype=float) * metric.scale for i in present]
        positions = [i + 1 for i in present]
        if values:
            try:
                ax.boxplot(values, positions=positions, orientation="horizontal", showfliers=True, widths=0.6)
            except TypeError:  # matplotlib < 3.10 has no `orientation`
                ax.boxplot(values, positions=positions, vert=False, showfliers=True, widths=0.6)
        ax.set_ylim(len(names) + 0.5, 0.5)  # first row at the top
        ax.set_yticks(range(1, len(names) + 1), names)
        counts = ax.twinx()
        counts.set_ylim(ax.get_ylim())
        counts.set_yticks(positions, [f"n={len(v)}" for v in values], fontsize=7)
        if metric.name == "accuracy":
            ax.set_xlim(-2, 102)
        ax.set_xlabel(f"test {metric.axis}" + ("" if metric.higher_is_better else " (lower is better)"))
        ax.set_title(f"{section} tasks")
        ax.grid(axis="x", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_accuracy_distributions(accs: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, *,
                                results: Mapping[str, Any] | None = None) -> Path:
    """Write :func:`build_accuracy_distributions_figure` as PNG to ``path``.

    Args:
        accs: ``{section: {row: per-model scores}}``.
        path: the PNG to write.
        results: the benchmark's results dict: supplies the title, the metric and the few-shot SGD rows.
    """
    fig = build_accuracy_distributions_figure(accs, fewshot=fewshot_accuracies(results) if results else None,
                                              title=figure_title(results) if results else None,
                                              metric=result_metric(results) if results else None)
    return _save_figure(fig, path)


def _fan_offsets(xy: np.ndarray, span: np.ndarray) -> np.ndarray:
    """Display offsets (points) ``(R, 2)`` that spread means lying within :data:`COINCIDENT_FRACTION`.

    Args:
        xy: ``(R, 2)`` positions in data coordinates.
        span: ``(2,)`` the axis spans, so closeness is judged as it would look on the axes.
    """
    group = list(range(len(xy)))
    for i in range(len(xy)):
        for j in range(i):
            if np.all(np.abs(xy[i] - xy[j]) < COINCIDENT_FRACTION * span):
                group[i] = group[j]
                break
    offsets = np.zeros((len(xy), 2))
    for g in set(group):
        members = [i for i in range(len(xy)) if group[i] == g]
        if len(members) > 1:
            angles = np.pi / 2 + 2 * np.pi * np.arange(len(members)) / len(members)
            offsets[members] = FAN_POINTS * np.stack([np.cos(angles), np.sin(angles)], 1)
    return offsets


def build_accuracy_vs_iou_figure(results: Mapping[str, Any],
                                 points: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None
                                 = None, novelty: Literal["iou", "distance"] = "iou") -> Figure:
    """Mean accuracy against a novelty measure of every row; noise-added scales joined as a curve.

    ``novelty``: the x axis, ``"iou"`` (mean wrong-set IoU, lower = more novel) or ``"distance"``
    (mean nearest-zoo distance in units of the zoo's nearest-neighbour spacing, ``distance_ratio``;
    higher = more novel).

    Rows keep one colour and marker across panels. Means that would overlap are fanned out by
    :data:`FAN_POINTS` around their common position (a ``+``), and the per-model dots of each row
    are shifted by :data:`DOT_SHIFT_POINTS` in a direction of its own, so that identical rows (the
    zoo under retrieval on seen tasks) stay visible; the caption says so and defines the IoU.

    Args:
        results: the results dict (``seen`` / ``unseen`` row stats, ``suite``, ``settings``, ``sampler``).
        points: optional per-model ``{section: {row: (accs, novelty values)}}`` drawn behind the means.
        novelty: the x axis.
    """
    if novelty not in NOVELTY_AXES:
        raise ValueError(f"novelty must be one of {list(NOVELTY_AXES)}, got {novelty!r}")
    key, xlabel, caption = NOVELTY_AXES[novelty]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.transforms import offset_copy

    sections = [s for s in ("seen", "unseen") if results.get(s)] or ["seen"]
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections) + 2.8, 5.4), squeeze=False,
                             layout="constrained")
    names = list(dict.fromkeys(n for s in sections for n in results.get(s) or {}))
    palette = plt.get_cmap("tab10")
    style = {n: (palette(i % 10), ROW_MARKERS[i % len(ROW_MARKERS)]) for i, n in
             enumerate(n for n in names if not n.startswith("noise-added"))}
    handles: dict[str, Any] = {}
    for ax, section in zip(axes[0], sections):
        rows = results.get(section) or {}
        for i, (name, (a, iou)) in enumerate((points or {}).get(section, {}).items()):
            angle = 2.399963 * i  # golden angle: each row its own direction
            shift = offset_copy(ax.transData, fig=fig, units="points", x=DOT_SHIFT_POINTS * math.cos(angle),
                                y=DOT_SHIFT_POINTS * math.sin(angle))
            c = "0.35" if name.startswith("noise-added") else style.get(name, ("gray",))[0]
            dots = np.stack([np.asarray(iou, float), np.asarray(a, float) * 100], 1)
            ax.scatter(dots[:, 0], dots[:, 1], s=12, alpha=0.45, color=c, edgecolors="white", linewidths=0.3,
                       transform=shift, zorder=1, label=f"{name} (per model)")
            ax.update_datalim(dots[np.isfinite(dots).all(1)])  # a shifted transform does not grow the limits
        noise = sorted((float(n.split()[-1]), r) for n, r in rows.items()
                       if n.startswith("noise-added") and r.get(key) is not None)
        if noise:  # the curve follows the noise scale
            (handles["noise-added (scale →)"],) = ax.plot([r[key] for _, r in noise],
                                                          [100 * r["mean"] for _, r in noise], "-s", color="black",
                                                          markersize=4, zorder=2)
            for scale, r in noise:
                ax.annotate(f"{scale:g}", (r[key], 100 * r["mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        means = [(n, r) for n, r in rows.items() if not n.startswith("noise-added") and r.get(key) is not None]
        if not means:
            continue
        xy = np.array([[r[key], 100 * r["mean"]] for _, r in means], dtype=float)
        ax.update_datalim(xy)
        ax.autoscale_view()
        span = np.array([np.ptp(ax.get_xlim()), np.ptp(ax.get_ylim())])
        offsets = _fan_offsets(xy, span)
        for (name, _), (x, y), (dx, dy) in zip(means, xy, offsets):
            color, marker = style[name]
            if dx or dy:
                ax.plot([x], [y], "+", color="black", markersize=7, markeredgewidth=0.8, zorder=3)
            handles[name] = ax.scatter([x], [y], s=150 if name == "generated" else 55,
                                       marker="*" if name == "generated" else marker, color=color,
                                       edgecolors="black", linewidths=0.6, zorder=4, label=name,
                                       transform=offset_copy(ax.transData, fig=fig, units="points", x=dx, y=dy))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean test accuracy (%)")
        ax.set_title(f"{section} tasks")
        ax.grid(alpha=0.3)
    fig.legend(list(handles.values()), list(handles), loc="outside right upper", fontsize=7,
               title="rows (large: mean over tasks)", title_fontsize=7)
    title = figure_title(results)
    if len(sections) == 1:  # one panel: the line would run under the legend, so one part per line, left
        fig.suptitle(title.replace(" · ", "\n"), fontsize=9, x=0.01, ha="left")
    else:
        fig.suptitle(title, fontsize=9)
    fig.supxlabel(f"{caption}.\nSmall dots: one model each, every row's shifted by {DOT_SHIFT_POINTS:g} pt "
                  f"in its own direction; means that would overlap are fanned out by {FAN_POINTS:g} pt around "
                  f"their position (+).", fontsize=7, wrap=True)
    return fig


def plot_accuracy_vs_iou(results: Mapping[str, Any], path: str | Path,
                         points: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None = None
                         ) -> Path:
    """Write :func:`build_accuracy_vs_iou_figure` as PNG to ``path``.

    Args:
        results: the results dict (``seen`` / ``unseen`` row stats).
        path: the PNG to write.
        points: optional per-model ``{section: {row: (accs, ious)}}`` drawn behind the means.
    """
    return _save_figure(build_accuracy_vs_iou_figure(results, points), path)


def plot_accuracy_vs_distance(results: Mapping[str, Any], path: str | Path,
                              points: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None
                              = None) -> Path:
    """Write :func:`build_accuracy_vs_iou_figure` with the nearest-zoo distance as its x axis (PNG).

    Args:
        results: the results dict (``seen`` / ``unseen`` row stats with ``distance_ratio``).
        path: the PNG to write.
        points: optional per-model ``{section: {row: (accs, distance ratios)}}`` drawn behind the means.
    """
    return _save_figure(build_accuracy_vs_iou_figure(results, points, novelty="distance"), path)
