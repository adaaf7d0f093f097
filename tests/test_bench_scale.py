"""scripts/bench_scale.py: one subprocess per size, JSON with sizes and slope, and a plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_scale_writes_sizes_slope_and_a_plot(tmp_path):
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts/bench_scale.py"), "--json", str(out), "--threads", "1",
                           "--architectures", "mlp-10k", "mlp-100k", "--steps", "2", "--slope-from", "1000",
                           "--scratch", str(tmp_path)], capture_output=True, text=True, check=False, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    sizes = result["sizes"]
    assert [p["params"] for p in sizes] == [9_610, 85_002]  # DigitsMLP(128), WideMLP(256): real layouts
    for p in sizes:
        assert p["mode"] == "stream" and p["seconds"] > 0 and p["peak_rss_bytes"] > 0
        assert p["file_bytes"] >= 4 * p["params"]  # every weight was written (float32) into the sampled file
    assert isinstance(result["slope"], float)
    assert (tmp_path / "scale.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []  # sampled files deleted
