"""benchmarks/attack_batch_speed.py (smoke): every batched arm gives each prompt the tokens batch 1 gives, the
speed-up is time(batch 1) / time(batch B) of the same repeat, and report.py renders the JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "attack_batch_speed_smoke.json"


def test_smoke_run_and_table():
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "attack_batch_speed.py"), "--smoke"], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    data = json.loads(RESULT.read_text())
    assert data["smoke"] is True and data["setting"]["prompts"] == 4 and data["setting"]["repeats"] == 2
    raw = data["raw_seconds"]
    assert sorted(raw) == ["1", "2", "4"] and all(len(t) == 2 for t in raw.values())
    for row in data["results"]:
        b = str(row["batch_size"])
        assert row["same_tokens"] is True and row["baseline"] == "batch_size=1" and row["n"] == 2
        assert row["speedup"] == statistics.median([one / many for one, many in zip(raw["1"], raw[b])])
        assert row["ci95"][0] <= row["speedup"] <= row["ci95"][1]
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    table = report.attack_batch_speed(data)
    lines = [ln for ln in table.splitlines() if ln.startswith("| 2 |") or ln.startswith("| 4 |")]
    assert len(lines) == 2 and all(ln.endswith("| yes |") for ln in lines)
    assert "median over 2 interleaved repeats" in table
