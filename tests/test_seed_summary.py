"""scripts/seed_summary.py: mean ± std over generator seeds of every benchmark row."""

from __future__ import annotations

import importlib.util
import json
import statistics

import pytest

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("seed_summary", REPO / "scripts" / "seed_summary.py")
seed_summary = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seed_summary)


def _results(folder, suite, generated, far):
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({
        "suite": suite, "seen": {"generated": {"mean": generated}, "retrieval": {"mean": 0.5}},
        "unseen": {"generated": {"mean": far}}, "unseen_by_kind": {"far": {"generated": {"mean": far}}}}))
    return folder


def test_rows_are_averaged_over_the_runs_with_their_sample_std(tmp_path, capsys):
    runs = [_results(tmp_path / f"s{i}", "cordigits-lora", g, f) for i, (g, f) in enumerate([(0.9, 0.7), (0.8, 0.6),
                                                                                             (0.7, 0.8)])]
    assert seed_summary.main([str(r) for r in runs] + ["--json", str(tmp_path / "summary.json")]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    gen = summary["seen"]["generated"]
    assert gen["mean"] == pytest.approx(0.8) and gen["std"] == pytest.approx(statistics.stdev([0.9, 0.8, 0.7]))
    assert summary["unseen: far"]["generated"]["values"] == [0.7, 0.6, 0.8]
    assert summary["seen"]["retrieval"]["std"] == 0.0
    assert "| generated | 80.0 ± 10.0 | 90.0 / 80.0 / 70.0 |" in capsys.readouterr().out


def test_runs_of_different_suites_are_refused(tmp_path, capsys):
    a = _results(tmp_path / "a", "adapt-lora", 0.9, 0.7)
    b = _results(tmp_path / "b", "cordigits-lora", 0.9, 0.7)
    assert seed_summary.main([str(a), str(b)]) == 2
    assert "different suites" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="not found"):
        seed_summary.main([str(tmp_path / "missing")])
