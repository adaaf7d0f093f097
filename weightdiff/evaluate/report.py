"""Benchmark outputs: ``results.json``, ``results.md``, per-model predictions and PNG plots.

Numbers are aggregated in two steps: per task over the models of a row (best / mean / median
accuracy, mean wrong-set IoU, mean nearest-zoo distance), then the per-task numbers are averaged
over the tasks of a section (seen / unseen / a held-out kind). ``distance_ratio`` divides the
distance by the zoo's median nearest-neighbour spacing. Missing values (e.g. the distance of the
floor predictor, which has no weights) are ``null`` in JSON and ``–`` in Markdown.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from weightdiff.io import atomic_path, write_json

RESULT_KEYS = ("suite", "seen", "unseen", "unseen_by_kind", "latency_ms_per_sample", "generation_seconds", "sgd",
               "sgd_examples_to_match", "settings")


def _nanmean(values: Sequence[float]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else None


def task_stats(acc: torch.Tensor, iou: torch.Tensor | None, distance: torch.Tensor | None) -> dict[str, Any]:
    """Per-task numbers of one row from per-model ``acc (S,)``, ``iou (S,)``, ``distance (S,)``."""
    a = acc.double()
    return {"num": int(a.numel()), "best": float(a.max()), "mean": float(a.mean()), "median": float(a.quantile(0.5)),
            "iou": _nanmean(iou.tolist()) if iou is not None else None,
            "distance": _nanmean(distance.tolist()) if distance is not None else None}


def aggregate(per_task: Mapping[str, Mapping[str, Mapping[str, Any]]], tasks: Sequence[str],
              spacing: float | None) -> dict[str, dict[str, float | None]]:
    """Average per-task stats over ``tasks``: ``{row: {best, mean, median, iou, distance, distance_ratio}}``.

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
        entry: dict[str, float | None] = {k: _nanmean([s[k] for s in stats]) for k in ("best", "mean", "median",
                                                                                          "iou", "distance")}
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


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if pct else f"{v:.3f}"


def table_markdown(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One Markdown table: accuracy (%) best / mean / median, IoU, distance, distance ratio."""
    lines = ["| row | best acc % | mean acc % | median acc % | wrong-set IoU ↓ | nearest-zoo distance | "
             "distance / zoo spacing |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {_fmt(r.get('best'), True)} | {_fmt(r.get('mean'), True)} | "
                     f"{_fmt(r.get('median'), True)} | {_fmt(r.get('iou'))} | {_fmt(r.get('distance'))} | "
                     f"{_fmt(r.get('distance_ratio'))} |")
    return "\n".join(lines)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The Markdown report of a benchmark's results dict."""
    s = results.get("settings", {})
    parts = [f"# Benchmark `{results['suite']}`", ""]
    for note in results.get("notes", []):
        parts.append(f"- {note}")
    parts.append("")
    for section, title in (("seen", "Seen tasks"), ("unseen", "Unseen (held-out) tasks")):
        rows = results.get(section) or {}
        tasks = s.get(f"{section}_tasks", [])
        parts += [f"## {title} ({len(tasks)} tasks)", ""]
        parts += [table_markdown(rows) if rows else "_none in this suite_", ""]
    for kind, rows in (results.get("unseen_by_kind") or {}).items():
        n = len(s.get("unseen_tasks_by_kind", {}).get(kind, []))
        parts += [f"### Unseen tasks: {kind} ({n} tasks)", "", table_markdown(rows), ""]
    sgd = results.get("sgd") or {}
    if sgd:
        parts += [f"## Few-shot SGD ({len(s.get('sgd_tasks', []))} tasks: {', '.join(s.get('sgd_tasks', []))})", "",
                  "| k per class | accuracy % | seconds per model |", "|---|---:|---:|"]
        for k, v in sgd.items():
            parts.append(f"| {k} | {_fmt(v.get('accuracy'), True)} | {_fmt(v.get('seconds'))} |")
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
                     f"evaluations per sample; the row 'generated one-step' is the same model's one-step estimate "
                     f"from the same noise ({_fmt(results.get('latency_ms_per_sample_one_step'))} ms per sample)")
    if results.get("runs_in_zoo"):
        parts.append(f"- basins: the generated networks' nearest zoo checkpoints come from "
                     f"{results.get('basins_covered', '–')} of the zoo's {results['runs_in_zoo']} independent runs; "
                     f"within-run spacing {_fmt(results.get('within_run_spacing'))}")
    parts.append("")
    parts += ["Accuracies are on each task's test split. *Wrong-set IoU*: largest IoU between a model's set of "
              "wrong test predictions and that of any training-zoo checkpoint (a checkpoint is not compared with "
              "itself; two empty sets count as IoU 0); lower is more novel. *Distance*: RMS distance to the nearest "
              "training checkpoint in the zoo's per-tensor z-scored space, after hidden-unit alignment (full "
              "networks) or on merged ΔW = scaling·B·A (LoRA); *spacing* is the median nearest-neighbour distance "
              "among training checkpoints.", ""]
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

    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def plot_accuracy_distributions(accs: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path) -> Path:
    """Box plots of per-model accuracies for every row, one panel per section (``{section: {row: accs}}``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in accs if accs[s]]
    fig, axes = plt.subplots(1, max(1, len(sections)), figsize=(6 * max(1, len(sections)), 0.35 * max(
        (len(accs[s]) for s in sections), default=4) + 1.5), squeeze=False)
    for ax, section in zip(axes[0], sections):
        names = list(accs[section])
        data = [np.asarray(accs[section][n], dtype=float) * 100 for n in names]
        try:
            ax.boxplot(data, orientation="horizontal", showfliers=True)
        except TypeError:  # matplotlib < 3.10 has no `orientation`
            ax.boxplot(data, vert=False, showfliers=True)
        ax.set_yticks(range(1, len(names) + 1), names)
        ax.invert_yaxis()
        ax.set_xlabel("test accuracy (%)")
        ax.set_title(f"{section} tasks")
        ax.grid(axis="x", alpha=0.3)
    return _save_figure(fig, path)


def plot_accuracy_vs_iou(results: Mapping[str, Any], path: str | Path,
                         points: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]] | None = None
                         ) -> Path:
    """Mean accuracy against mean wrong-set IoU of every row; noise-added scales joined as a curve.

    Args:
        results: the results dict (``seen`` / ``unseen`` row stats).
        points: optional per-model ``{section: {row: (accs, ious)}}`` drawn faintly behind the means.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("seen", "unseen") if results.get(s)]
    fig, axes = plt.subplots(1, max(1, len(sections)), figsize=(6.5 * max(1, len(sections)), 5), squeeze=False)
    names = [n for s in sections for n in results[s] if not n.startswith("noise-added")]
    palette = plt.get_cmap("tab10")
    color = {n: palette(i % 10) for i, n in enumerate(dict.fromkeys(names))}
    for ax, section in zip(axes[0], sections):
        rows = results[section]
        for name, (a, i) in (points or {}).get(section, {}).items():
            ax.scatter(np.asarray(i, float), np.asarray(a, float) * 100, s=6, alpha=0.2, linewidths=0,
                       color="black" if name.startswith("noise-added") else color.get(name, "gray"))
        noise = [(float(n.split()[-1]), r) for n, r in rows.items()
                 if n.startswith("noise-added") and r.get("iou") is not None]
        if noise:
            noise.sort(key=lambda sr: sr[0])  # the curve follows the noise scale
            ax.plot([r["iou"] for _, r in noise], [100 * r["mean"] for _, r in noise], "-s", color="black",
                    markersize=4, label="noise-added (scale →)")
            for scale, r in noise:
                ax.annotate(f"{scale:g}", (r["iou"], 100 * r["mean"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        for name, r in rows.items():
            if name.startswith("noise-added") or r.get("iou") is None:
                continue
            ax.scatter([r["iou"]], [100 * r["mean"]], s=140 if name == "generated" else 50, label=name,
                       marker="*" if name == "generated" else "o", color=color[name], edgecolors="black",
                       linewidths=0.5, zorder=3)
        ax.set_xlabel("wrong-set IoU with nearest zoo checkpoint (lower = more novel)")
        ax.set_ylabel("mean test accuracy (%)")
        ax.set_title(f"{section} tasks")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    return _save_figure(fig, path)
