"""scripts/refine_probe.py: noise-added copies of each run's last checkpoint, polished by the task loss."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("refine_probe", REPO / "scripts" / "refine_probe.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


def test_each_run_contributes_its_last_listed_checkpoint_once():
    assert probe.last_of_each_run(["a", "a", "b", "a", "c", "b"]) == [3, 5, 4]
    assert probe.last_of_each_run(["r0"]) == [0] and probe.last_of_each_run([]) == []
