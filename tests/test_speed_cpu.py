"""benchmarks/speed_cpu.py --smoke (sections a-d): rows, intervals, verdicts and the equality checks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
VERDICTS = {"met", "missed", "not resolved at this n", "reported"}


@pytest.mark.slow
def test_smoke_rows_and_equalities():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed_cpu.py"), "--smoke", "--only", "a,b,c,d"],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((ROOT / "benchmarks" / "results" / "speed_cpu_smoke.json").read_text())
    rows = [r for r in data["rows"] if r["section"] in "abcd"]
    assert {r["section"] for r in rows} == set("abcd")
    for r in rows:
        lo, hi = r["ci95"]
        assert all(math.isfinite(x) and x > 0 for x in (r["median"], lo, hi, r["min"], r["max"])), r
        assert r["min"] <= r["median"] <= r["max"] and lo <= hi, r
        assert r["verdict"] in VERDICTS and (r["target"] is None) == (r["verdict"] == "reported"), r
    configs = {r["config"] for r in rows if r["section"] == "b"}
    assert {f"DeepCache N={n} b={b} {s}" for n in (2, 3, 5) for b in (0, 1) for s in ("uniform", "non-uniform")} \
        <= configs
    for checks in data["equality"].values():
        compared = [c for c in checks if c["equal"] is not None]
        assert compared and all(c["equal"] and c["max_abs_diff"] == 0.0 for c in compared)
    assert {"steps", "repeats", "size", "unet_eval_s"} <= set(data["settings"])
