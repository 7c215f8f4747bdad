"""The erasure tables (benchmarks/report.py: erasure_quality, erasure_methods, erasure_targets, erasure_lora) on
constructed results with known counts: every rate with its n and the Wilson interval (recomputed here from the
formula), every target with the verdict its interval gives (met / missed / not resolved at this n), files from
before the intervals rendered as stale, and the LoRA table owed until its JSON exists."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
spec = importlib.util.spec_from_file_location("_bench_report", BENCH / "report.py")
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)

import erasure_lora  # noqa: E402
import erasure_methods  # noqa: E402
import erasure_quality  # noqa: E402

from diffkit.evaluation import rate  # noqa: E402
from diffkit.evaluation.concepts import outcome_intervals  # noqa: E402

N = 128  # images a group
A = 32  # attack prompts
FACTORS = {"star": "object", "red": "color", "striped": "style"}
STALE = "_stale: measured on earlier weights before intervals; re-run `python -m benchmarks.quality --only {}`._"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927), written out independently of diffkit.evaluation.stats."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_cell(k: int, n: int) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def hits(k: int, n: int = N, start: int = 0) -> list[int]:
    """n outcomes, the ``k`` from ``start`` (cyclically) 1."""
    return [int((i - start) % n < k) for i in range(n)]


def outcomes(ua=N, syn=N, ira=N, cra=N, ira_start=0, ira_unscored=0) -> dict:
    """Per-image outcomes as ``erasure_report`` stores them; ``ira_unscored`` images (the last) score no IRA."""
    ira_hits = hits(ira, N - ira_unscored, ira_start) + [None] * ira_unscored
    return {"ua": hits(ua), "ua_synonyms": hits(syn), "ira": ira_hits, "cra": [[h, 1] for h in hits(cra)]}


def job(concept: str, method: str, o: dict, asr_hits=None) -> tuple[dict, dict]:
    """(row, details entry) of one job, as ``erasure_quality.run_jobs`` builds them from a report."""
    scored = {k: [h for h in o[k] if h is not None] for k in ("ua", "ua_synonyms", "ira")}
    rep = dict(n_images={"forget": N, "synonyms": N, "retain": N}, outcomes=o, ci95=outcome_intervals(o),
               cra=sum(c for c, _ in o["cra"]) / sum(s for _, s in o["cra"]),
               **{k: sum(v) / len(v) for k, v in scored.items()})
    row = dict(concept=concept, factor=FACTORS[concept], method=method,
               **{k: rep[k] for k in erasure_quality.RATES}, **erasure_quality.rate_fields(rep))
    entry = dict(report=rep)
    if asr_hits is not None:
        row.update(kid=1.5, kid_std=0.25, asr=sum(asr_hits) / A,
                   train_s=10.0, state_mib=1.0, storage_kib=100.0, peak_rss_gib=0.5,
                   **erasure_quality.rate_columns("pre_attack", rate([False] * A)),
                   **erasure_quality.rate_columns("asr_unlearndiffatk", rate(asr_hits)))
        entry["attack"] = {"unlearndiffatk": {"success": [bool(h) for h in asr_hits]}}
    return row, entry


def setting(methods) -> dict:
    return dict(n_prompts=64, seeds=[0, 1], methods=list(methods), esd_steps=300, salun_steps=100, adv_steps=30,
                doco_steps=30, attack=["unlearndiffatk"], attack_tokens=5, attack_iterations=40, attack_timesteps=10,
                attack_steps=20, attack_prompts=A, probes=[], inference_steps=15, guidance=7.5, note="")


def payload(benchmark: str, jobs, methods, targets_for, **extra) -> dict:
    rows, details = [], {}
    for concept, method, o, asr_hits in jobs:
        row, entry = job(concept, method, o, asr_hits)
        rows.append(row)
        details[f"{method}-{concept}"] = entry
    return dict(benchmark=benchmark, smoke=False, complete=True, environment={"date": "2026-12-01 12:00:00"},
                stats=erasure_quality.STATS, setting=setting(methods), results=rows,
                targets=targets_for(rows, details, list(dict.fromkeys(c for c, *_ in jobs))), details=details, **extra)


def row_of(table: str, *starts: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith("| " + " | ".join(starts) + " |")]
    assert len(rows) == 1, (starts, table)
    return rows[0]


def cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip("|").split("|")]


# -- the four methods and issue 17's targets -------------------------------------------------------------------

def methods_data() -> dict:
    every = lambda: [1] * A  # noqa: E731
    jobs = [
        # star: AdvUnlearn's ASR 0 of 32 against ESD's 32 of 32 (met); SalUn's IRA above ESD's (met)
        ("star", "esd", outcomes(ira=100), every()),
        ("star", "salun", outcomes(ua=100), every()),  # UA 100/128 against the 90% bar: missed
        ("star", "advunlearn", outcomes(ua=116), [0] * A),  # UA 116/128: not resolved against 90%
        ("star", "doco", outcomes(ira=112, ira_unscored=8), every()),  # IRA scored on 120 images
        # red: AdvUnlearn's ASR 32 of 32 against ESD's 0 (missed); SalUn's IRA half of ESD's (missed); DoCo's synonym
        # UA 128 against ESD's 100 (+21.9 points: met against +5)
        ("red", "esd", outcomes(syn=100), [0] * A),
        ("red", "salun", outcomes(ira=64), [0] * A),
        ("red", "advunlearn", outcomes(), every()),
        ("red", "doco", outcomes(), [0] * A),
        # striped: AdvUnlearn's ASR 4 of 32 against ESD's 8 (the same prompts): ASR_adv - 0.5 ASR_esd = 0, its
        # interval straddles 0 (not resolved); SalUn and ESD each miss 4 other IRA images (not resolved)
        ("striped", "esd", outcomes(ira=124, ira_start=4), hits(8, A)),
        ("striped", "salun", outcomes(ira=124), hits(8, A)),
        ("striped", "advunlearn", outcomes(), hits(4, A)),
        ("striped", "doco", outcomes(), hits(8, A)),
    ]
    return payload("erasure_methods", jobs, erasure_methods.METHODS, erasure_methods.check_targets)


def test_methods_table_every_rate_with_its_n_and_wilson_interval():
    data = methods_data()
    table = report.erasure_methods(data)
    head = cells(table.splitlines()[2])
    assert head[:8] == ["concept", "method", "n", "UA forget [95% CI]", "UA synonym [95% CI]", "IRA [95% CI]",
                        "CRA [95% CI]", "KID ± sd"]
    adv = dict(zip(head, cells(row_of(table, "star (object)", "advunlearn"))))
    assert adv["n"] == str(N) and adv["UA forget [95% CI]"] == rate_cell(116, N)
    assert adv["UA synonym [95% CI]"] == rate_cell(N, N) and adv["attack prompts"] == str(A)
    assert adv["ASR unlearndiffatk [95% CI]"] == rate_cell(0, A)
    assert adv["pre-attack [95% CI]"] == rate_cell(0, A)
    assert adv["KID ± sd"] == "1.5 ± 0.2"  # the spread over KID's subsets beside the mean (0.25 -> 0.2)
    assert "raw units" in table and "sd over 100 random subsets" in table  # KID's scale is stated
    doco = dict(zip(head, cells(row_of(table, "star (object)", "doco"))))
    assert doco["IRA [95% CI]"] == rate_cell(112, 120) + " (n=120)"  # its own n where it is not the column's
    esd = dict(zip(head, cells(row_of(table, "striped (style)", "esd"))))
    assert esd["ASR unlearndiffatk [95% CI]"] == rate_cell(8, A)
    lo, hi = outcome_intervals(outcomes())["cra"]  # CRA: the bootstrap over images
    assert esd["CRA [95% CI]"] == f"100.0% [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert "stale" not in table and "—" not in row_of(table, "star (object)", "advunlearn")


def test_methods_targets_verdicts_on_intervals():
    data = methods_data()
    table = report.erasure_targets(data)
    caption, targets = table.split("\n\n", 1)
    assert report.erasure_methods(data).startswith(caption) and report.erasure_methods(data).endswith(targets)
    assert "ASR_adv - 0.5 ASR_esd" in table  # the caption says how the ASR target is judged
    head = cells(row_of(table, "target"))
    assert head == ["target", "star (object)", "red (color)", "striped (style)"]

    def target(label_start: str) -> dict:
        line = next(x for x in table.splitlines() if x.startswith(f"| {label_start}"))
        return dict(zip(head, cells(line)))

    asr = target("AdvUnlearn unlearndiffatk ASR <= half of ESD's")
    assert asr["star (object)"] == "met: -50.0 points [-50.0, -50.0] (n=32)"
    assert asr["red (color)"] == "missed: +100.0 points [+100.0, +100.0] (n=32)"
    assert asr["striped (style)"].startswith("not resolved at this n: +0.0 points [")
    ira = target("SalUn IRA >= ESD's")
    assert ira["star (object)"].startswith("met: +21.9 points")
    assert ira["red (color)"].startswith("missed: -50.0 points")
    assert ira["striped (style)"].startswith("not resolved at this n: +0.0 points")
    doco = target("DoCo UA synonym >= ESD's + 5 points")
    assert doco["star (object)"] == "n/a: no headroom: ESD's is 100.0% (>= 95%)"
    assert doco["red (color)"].startswith("met: +21.9 points")
    ua = target("AdvUnlearn UA forget >= 90%")
    assert ua["star (object)"] == f"not resolved at this n: {rate_cell(116, N)} (n={N})"
    assert ua["red (color)"] == f"met: {rate_cell(N, N)} (n={N})"
    assert target("SalUn UA forget >= 90%")["star (object)"] == f"missed: {rate_cell(100, N)} (n={N})"
    assert target("DoCo IRA >= 80%")["star (object)"] == f"met: {rate_cell(112, 120)} (n=120)"
    for m in ("ESD", "SalUn", "AdvUnlearn", "DoCo"):
        for bar in ("UA forget >= 90%", "IRA >= 80%", "CRA >= 90%"):
            target(f"{m} {bar}")


# -- ESD and SalUn against the original model (issue 6) ----------------------------------------------------------

def test_quality_table_original_rows_and_targets():
    jobs = [("star", "esd", outcomes(ua=120, ira=100), [0] * A), ("star", "salun", outcomes(ira=128), [0] * A)]
    orig_row, orig = job("star", "original", outcomes(ua=2, syn=0))
    data = payload("erasure_quality", jobs, ("esd", "salun"), erasure_quality.quality_targets,
                   originals=[orig_row])
    data["details"]["original-star"] = orig
    table = report.erasure_quality(data)
    head = cells(table.splitlines()[2])
    rows = [line for line in table.splitlines() if line.startswith("| star (object) |")]
    assert [cells(r)[1] for r in rows] == ["original", "esd", "salun"]
    original = dict(zip(head, cells(rows[0])))
    assert original["UA forget [95% CI]"] == rate_cell(2, N) and original["UA synonym [95% CI]"] == rate_cell(0, N)
    assert original["KID ± sd"] == original["attack prompts"] == original["ASR unlearndiffatk [95% CI]"] == "—"
    assert dict(zip(head, cells(rows[1])))["UA forget [95% CI]"] == rate_cell(120, N)  # UA 120/128
    assert "ASR_adv" not in table  # no ASR target in this table
    ua = cells(row_of(table, "ESD UA forget >= 95%"))[1]
    assert ua == f"not resolved at this n: {rate_cell(120, N)} (n={N})"
    assert cells(row_of(table, "SalUn UA forget >= 95%"))[1] == f"met: {rate_cell(N, N)} (n={N})"
    assert cells(row_of(table, "SalUn IRA >= ESD's (SalUn - ESD, paired)"))[1].startswith("met: +21.9 points")
    assert cells(row_of(table, "SalUn CRA >= ESD's (SalUn - ESD, paired)"))[1] == \
        "met: +0.0 points [+0.0, +0.0] (n=128)"


def test_old_format_renders_stale_with_dashes():
    rows = [dict(concept="star", factor="object", method=m, ua=1.0, ua_synonyms=1.0, ira=0.75, cra=1.0, kid=-3.0,
                 asr=0.25, pre_attack=0.0, train_s=20.0, storage_kib=1319.0, state_mib=5.1, peak_rss_gib=0.5)
            for m in ("esd", "salun")]
    report_old = dict(n_images={"forget": 24, "synonyms": 24, "retain": 24},
                      original=dict(ua=0.0, ua_synonyms=0.0, ira=1.0, cra=1.0))
    data = dict(benchmark="erasure_quality", complete=True, environment={"date": "2026-11-25 16:05:29"},
                setting=dict(n_prompts=12, seeds=[0, 1], methods=["esd", "salun"], esd_steps=300, salun_steps=100,
                             attack_prompts=4, attack_steps=20, inference_steps=15, guidance=7.5),
                results=rows, targets={"star": {"esd_ua_ge_95": True, "salun_ira_ge_esd": False}},
                details={f"{m}-star": {"report": report_old} for m in ("esd", "salun")})
    table = report.erasure_quality(data)
    assert table.startswith(STALE.format("erasure_quality"))
    head = cells(table.splitlines()[2])
    original = dict(zip(head, cells(row_of(table, "star (object)", "original"))))
    assert original["n"] == "24" and original["UA forget [95% CI]"] == "0.0% [—]"
    esd = dict(zip(head, cells(row_of(table, "star (object)", "esd"))))
    assert esd["IRA [95% CI]"] == "75.0% [—]" and esd["ASR soft-prompt [95% CI]"] == "25.0% [—]"
    assert cells(row_of(table, "salun ira ge esd"))[1] == "— (point estimates: did not hold)"
    assert "not judged on intervals" in table
    methods = report.erasure_methods(dict(data, benchmark="erasure_methods"))
    assert methods.startswith(STALE.format("erasure_methods")) and "| star (object) | original |" not in methods


# -- LoRA ranks against full fine-tuning (issue 20) -----------------------------------------------------------

def test_lora_table_owed_then_rendered(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    assert report.render("erasure_lora") == (f"_owed: run `{report.LORA_COMMAND}` (ESD and AdvUnlearn, "
                                             "full fine-tuning against LoRA ranks 4 and 16; not measured yet)._")
    # the documented command parses, with erasure_methods' protocol, and reuses its full fine-tuning rows
    args = erasure_lora.parser().parse_args(report.LORA_COMMAND.split()[2:])
    assert args.reuse == "benchmarks/results/erasure_methods.json" and args.attack == ["unlearndiffatk"]
    jobs = [("red", "esd-full", outcomes(ua=128), [0] * A), ("red", "esd-r16", outcomes(ua=120), [0] * A),
            ("red", "esd-r4", outcomes(ua=64), [0] * A)]
    data = payload("erasure_lora", jobs, ("esd-full", "esd-r4", "esd-r16"),
                   lambda rows, details, concepts: erasure_lora.comparisons(details, concepts,
                                                                             ["esd-full", "esd-r4", "esd-r16"]))
    data["comparisons"] = data.pop("targets")
    table = report.erasure_lora(data)
    head = cells(table.splitlines()[2])
    r16 = dict(zip(head, cells(row_of(table, "red (color)", "esd-r16"))))
    assert r16["UA forget [95% CI]"] == rate_cell(120, N)
    assert r16["UA - full, points [95% CI]"].startswith("-6.2 [")
    assert r16["UA - full >= -5 points"] == "not resolved at this n"
    r4 = dict(zip(head, cells(row_of(table, "red (color)", "esd-r4"))))
    assert r4["UA - full >= -5 points"] == "missed"
    full = dict(zip(head, cells(row_of(table, "red (color)", "esd-full"))))
    assert full["UA - full >= -5 points"] == "—"
    assert "are erasure_methods.json's" not in table
    reused = report.erasure_lora(dict(data, reused=dict(methods=["esd-full"], source="erasure_methods.json")))
    assert ("The full fine-tuning rows (esd-full) are erasure_methods.json's, the same jobs (settings checked)."
            in reused)


def test_lora_jobs_are_the_methods_jobs_on_lora_at_the_chosen_learning_rate(capsys):
    base = report.LORA_COMMAND.split()[2:]
    args = erasure_lora.parser().parse_args(base)
    assert args.lora_lr_scale is None  # a file from before the flag resumes with the same settings
    full, r16 = (erasure_lora.lora_config(m, "star", args) for m in ("esd-full", "esd-r16"))
    assert full == erasure_methods.method_config("esd", "star", args) and full.parametrization == "full"
    assert r16 == full.replace(parametrization="lora", lora_rank=16, lora_alpha=None)
    assert r16.lr == 5e-4 and r16.lora_rank == 16
    scaled = erasure_lora.parser().parse_args([*base, "--lora-lr-scale", "10"])
    assert erasure_lora.lora_config("esd-r16", "star", scaled).lr == pytest.approx(5e-3)
    assert erasure_lora.lora_config("esd-full", "star", scaled) == full  # full fine-tuning keeps its rate
    adv = erasure_lora.lora_config("advunlearn-r4", "red", scaled)
    assert adv.lr == pytest.approx(2e-3) and adv.method == "advunlearn" and adv.lora_rank == 4
    for bad in ("0", "-2"):  # 0 would train nothing; it used to fall back to 1 silently
        with pytest.raises(SystemExit):
            erasure_lora.parser().parse_args([*base, "--lora-lr-scale", bad])
        assert f"argument --lora-lr-scale: must be > 0, got {bad}" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["ua", "ira", "cra"])
def test_paired_difference_of_identical_outcomes_is_zero(key):
    o = outcomes(ua=100, ira=90, cra=110, ira_unscored=4)
    assert erasure_quality.paired_rate_difference(o, o, key)["ci95"] == [0.0, 0.0]


def test_doco_jobs_train_at_the_chosen_adversarial_weight():
    args = erasure_methods.parser().parse_args(["--doco-steps", "200"])
    job = erasure_methods.method_config("doco", "striped", args)
    assert job.options == {"discriminator_warmup": 50, "adversarial_weight": 1.0}  # the reference's weight
    weaker = erasure_methods.parser().parse_args(["--doco-steps", "200", "--doco-adv-weight", "0.25"])
    assert erasure_methods.method_config("doco", "striped", weaker).options["adversarial_weight"] == 0.25
    # a results file from before the flag was measured at the reference's weight: it still resumes and reuses
    assert erasure_quality.differing_settings({}, args, ["doco_adv_weight", "attack_seeds"]) == []
    assert erasure_quality.differing_settings({}, weaker, ["doco_adv_weight"]) == ["doco_adv_weight"]


def test_attack_seeds_must_be_at_least_one(capsys):
    ap = erasure_quality.protocol_parser("", ("esd",))
    assert ap.parse_args(["--attack-seeds", "2"]).attack_seeds == 2
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit):
            ap.parse_args(["--attack-seeds", bad])
        assert f"argument --attack-seeds: must be >= 1, got {bad}" in capsys.readouterr().err


def test_report_and_the_benchmarks_agree_on_the_settings_old_files_predate():
    # report.py does not import the benchmarks, so it keeps its own copy of the defaults
    assert report.SETTING_DEFAULTS == erasure_quality.SETTING_DEFAULTS
