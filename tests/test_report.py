"""Every generated table in README.md and docs/ equals what benchmarks/report.py writes from the JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


def test_generated_tables_are_current():
    assert report.main(["--check"]) == 0


def test_every_marker_names_a_known_table_and_is_closed():
    for path in report.FILES:
        text = path.read_text(encoding="utf-8")
        opened = re.findall(r"<!-- table:(\w+) -->", text)
        closed = re.findall(r"<!-- /table:(\w+) -->", text)
        assert opened == closed, path
        assert set(opened) <= set(report.TABLES), path


def test_a_hand_edit_is_caught(tmp_path, monkeypatch):
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- table:overhead_cpu -->\n| typed | by hand |\n<!-- /table:overhead_cpu -->\n")
    monkeypatch.setattr(report, "FILES", [readme])
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert report.main([]) == 0 and report.main(["--check"]) == 0
    assert report.render("overhead_cpu") in readme.read_text()


def _pruning_run(calib: int, beta: float, difference: float, verdict: str) -> dict:
    rows = [dict(target=0.0, masks="none", param_reduction=0.0, mac_reduction=0.0, n=4),
            dict(target=0.2, masks="learned", param_reduction=0.201, mac_reduction=0.09, n=4),
            dict(target=0.3, masks="learned", param_reduction=0.301, mac_reduction=0.15, n=4)]
    return dict(setting=dict(n=4, calib=calib, learn_steps=10, epochs=1, beta=beta, lr=0.1),
                learning=dict(steps=8, seconds_this_run=6.4, final=dict(mse=0.0612, penalty=2.4)),
                target_reduction=0.2, results=rows,
                target=dict(row="learned -20%", difference=difference, ci95=[difference - 0.01, difference + 0.02],
                            n=4, verdict=verdict))


def _sweep_rows(table: str, files: dict, tmp_path, monkeypatch) -> list[str]:
    """The rows (one per results file and setting) ``table`` renders from ``files`` {name: JSON} as results."""
    import json

    for name, data in files.items():
        (tmp_path / name).write_text(json.dumps(data))
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    return [ln for ln in report.render(table).splitlines() if ln.startswith("| `")]


def test_pruning_sweep_lists_each_run_at_its_target_row(tmp_path, monkeypatch):
    rows = _sweep_rows("pruning_sweep", {"pruning_quality.json": _pruning_run(64, 0.5, -0.561, "missed"),
                                         "pruning_quality_b.json": _pruning_run(8, 0.05, 0.007, "met"),
                                         "pruning_quality_smoke.json": _pruning_run(2, 1.0, 0.0, "met")},
                       tmp_path, monkeypatch)
    assert rows == [
        "| `pruning_quality.json` | 64 | 10 | 1 | 0.5 | 0.1 | 8 | 0.061 / 2.400 | 6 | -20.1% | -9.0% | 4 | "
        "-56.1 [-57.1, -54.1] | missed |",
        "| `pruning_quality_b.json` | 8 | 10 | 1 | 0.05 | 0.1 | 8 | 0.061 / 2.400 | 6 | -20.1% | -9.0% | 4 | "
        "+0.7 [-0.3, +2.7] | met |",
    ]  # the smoke run is left out; the -20% row, not the -30% one


def test_advunlearn_sweep_lists_each_run_with_intervals(tmp_path, monkeypatch):
    def run(attack, asr_adv, verdict, stats=True):
        rows = [dict(concept="red", method="esd", asr=1.0, asr_unlearndiffatk_ci95=[0.89, 1.0], train_s=40.0),
                dict(concept="red", method="advunlearn", ua=1.0, ua_ci95=[0.97, 1.0], asr=asr_adv,
                     asr_unlearndiffatk_ci95=[asr_adv - 0.1, asr_adv + 0.05], train_s=900.0)]
        target = dict(estimate=asr_adv - 0.5, ci95=[asr_adv - 0.6, asr_adv - 0.4], verdict=verdict)
        return dict(setting=dict(methods=["esd", "advunlearn"], concepts=["red"], adv_steps=200, adv_lr=2e-4,
                                 adv_attack=attack), results=rows,
                    targets={"red": {"advunlearn_asr_le_half_esd": target}}, **({"stats": {}} if stats else {}))

    rows = _sweep_rows("advunlearn_sweep", {"erasure_methods.json": run("sign", 0.875, "missed"),
                                            "erasure_methods_adam.json": run("adam", 0.25, "met"),
                                            "erasure_methods_old.json": run("sign", 0.5, "missed", stats=False),
                                            "erasure_methods_smoke.json": run("sign", 0.0, "met")},
                       tmp_path, monkeypatch)
    assert rows == [
        "| `erasure_methods.json` | red | 200 | 0.0002 | sign | 900 | 100.0% [97.0, 100.0] | 87.5% [77.5, 92.5] | "
        "100.0% [89.0, 100.0] | +37.5 [+27.5, +47.5] | missed |",
        "| `erasure_methods_adam.json` | red | 200 | 0.0002 | adam | 900 | 100.0% [97.0, 100.0] | 25.0% [15.0, 30.0] | "
        "100.0% [89.0, 100.0] | -25.0 [-35.0, -15.0] | met |"]


def test_erasure_lora_sweep_lists_each_lora_setting_with_its_rate(tmp_path, monkeypatch):
    def run(scale, ua_r16, verdict):  # the rates come from the jobs' recorded configs
        rows = [dict(concept="striped", method="esd-full", ua=0.977, ua_ci95=[0.933, 0.992], train_s=39.0,
                     storage_kib=1319.0),
                dict(concept="striped", method="esd-r16", ua=ua_r16, ua_ci95=[ua_r16 - 0.07, ua_r16 + 0.04],
                     train_s=61.0, storage_kib=386.4)]
        comp = {"esd-r16-striped": {"ua": dict(difference=ua_r16 - 0.977, ci95=[ua_r16 - 1.03, ua_r16 - 0.94]),
                                    "verdict_ua_within_5pt": verdict}}
        jobs = {"esd-full-striped": {"config": {"lr": 5e-4}}, "esd-r16-striped": {"config": {"lr": 5e-4 * scale}}}
        return dict(setting={}, results=rows, comparisons=comp, details=jobs)

    rows = _sweep_rows("erasure_lora_sweep", {"erasure_lora.json": run(1, 0.891, "not resolved at this n"),
                                              "erasure_lora_lr4.json": run(4, 0.969, "not resolved at this n"),
                                              "erasure_lora_smoke.json": run(1, 1.0, "met")},
                       tmp_path, monkeypatch)
    assert rows == [
        "| `erasure_lora.json` | striped | esd-r16 | 0.0005 (1 x full's) | 61 | 386 | 89.1% [82.1, 93.1] | "
        "-8.6 [-13.9, -4.9] | not resolved at this n |",
        "| `erasure_lora_lr4.json` | striped | esd-r16 | 0.002 (4 x full's) | 61 | 386 | 96.9% [89.9, 100.9] | "
        "-0.8 [-6.1, +2.9] | not resolved at this n |"]
