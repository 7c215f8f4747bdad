"""The one command for all quality tables (benchmarks/quality.py): its plan fits the budget, every script
and option it passes exists, and the run log makes --resume skip finished runs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import quality  # noqa: E402


def test_plan_fits_the_three_hour_budget_and_names_every_script():
    """The whole plan fits issue 16's 3 hours (its minutes are the measured ones, rounded up), and --plan says so."""
    for part in quality.PARTS:
        assert 0 < sum(r.minutes for r in quality.RUNS if r.part == part)
    assert sum(r.minutes for r in quality.RUNS) <= quality.BUDGET_MINUTES == 180
    assert {r.part for r in quality.RUNS} == set(quality.PARTS)
    for run in quality.RUNS:
        source = (ROOT / "benchmarks" / f"{run.name}.py").read_text()
        # a script may extend another's parser (erasure_methods builds on erasure_quality's)
        for module in re.findall(r"^from (\w+) import", source, re.M):
            if (ROOT / "benchmarks" / f"{module}.py").is_file():
                source += (ROOT / "benchmarks" / f"{module}.py").read_text()
        for opt in {a for a in run.args + run.smoke_args + run.resume_args if a.startswith("--")}:
            assert re.search(rf'add_argument\(\s*"{re.escape(opt)}"', source), f"{run.name} has no {opt}"
    out = subprocess.run([sys.executable, "-m", "benchmarks.quality", "--plan"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    total = sum(r.minutes for r in quality.RUNS)
    assert out.splitlines()[-1].split()[:2] == ["total", f"{total:g}"]
    assert out.splitlines()[-1].endswith("(budget 180 minutes on 2 cores: within it)")


def test_plan_sums_measured_minutes_only_when_all_were_measured():
    runs = quality.RUNS[:2]
    log = {runs[0].name: dict(command=runs[0].shown(), returncode=0, seconds=600.0)}
    lines = quality.plan(runs, log).splitlines()
    assert lines[1].split()[:4] == [runs[0].name, "tables", f"{runs[0].minutes:g}", "10"]
    assert lines[2].split()[3] == "-"
    assert lines[-1].split()[:3] == ["total", f"{runs[0].minutes + runs[1].minutes:g}", "-"]
    log[runs[1].name] = dict(command=runs[1].shown(), returncode=0, seconds=300.0)
    assert quality.plan(runs, log).splitlines()[-1].split()[:3] == [
        "total", f"{runs[0].minutes + runs[1].minutes:g}", "15"]
    log[runs[1].name] = dict(command=runs[1].shown(), returncode=1, seconds=300.0)  # a failed run measured nothing
    assert quality.plan(runs, log).splitlines()[-1].split()[2] == "-"
    log[runs[1].name] = dict(command=runs[1].shown() + " --n 8", returncode=0, seconds=300.0)  # other settings
    assert quality.plan(runs, log).splitlines()[-1].split()[2] == "-"
    # a plan whose measured total is over the budget says so, though its planned minutes fit
    log = {r.name: dict(command=r.shown(), returncode=0, seconds=6000.0) for r in runs}
    assert quality.plan(runs, log).splitlines()[-1].endswith("over it by 20: run the parts in turn)")


def test_a_run_of_some_benchmarks_keeps_the_others_in_the_log(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality.subprocess, "call", lambda cmd, cwd: 0)
    other = dict(command="python benchmarks/reference_model.py --threads 2", returncode=0, seconds=296.8,
                 finished="2026-12-07 13:31:38")
    (tmp_path / "quality_run.json").write_text(json.dumps({"runs": {"reference_model": other}}))
    assert quality.main(["--only", "oracle_accuracy", "--no-report"]) == 0
    log = json.loads((tmp_path / "quality_run.json").read_text())["runs"]
    assert log["reference_model"] == other and log["oracle_accuracy"]["returncode"] == 0


def test_issue_16_sample_sizes():
    runs = quality.by_name()

    def value(name, opt):
        args = runs[name].args
        return args[args.index(opt) + 1]

    for name in ("guidance_quality", "deepcache_quality", "pruning_quality"):
        assert int(value(name, "--n")) >= 256
    assert (value("pruning_quality", "--calib"), value("pruning_quality", "--learn-steps"),
            value("pruning_quality", "--epochs")) == ("64", "25", "4")
    for name in ("erasure_quality", "erasure_methods"):
        erasure = runs[name].args
        seeds = erasure[erasure.index("--seeds") + 1: erasure.index("--attack-prompts")]
        assert int(value(name, "--n-prompts")) * len(seeds) >= 128
        assert int(value(name, "--attack-prompts")) >= 32
    # erasure_methods reuses erasure_quality's ESD and SalUn rows: every flag of that run is passed to it unchanged
    first, methods = runs["erasure_quality"].args, runs["erasure_methods"].args
    assert methods[: len(first)] == first
    assert value("erasure_methods", "--reuse") == "benchmarks/results/erasure_quality.json"


def test_erasure_methods_reuses_with_the_settings_erasure_quality_measured():
    """--reuse refuses rows of other settings: the plan's two erasure runs must parse to the same protocol and
    ESD / SalUn training settings (the scripts' defaults differ, e.g. the soft-prompt attack's steps)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import erasure_methods
    import erasure_quality

    runs = quality.by_name()
    first = erasure_quality.protocol_parser("", ("esd", "salun")).parse_args(runs["erasure_quality"].args)
    second = erasure_methods.parser().parse_args(runs["erasure_methods"].args)
    keys = erasure_quality.PROTOCOL + erasure_quality.TRAINING["esd"] + erasure_quality.TRAINING["salun"]
    assert {k: getattr(first, k) for k in keys} == {k: getattr(second, k) for k in keys}


def test_resume_skips_finished_runs(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert quality.main(["--only", "oracle_accuracy", "reference_model", "--no-report"]) == 0
    assert [Path(c[1]).stem for c in calls] == ["oracle_accuracy", "reference_model"]
    log = json.loads((tmp_path / "quality_run.json").read_text())
    assert log["runs"]["reference_model"]["command"] == quality.by_name()["reference_model"].shown() == (
        "python benchmarks/reference_model.py --threads 2 --heldout 2048")
    calls.clear()
    log["runs"]["reference_model"]["returncode"] = 1  # a failed run is run again
    (tmp_path / "quality_run.json").write_text(json.dumps(log))
    assert quality.main(["--only", "oracle_accuracy", "reference_model", "--resume", "--no-report"]) == 0
    assert [Path(c[1]).stem for c in calls] == ["reference_model"]
    assert "oracle_accuracy: finished before" in capsys.readouterr().out


def test_a_failing_benchmark_fails_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality.subprocess, "call", lambda cmd, cwd: 3)
    assert quality.main(["--only", "oracle_accuracy", "--no-report"]) == 1
    assert json.loads((tmp_path / "quality_run.json").read_text())["runs"]["oracle_accuracy"]["returncode"] == 3


@pytest.mark.parametrize("bad", [["--only", "nope"]])
def test_unknown_benchmark_is_a_usage_error(bad):
    with pytest.raises(SystemExit) as e:
        quality.main(bad)
    assert e.value.code == 2


def test_resume_skips_a_finished_run_that_resumes_inside(tmp_path, monkeypatch, capsys):
    """A run whose script resumes by itself gets --resume only when the runner resumes; the log names it without
    that flag, so a finished run is still recognised and skipped, and a failed one is resumed inside."""
    calls = []
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    monkeypatch.setattr(quality.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert quality.main(["--only", "deepcache_quality", "--no-report"]) == 0
    assert calls[-1][-1] != "--resume"
    log = json.loads((tmp_path / "quality_run.json").read_text())
    assert log["runs"]["deepcache_quality"]["command"] == "python benchmarks/deepcache_quality.py --n 256"
    calls.clear()
    assert quality.main(["--only", "deepcache_quality", "--resume", "--no-report"]) == 0
    assert calls == [] and "deepcache_quality: finished before" in capsys.readouterr().out
    log["runs"]["deepcache_quality"]["returncode"] = -9  # killed
    (tmp_path / "quality_run.json").write_text(json.dumps(log))
    assert quality.main(["--only", "deepcache_quality", "--resume", "--no-report"]) == 0
    assert calls[-1][-2:] == ["256", "--resume"]
