"""Every generated table in README.md and docs/ equals what benchmarks/report.py writes from the JSON."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

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

    adam = run("adam", 0.25, "met")
    adam["results"][1]["asr_unlearndiffatk_n"] = 64  # a two-seed run: its n shown
    rows = _sweep_rows("advunlearn_sweep", {"erasure_methods.json": run("sign", 0.875, "missed"),
                                            "erasure_methods_adam.json": adam,
                                            "erasure_methods_old.json": run("sign", 0.5, "missed", stats=False),
                                            "erasure_methods_smoke.json": run("sign", 0.0, "met")},
                       tmp_path, monkeypatch)
    assert rows == [
        "| `erasure_methods.json` | red | 200 | 0.0002 | sign | 900 | 100.0% [97.0, 100.0] | — | 87.5% [77.5, 92.5] | "
        "100.0% [89.0, 100.0] | +37.5 [+27.5, +47.5] | missed |",
        "| `erasure_methods_adam.json` | red | 200 | 0.0002 | adam | 900 | 100.0% [97.0, 100.0] | 64 | "
        "25.0% [15.0, 30.0] | 100.0% [89.0, 100.0] | -25.0 [-35.0, -15.0] | met |"]


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


def _erasure_run(concepts, verdicts, **setting) -> dict:
    """A results file of erasure_methods' shape: ESD and AdvUnlearn rows per concept, AdvUnlearn's attack target
    with the given verdict per concept."""
    rows = [dict(concept=c, factor="object", method=m, ua=1.0, ua_ci95=[0.97, 1.0], ua_synonyms=1.0, ira=0.9,
                 cra=0.9, asr=0.5, asr_unlearndiffatk=0.5, asr_unlearndiffatk_ci95=[0.3, 0.7], asr_unlearndiffatk_n=32,
                 train_s=10.0)
            for c in concepts for m in ("esd", "advunlearn")]
    label = "AdvUnlearn unlearndiffatk ASR <= half of ESD's"
    targets = {c: {"advunlearn_asr_le_half_esd": dict(label=label, kind="difference", estimate=0.1,
                                                      ci95=[0.0, 0.2], n=32, target="<= 0", verdict=v)}
               for c, v in zip(concepts, verdicts)}
    s = dict(concepts=list(concepts), methods=["esd", "advunlearn"], esd_steps=300, esd_lr=5e-4, n_prompts=64,
             seeds=[0, 1], inference_steps=15, guidance=7.5, attack_prompts=32, attack=["unlearndiffatk"], probes=[],
             tag="", reuse=None, **setting)
    return dict(setting=s, stats={}, complete=True, environment=dict(date="2026-12-07T00:00"), results=rows,
                details={}, targets=targets)


def test_six_concept_runs_merge_only_with_equal_settings():
    a = _erasure_run(["star", "red", "striped"], ["missed"] * 3)
    b = _erasure_run(["circle", "blue", "dotted"], ["met"] * 3)
    b["setting"].update(tag="_new", reuse="x.json")  # how it was run may differ
    merged = report.merge_erasure_runs([a, b])
    assert merged["setting"]["concepts"] == ["star", "red", "striped", "circle", "blue", "dotted"]
    assert [(r["concept"], r["method"]) for r in merged["results"]][::2] == [
        (c, "esd") for c in ["star", "red", "striped", "circle", "blue", "dotted"]]
    assert set(merged["targets"]) == set(merged["setting"]["concepts"])
    other = _erasure_run(["circle"], ["met"])
    other["setting"]["esd_steps"] = 1000
    with pytest.raises(ValueError, match=r"other settings cannot share a table: esd_steps \(300 / 1000\)"):
        report.merge_erasure_runs([a, other])
    with pytest.raises(ValueError, match="concepts measured in more than one run: red"):
        report.merge_erasure_runs([a, _erasure_run(["red"], ["met"])])


@pytest.mark.parametrize("verdicts, overall", [
    (["met"] * 4 + ["missed"] * 2, "met"),
    (["met"] * 3 + ["not resolved at this n"] + ["missed"] * 2, "not resolved at this n"),
    (["met"] * 2 + ["not resolved at this n"] + ["missed"] * 3, "missed"),
])
def test_the_half_of_esd_target_is_counted_over_the_concepts(verdicts, overall):
    concepts = ["star", "red", "striped", "circle", "blue", "dotted"]
    lines = report._target_counts(_erasure_run(concepts, verdicts))
    row = next(ln for ln in lines if ln.startswith("| AdvUnlearn"))
    met = [c for c, v in zip(concepts, verdicts) if v == "met"]
    assert row.split(" | ")[1] == f"{len(met)} ({', '.join(met)})"
    open_ = verdicts.count("not resolved at this n")
    assert lines[-1] == (f"AdvUnlearn's attack success <= half of ESD's on >= 4 of 6 concepts: **{overall}** "
                         f"(met on {len(met)}, not resolved on {open_}).")


def test_the_six_concept_command_is_the_documented_run_on_the_other_concepts():
    import importlib
    import shlex
    import sys

    sys.path.insert(0, str(ROOT))
    quality = importlib.import_module("benchmarks.quality")
    documented = list(quality.by_name()["erasure_methods"].args)
    i = documented.index("--reuse")
    del documented[i:i + 2]  # erasure_quality has no rows for the other concepts
    command = shlex.split(report.SIX_COMMAND)
    assert command[:2] == ["python", "benchmarks/erasure_methods.py"]
    assert command[2:] == documented + ["--concepts", "circle", "blue", "dotted", "--tag", "_new"]
    assert report.SIX_FILES == ("erasure_methods.json", "erasure_methods_new.json")


def test_the_six_concept_table_is_owed_until_both_runs_exist(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    (tmp_path / "erasure_methods.json").write_text(json.dumps(_erasure_run(["star"], ["met"])))
    assert report.render("erasure_six") == f"_owed: erasure_methods_new.json (run `{report.SIX_COMMAND}`)._"
    (tmp_path / "erasure_methods_new.json").write_text(json.dumps(_erasure_run(["circle"], ["missed"])))
    table = report.render("erasure_six")
    assert table.startswith("Merged from `erasure_methods.json` and `erasure_methods_new.json`")
    assert sum(ln.startswith("| circle (object) | ") for ln in table.splitlines()) == 2  # esd, advunlearn


def test_the_six_concept_table_takes_each_concepts_original_row_from_a_run_of_the_same_protocol():
    six = report.merge_erasure_runs([_erasure_run(["star"], ["met"]), _erasure_run(["circle"], ["met"])])

    def source(concepts, ua, **setting):
        data = _erasure_run(concepts, ["met"] * len(concepts))
        data["setting"].update(setting)
        data["originals"] = [dict(concept=c, factor="object", method="original", ua=ua, ua_ci95=[0.0, 0.03],
                                  ua_synonyms=0.0, ira=0.86, cra=1.0, n_images=dict(forget=128)) for c in concepts]
        return data

    rows = report.six_originals(six, [source(["star", "red"], 0.0), source(["circle"], 0.1, esd_steps=1000)])
    assert [(o["concept"], o["ua"]) for o in rows] == [("star", 0.0), ("circle", 0.1)]  # training may differ
    table = report.erasure_six([_erasure_run(["star"], ["met"]), _erasure_run(["circle"], ["met"]),
                                source(["star"], 0.0), source(["circle"], 0.1)])
    methods = [ln.split(" | ")[1] for ln in table.splitlines() if ln.startswith(("| star (", "| circle ("))]
    assert methods[:6] == ["original", "esd", "advunlearn", "original", "esd", "advunlearn"]
    assert "| circle (object) | original | 128 | 10.0% [0.0, 3.0] |" in table
    with pytest.raises(ValueError, match="original rows measured with other settings: seeds"):
        report.six_originals(six, [source(["star", "circle"], 0.0, seeds=[0])])
    with pytest.raises(ValueError, match="no original rows for circle"):
        report.six_originals(six, [source(["star"], 0.0)])


def _with_attacks(data: dict, outcomes: dict) -> dict:
    """``data`` with each job's UnlearnDiffAtk outcomes (``{(concept, method): [bool, ...]}``) in its details and
    the rows' ASR, n and a stand-in interval set from them."""
    for r in data["results"]:
        hits = outcomes[(r["concept"], r["method"])]
        data["details"][f"{r['method']}-{r['concept']}"] = {"attack": {"unlearndiffatk": {"success": hits}}}
        r.update(asr_unlearndiffatk=sum(hits) / len(hits), asr_unlearndiffatk_n=len(hits),
                 asr_unlearndiffatk_ci95=[0.0, 1.0])
    return data


def test_the_two_seed_attack_table_sets_each_job_beside_its_one_seed_run(tmp_path, monkeypatch):
    import json
    import shlex

    one_seed = {("star", "esd"): [True, False, False, False], ("star", "advunlearn"): [False, True, False, False]}
    # copy 0 (the first four instances) as the one-seed run had it, but for one of AdvUnlearn's
    two_seeds = {("star", "esd"): [True, False, False, False, True, True, False, False],
                 ("star", "advunlearn"): [False, False, False, False, False, False, False, True]}
    a = _with_attacks(_erasure_run(["star"], ["missed"]), one_seed)
    b = _with_attacks(_erasure_run(["circle"], ["met"]), {("circle", m): [False] * 4 for m in ("esd", "advunlearn")})
    two = _with_attacks(_erasure_run(["star"], ["met"], attack_seeds=2), two_seeds)
    two["setting"].update(tag="_seeds2", resume=True)
    two["results"][1]["ira"] = 0.5  # AdvUnlearn trained to other weights: flagged
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    for name, data in (("erasure_methods.json", a), ("erasure_methods_new.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
    assert report.render("erasure_attack_seeds") == (
        f"_owed: erasure_methods_seeds2.json (run `{report.SEEDS2_COMMAND}`)._")
    (tmp_path / "erasure_methods_seeds2.json").write_text(json.dumps(two))
    rows = [ln for ln in report.render("erasure_attack_seeds").splitlines() if ln.startswith("| star")]
    assert [r.split(" | ")[1:7] for r in rows] == [
        ["esd", "100.0% [97.0, 100.0]", "yes", "25.0% [0.0, 100.0] (n=4)", "37.5% [0.0, 100.0] (n=8)", "4/4"],
        ["advunlearn", "100.0% [97.0, 100.0]", "**no**: UA 100.0%, IRA 90.0% there", "25.0% [0.0, 100.0] (n=4)",
         "12.5% [0.0, 100.0] (n=8)",
         "3/4"]]
    assert rows[1].endswith("| missed: +10.0 points [+0.0, +20.0] | met: +10.0 points [+0.0, +20.0] |")
    two["setting"]["esd_steps"] = 1000  # trained otherwise: not the same jobs
    (tmp_path / "erasure_methods_seeds2.json").write_text(json.dumps(two))
    with pytest.raises(ValueError, match="differs from the six-concept runs in esd_steps"):
        report.render("erasure_attack_seeds")
    # the command: the six-concept run's flags, UnlearnDiffAtk alone at two seeds, no probes, all six concepts
    six, seeds2 = shlex.split(report.SIX_COMMAND), shlex.split(report.SEEDS2_COMMAND)
    assert seeds2[seeds2.index("--attack-seeds") + 1] == "2"
    assert seeds2[seeds2.index("--concepts") + 1: seeds2.index("--tag")] == [
        "star", "circle", "red", "blue", "striped", "dotted"]
    trained = lambda cmd: [(f, v) for f, v in zip(cmd, cmd[1:]) if f.endswith(("-steps", "-lr", "-batch", "-images"))]  # noqa: E731
    assert trained(seeds2) == trained(six) and len(trained(six)) == 13
    # the command the docs print is this one
    doc = (ROOT / "docs" / "erasure_part2.md").read_text(encoding="utf-8")
    block = doc.split("### Attack success at 32 prompts x 2 seeds")[1].split("```")[1]
    assert shlex.split(block.replace("\\\n", " ")) == seeds2


def test_esd_sweep_lists_the_runs_that_trained_esd(tmp_path, monkeypatch):
    quality = _erasure_run(["circle"], ["met"])
    longer = _erasure_run(["circle"], ["met"])
    longer["setting"]["esd_steps"] = 1000
    reused = _erasure_run(["circle"], ["met"])
    reused["reused"] = dict(methods=["esd"], source="erasure_quality.json")
    rows = _sweep_rows("esd_sweep", {"erasure_quality.json": quality, "erasure_quality_esd1000.json": longer,
                                     "erasure_methods.json": reused, "erasure_quality_smoke.json": quality},
                       tmp_path, monkeypatch)
    assert [r.split(" | ")[:3] for r in rows] == [["| `erasure_quality.json`", "circle", "300"],
                                                  ["| `erasure_quality_esd1000.json`", "circle", "1000"]]
    assert rows[0].endswith("| 32 | 50.0% [30.0, 70.0] |")


def test_the_caption_names_the_attack_seeds_and_old_files_merge_with_one():
    a = _erasure_run(["star"], ["met"])
    b = _erasure_run(["circle"], ["met"], attack_seeds=1)  # a new file; `a` predates the setting
    assert "attacks over 32 forget prompts: UnlearnDiffAtk" in report._erasure_settings(a)
    assert report.merge_erasure_runs([a, b])["setting"]["concepts"] == ["star", "circle"]
    c = _erasure_run(["circle"], ["met"], attack_seeds=2)
    assert "attacks over 32 forget prompts x 2 seeds: UnlearnDiffAtk" in report._erasure_settings(c)
    with pytest.raises(ValueError, match=r"other settings cannot share a table: attack_seeds \(1 / 2\)$"):
        report.merge_erasure_runs([a, c])


def test_doco_sweep_lists_each_run_with_its_rate_steps_and_weight(tmp_path, monkeypatch):
    def run(lr, weight=None):
        data = _erasure_run(["striped"], ["met"], doco_steps=200, doco_lr=lr,
                            **({} if weight is None else {"doco_adv_weight": weight}))
        data["setting"]["methods"].append("doco")
        data["results"].append(dict(data["results"][0], method="doco", ua=0.344, ua_ci95=[0.267, 0.430]))
        return data

    rows = _sweep_rows("doco_sweep", {"erasure_methods.json": run(5e-4), "erasure_methods_doco.json": run(2e-3, 0.5),
                                      "erasure_methods_smoke.json": run(1.0)}, tmp_path, monkeypatch)
    assert [r.split(" | ")[:7] for r in rows] == [
        ["| `erasure_methods.json`", "striped", "200", "0.0005", "1", "10", "34.4% [26.7, 43.0]"],  # before the flag
        ["| `erasure_methods_doco.json`", "striped", "200", "0.002", "0.5", "10", "34.4% [26.7, 43.0]"]]


def _lora_run(concepts, verdicts, source) -> dict:
    """erasure_lora's shape: esd-full and esd-r16 per concept, r16's claim verdict per concept."""
    data = _erasure_run(concepts, ["met"] * len(concepts))
    data["setting"]["methods"] = ["esd-full", "esd-r16"]
    data["results"] = [dict(r, method=m, storage_kib=100.0) for r in data["results"][::2]
                       for m in ("esd-full", "esd-r16")]
    data["comparisons"] = {f"esd-r16-{c}": {"ua": dict(difference=-0.1, ci95=[-0.2, 0.0]),
                                            "verdict_ua_within_5pt": v} for c, v in zip(concepts, verdicts)}
    data["reused"] = dict(methods=["esd-full"], source=source)
    data["setting"]["reuse"] = f"benchmarks/results/{source}"
    return data


def test_the_lora_table_covers_six_concepts_once_both_runs_exist(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    a = _lora_run(["star", "red", "striped"], ["met", "met", "not resolved at this n"], "erasure_methods.json")
    (tmp_path / "erasure_lora.json").write_text(json.dumps(a))
    three = report.render("erasure_lora_six")
    assert three.startswith(report.erasure_lora(a))
    assert three.endswith(f"_owed: circle, blue and dotted (run `{report.LORA_SIX_COMMAND}`)._")
    b = _lora_run(["circle", "blue", "dotted"], ["missed", "met", "missed"], "erasure_methods_new.json")
    (tmp_path / "erasure_lora_new.json").write_text(json.dumps(b))
    six = report.render("erasure_lora_six").splitlines()
    assert six[0].startswith("Merged from `erasure_lora.json` and `erasure_lora_new.json` (every setting but the "
                             "concepts equal, checked); the full fine-tuning rows are erasure_methods.json's and "
                             "erasure_methods_new.json's")
    assert sum(ln.startswith("| dotted (object) | esd-r16 |") for ln in six) == 1
    assert six[-1] == "| esd-r16 | 3 (star, red, blue) | 2 (circle, dotted) | 1 (striped) |"


def test_the_lora_command_for_the_other_concepts_reuses_their_full_rows():
    import shlex

    documented, other = shlex.split(report.LORA_COMMAND), shlex.split(report.LORA_SIX_COMMAND)
    i = documented.index("--reuse")
    assert other[:i + 1] == documented[:i + 1]
    assert other[i + 1:] == ["benchmarks/results/erasure_methods_new.json", "--concepts", "circle", "blue", "dotted",
                             "--tag", "_new"]
    assert report.LORA_SIX_FILES == ("erasure_lora.json", "erasure_lora_new.json")


def test_a_run_still_going_is_left_out_of_merged_and_side_by_side_tables(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(report, "RESULTS", tmp_path)
    a = _lora_run(["star"], ["met"], "erasure_methods.json")
    (tmp_path / "erasure_lora.json").write_text(json.dumps(a))
    partial = dict(_lora_run(["circle"], ["missed"], "erasure_methods_new.json"), complete=False)
    (tmp_path / "erasure_lora_new.json").write_text(json.dumps(partial))
    assert report.render("erasure_lora_six").endswith("_owed: circle, blue and dotted (run "
                                                      f"`{report.LORA_SIX_COMMAND}`)._")
    (tmp_path / "erasure_methods.json").write_text(json.dumps(dict(_erasure_run(["star"], ["met"]), complete=False)))
    assert report.render("esd_sweep").count("| `") == 0
