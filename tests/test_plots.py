"""Benchmark figures: what each names, defines and shows, asserted on the matplotlib objects."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from weightdiff.evaluate import report  # noqa: E402
from weightdiff.evaluate.report import plot_accuracy_distributions, plot_accuracy_vs_iou  # noqa: E402

ZOO, RETRIEVAL = "zoo (original)", "retrieval"
SEEN_TASKS, UNSEEN_TASKS = ["digits:a", "digits:b"], ["digits:c", "digits:d", "digits:e"]


def _results() -> dict:
    """A small results dict in which retrieval equals the zoo on seen tasks (the task's own checkpoints)."""
    seen = {ZOO: {"mean": 0.95, "iou": 0.7}, "generated": {"mean": 0.9, "iou": 0.4},
            RETRIEVAL: {"mean": 0.95, "iou": 0.7}, "floor": {"mean": 0.1, "iou": 0.9},
            "noise-added 0.1": {"mean": 0.85, "iou": 0.6}, "noise-added 0.01": {"mean": 0.94, "iou": 0.68}}
    unseen = {ZOO: {"mean": 0.93, "iou": 0.5}, "generated": {"mean": 0.8, "iou": 0.35},
              RETRIEVAL: {"mean": 0.7, "iou": 0.65}, "floor": {"mean": 0.1, "iou": 0.9}}
    sgd = {t: {"1": {"accuracy": 0.4 + 0.01 * i, "seconds": 0.1}, "all": {"accuracy": 0.95, "seconds": 0.3}}
           for i, t in enumerate(UNSEEN_TASKS)}
    return {"suite": "digits-cnn", "seen": seen, "unseen": unseen, "sgd_per_task": sgd,
            "sampler": {"sampler": "ddim", "steps": 10, "model_evaluations": 10},
            "settings": {"model": "runs/tiny/generator", "seen_tasks": SEEN_TASKS, "unseen_tasks": UNSEEN_TASKS}}


def _points(results: dict) -> dict:
    rng = np.random.default_rng(0)
    out = {}
    for section in ("seen", "unseen"):
        out[section] = {n: ((r["mean"] + 0.02 * rng.standard_normal(6)).tolist(),
                            (r["iou"] + 0.02 * rng.standard_normal(6)).tolist())
                        for n, r in results[section].items()}
    out["seen"][RETRIEVAL] = out["seen"][ZOO]  # the very same models
    return out


def _accs() -> dict:
    return {"seen": {ZOO: [0.9] * 8, "generated": [0.8, 0.85, 0.9], "floor": [0.1] * 2},
            "unseen": {ZOO: [0.9] * 4, "generated": [0.7] * 5, "floor": [0.1] * 3}}


def _drawn(monkeypatch, plot, *args, **kwargs):
    """The figure ``plot`` would write, drawn (layout done) instead of saved."""
    figures = []
    monkeypatch.setattr(report, "_save_figure", lambda fig, path: figures.append(fig) or path)
    plot(*args, **kwargs)
    (fig,) = figures
    fig.canvas.draw()
    return fig


@pytest.fixture()
def iou_figure(monkeypatch, tmp_path):
    results = _results()
    fig = _drawn(monkeypatch, plot_accuracy_vs_iou, results, tmp_path / "a.png", _points(results))
    yield fig
    plt.close(fig)


@pytest.fixture()
def box_figure(monkeypatch, tmp_path):
    fig = _drawn(monkeypatch, plot_accuracy_distributions, _accs(), tmp_path / "b.png", results=_results())
    yield fig
    plt.close(fig)


def _panels(fig) -> list:
    return [ax for ax in fig.axes if ax.get_title().endswith("tasks")]


def _display(fig, ax, label: str) -> np.ndarray:
    """Display positions ``(n, 2)`` of the scatter labelled ``label`` on ``ax``."""
    (coll,) = [c for c in ax.collections if isinstance(c, PathCollection) and c.get_label() == label]
    return coll.get_offset_transform().transform(coll.get_offsets())


def test_iou_legend_lies_outside_every_axes(iou_figure) -> None:
    legends = list(iou_figure.legends) + [ax.get_legend() for ax in iou_figure.axes if ax.get_legend()]
    assert legends
    renderer = iou_figure.canvas.get_renderer()
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in iou_figure.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert {ZOO, RETRIEVAL, "generated", "floor"} <= set(labels) and len(labels) == len(set(labels))


def test_iou_title_names_suite_model_and_sampler(iou_figure) -> None:
    title = iou_figure.get_suptitle()
    for part in ("digits-cnn", "runs/tiny/generator", "ddim", "10 steps", "10 model evaluations"):
        assert part in title


def test_iou_figure_defines_wrong_set_iou(iou_figure) -> None:
    texts = [t.get_text() for t in iou_figure.findobj(Text)]
    assert any("wrong-set IoU:" in t and "wrong test predictions" in t and "zoo checkpoint" in t for t in texts)


def test_iou_coincident_rows_stay_visible(iou_figure) -> None:
    seen = next(ax for ax in _panels(iou_figure) if ax.get_title() == "seen tasks")
    mean = [_results()["seen"][ZOO]["iou"], 100 * _results()["seen"][ZOO]["mean"]]
    at_mean = [c for c in seen.collections if isinstance(c, PathCollection) and len(c.get_offsets()) == 1
               and np.allclose(c.get_offsets(), [mean], rtol=0, atol=0)]
    assert len(at_mean) == 2  # the zoo's and retrieval's means, equal in data
    zoo, retrieval = (c.get_offset_transform().transform(c.get_offsets()) for c in at_mean)
    marker_px = np.sqrt(55) * iou_figure.dpi / 72  # the mean markers' diameter (s=55 pt²) in pixels
    assert np.linalg.norm(zoo - retrieval) >= marker_px  # equal means: neither hides the other
    dots_zoo, dots_retrieval = _display(iou_figure, seen, f"{ZOO} (per model)"), \
        _display(iou_figure, seen, f"{RETRIEVAL} (per model)")
    assert np.all(np.linalg.norm(dots_zoo - dots_retrieval, axis=1) > 1.0)  # identical models, distinct dots
    unseen = next(ax for ax in _panels(iou_figure) if ax.get_title() == "unseen tasks")
    x, y = _results()["unseen"]["generated"]["iou"], 100 * _results()["unseen"]["generated"]["mean"]
    np.testing.assert_array_equal(_display(iou_figure, unseen, "generated"), unseen.transData.transform([[x, y]]))


def test_iou_per_model_dots_are_visible(iou_figure) -> None:
    seen = next(ax for ax in _panels(iou_figure) if ax.get_title() == "seen tasks")
    (dots,) = [c for c in seen.collections if c.get_label() == "generated (per model)"]
    assert dots.get_alpha() >= 0.4 and dots.get_sizes()[0] >= 10 and dots.get_linewidths()[0] > 0


def test_box_rows_share_one_y_axis_labelled_once(box_figure) -> None:
    first, second = _panels(box_figure)
    assert first.get_shared_y_axes().joined(first, second)
    assert all(t.label1.get_visible() for t in first.yaxis.get_major_ticks())
    assert not any(t.label1.get_visible() for t in second.yaxis.get_major_ticks())


def test_box_every_box_states_its_n_and_few_shot_rows_are_present(box_figure) -> None:
    results, accs = _results(), _accs()
    fewshot = {"few-shot SGD, k=1/class (per task)": [0.4 + 0.01 * i for i in range(3)],
               "few-shot SGD, whole training split (per task)": [0.95] * 3}
    assert report.fewshot_accuracies(results) == {"unseen": fewshot}
    rows = {**accs, "unseen": {**accs["unseen"], **fewshot}}
    panels = _panels(box_figure)
    names = [t.get_text() for t in panels[0].get_yticklabels()]
    assert "few-shot SGD, k=1/class (per task)" in names and "few-shot SGD, whole training split (per task)" in names
    assert box_figure.get_suptitle() == report.figure_title(results)
    assert "digits-cnn" in box_figure.get_suptitle() and "ddim" in box_figure.get_suptitle()
    for ax in panels:
        section = ax.get_title().split()[0]
        (counts,) = [a for a in box_figure.axes if a is not ax and a.get_shared_x_axes().joined(a, ax)]
        got = {names[int(round(y)) - 1]: t.get_text() for y, t in zip(counts.get_yticks(), counts.get_yticklabels())}
        assert got == {n: f"n={len(v)}" for n, v in rows[section].items()}


def test_plots_are_written_and_released(tmp_path) -> None:
    results = _results()
    before = set(plt.get_fignums())
    a = plot_accuracy_vs_iou(results, tmp_path / "accuracy_vs_iou.png", _points(results))
    b = plot_accuracy_distributions(_accs(), tmp_path / "accuracy_distributions.png", results=results)
    assert a.read_bytes()[:8] == b.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plt.get_fignums()) == before


def _with_distances(results: dict) -> dict:
    """``results`` with a ``distance_ratio`` on every row but the floor (a row without weights has none)."""
    ratios = {ZOO: 1.0, "generated": 2.5, RETRIEVAL: 1.0, "noise-added 0.1": 0.8, "noise-added 0.01": 0.1}
    for section in ("seen", "unseen"):
        for name, row in results[section].items():
            row["distance_ratio"] = ratios.get(name)
    return results


def test_distance_figure_puts_the_nearest_zoo_distance_on_x_and_defines_it(monkeypatch, tmp_path) -> None:
    results = _with_distances(_results())
    fig = _drawn(monkeypatch, report.plot_accuracy_vs_distance, results, tmp_path / "d.png")
    seen = next(ax for ax in _panels(fig) if ax.get_title() == "seen tasks")
    assert seen.get_xlabel() == "nearest-zoo distance / zoo spacing"
    texts = [t.get_text() for t in fig.findobj(Text)]
    assert any(t.startswith("nearest-zoo distance:") and "nearest-neighbour spacing" in t for t in texts)
    assert not any("wrong-set IoU:" in t for t in texts)
    (curve,) = [line for line in seen.get_lines() if line.get_marker() == "s"]  # noise-added, by scale
    np.testing.assert_array_equal(curve.get_xdata(), [0.1, 0.8])
    x, y = results["seen"]["generated"]["distance_ratio"], 100 * results["seen"]["generated"]["mean"]
    np.testing.assert_array_equal(_display(fig, seen, "generated"), seen.transData.transform([[x, y]]))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "floor" not in labels and "generated" in labels  # no distance, no point
    plt.close(fig)


def test_an_unknown_novelty_axis_is_refused() -> None:
    with pytest.raises(ValueError, match="novelty must be one of"):
        report.build_accuracy_vs_iou_figure(_results(), novelty="cosine")
