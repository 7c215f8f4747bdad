"""The guidance, DeepCache and pruning quality tables (benchmarks/report.py) on constructed results with known
outcomes: every rate with its n and the Wilson interval (recomputed here from the formula), every comparison
with its paired interval and verdict; files from before the per-image outcomes render as stale."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _load("report")
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402

from diffkit.evaluation import paired_difference, verdict  # noqa: E402

N = 256
PROMPTS = [f"prompt {i}" for i in range(N)]
STALE = "stale: measured before intervals, re-run `python -m benchmarks.quality --only {}`"


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson (1927), written out independently of diffkit.evaluation.stats."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def rate_cell(k: int, n: int = N) -> str:
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def oracle_reading(object_hits: int, seed: int = 0):
    """A ConceptResult-like reading of N images: the first ``object_hits`` objects right, every color right,
    every style right; images are random 4x4 pictures (PSNR against another reading's is finite)."""
    expected = {f: ["a"] * N for f in ("object", "color", "style")}
    predicted = {"object": ["a"] * object_hits + ["b"] * (N - object_hits), "color": ["a"] * N, "style": ["a"] * N}
    images = np.random.default_rng(seed).integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    return SimpleNamespace(prompts=PROMPTS, expected=expected, predicted=predicted, images=images, n_images=N)


def row_of(table: str, start: str) -> str:
    rows = [line for line in table.splitlines() if line.startswith(start)]
    assert len(rows) == 1, (start, table)
    return rows[0]


def expected_change(a_hits: int, b_hits: int, target: float) -> tuple[str, str]:
    """The change in mean accuracy (points) with its paired interval, and its verdict, computed from the
    per-image accuracies (object hits share one third of an image's accuracy)."""
    a = np.r_[np.ones(a_hits), np.zeros(N - a_hits)] / 3 + 2 / 3
    b = np.r_[np.ones(b_hits), np.zeros(N - b_hits)] / 3 + 2 / 3
    d = paired_difference(a, b, groups=PROMPTS)
    return (f"{100 * d.estimate:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]",
            verdict(d.low, d.high, target, ">="))


# -- DeepCache ---------------------------------------------------------------------------------------------

@functools.cache
def deepcache_results() -> str:
    """The JSON text of a DeepCache run on constructed readings (object right on 230 / 228 / 214 / 200 images)."""
    base_reading = oracle_reading(230, seed=0)
    base = dict(config="no-cache", interval=1, schedule="-", **_common.versus_baseline(base_reading, PROMPTS))
    rows = [base]
    for n, hits in ((2, 228), (3, 214), (5, 200)):
        rows.append(dict(config=f"N={n} uniform b=0", interval=n, schedule="uniform", **_common.versus_baseline(
            oracle_reading(hits, seed=n), PROMPTS, base, base_reading.images, 0.02)))
    return json.dumps(dict(
        benchmark="deepcache_quality", environment={"date": "2026-01-02 03:04:05"}, stats=_common.STATS,
        setting=dict(n_images=N, steps=50, guidance_scale=7.5, branch=0, device="cpu"), accuracy_margin=0.02,
        target_interval=3, items=dict(prompts=PROMPTS, seeds=[0] * N), results=rows))


@pytest.mark.parametrize("n, hits, verdict_", [(2, 228, "met"), (3, 214, "not resolved at this n"),
                                               (5, 200, "missed")])
def test_deepcache_rates_intervals_and_verdicts(n, hits, verdict_):
    data = json.loads(deepcache_results())
    table = report.deepcache_quality(data)
    row = row_of(table, f"| uniform | {n} | {N} |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == rate_cell(hits)                        # object: k of 256 with its Wilson interval
    assert cells[5] == cells[6] == rate_cell(N)               # color and style: 256 of 256
    change, v = expected_change(hits, 230, -0.02)
    assert v == verdict_
    assert cells[8:] == [change, verdict_]
    assert cells[3].endswith("]") and "dB [" in cells[3]      # PSNR vs no cache with its interval
    base = row_of(table, "| — | 1 (no cache) |")
    assert rate_cell(230) in base and base.endswith("| — | — |")
    assert "95% intervals: Wilson" in table and "stale" not in table
    assert ">= -2 points (target at N = 3)" in table


def test_deepcache_old_file_is_stale():
    old = dict(benchmark="deepcache_quality", environment={"date": "2026-01-02"},
               setting=dict(n_images=256, steps=50, guidance_scale=7.5, branch=0, device="cpu"),
               results=[dict(config="no-cache", interval=1, schedule="-", psnr_db=float("inf"),
                             accuracy={"object": 0.9375, "color": 0.95, "style": 0.75}, mean_accuracy=0.8791,
                             delta_points=0.0),
                        dict(config="N=3 uniform b=0", interval=3, schedule="uniform", psnr_db=37.36,
                             accuracy={"object": 0.94, "color": 0.96, "style": 0.77}, mean_accuracy=0.89,
                             delta_points=0.52)])
    table = report.deepcache_quality(old)
    assert STALE.format("deepcache_quality") in table.splitlines()[0]
    assert row_of(table, "| uniform | 3 |") == ("| uniform | 3 | 256 | 37.4 dB [—] | 94.0% [—] | 96.0% [—] | "
                                                "77.0% [—] | 89.0% [—] | +0.5 [—] | — |")


# -- pruning -----------------------------------------------------------------------------------------------

@functools.cache
def pruning_results() -> str:
    """The JSON text of a pruning run on constructed readings (object right on 230 / 200 / 224 / 190 images)."""
    base_reading = oracle_reading(230, seed=0)
    base = dict(target=0.0, masks="none", **_common.versus_baseline(base_reading, PROMPTS), kid=0.0,
                param_reduction=0.0, mac_reduction=0.0)
    rows = [base]
    for target, hits in ((0.1, 200), (0.2, 224), (0.3, 190)):
        rows.append(dict(target=target, masks="learned", **_common.versus_baseline(
            oracle_reading(hits, seed=int(target * 10)), PROMPTS, base, base_reading.images, 0.03),
            kid=0.0, param_reduction=target + 0.01, mac_reduction=target / 2))
    return json.dumps(dict(
        benchmark="pruning_quality", environment={"date": "2026-01-02"}, stats=_common.STATS,
        setting=dict(n=N, steps=50, guidance_scale=7.5, calib=64, learn_steps=25, epochs=4, device="cpu"),
        accuracy_margin=0.03, target_reduction=0.2, items=dict(prompts=PROMPTS, seeds=[0] * N), results=rows))


@pytest.mark.parametrize("target, hits, verdict_", [(0.1, 200, "not resolved at this n"), (0.2, 224, "met"),
                                                    (0.3, 190, "missed")])
def test_pruning_rates_intervals_and_verdicts(target, hits, verdict_):
    table = report.pruning_quality(json.loads(pruning_results()))
    row = row_of(table, f"| learned | {-100 * (target + 0.01):+.1f}% |")
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == f"{-100 * target / 2:+.1f}%" and cells[3] == str(N)
    assert cells[5] == rate_cell(hits) and cells[6] == cells[7] == rate_cell(N)
    change, v = expected_change(hits, 230, -0.03)
    assert v == verdict_
    assert cells[9:] == [change, verdict_]
    assert ">= -3 points (target at -20%)" in table
    assert rate_cell(230) in row_of(table, "| none (unpruned) |")


def test_pruning_old_file_is_stale():
    old = dict(benchmark="pruning_quality", environment={"date": "2026-01-02"},
               setting=dict(n=64, steps=20, guidance_scale=7.5, calib=8, learn_steps=10, epochs=1, device="cpu"),
               results=[dict(target=0.0, masks="none", accuracy={"object": 0.9375}, mean_accuracy=0.9375,
                             delta_points=0.0, psnr_db=float("inf"), param_reduction=0.0, mac_reduction=0.0),
                        dict(target=0.2, masks="learned", accuracy={"object": 0.953125}, mean_accuracy=0.953125,
                             delta_points=1.5625, psnr_db=25.79, param_reduction=0.2116, mac_reduction=0.0955)],
               target_met=True)
    table = report.pruning_quality(old)
    assert STALE.format("pruning_quality") in table.splitlines()[0]
    assert row_of(table, "| learned |") == ("| learned | -21.2% | -9.6% | 64 | 25.8 dB [—] | 95.3% [—] | 95.3% [—] | "
                                            "+1.6 [—] | — |")


# -- guidance ----------------------------------------------------------------------------------------------

def guidance_results() -> dict:
    gq = _load("guidance_quality")
    rng = np.random.default_rng(1)
    sat = 0.25 + 0.02 * rng.standard_normal(N)
    rows = [dict(setting="cfg_15", guidance="CFG(15)", **gq.quality_figures(sat, oracle_reading(230), PROMPTS)),
            dict(setting="apg_15", guidance="APG(15)", **gq.quality_figures(
                sat - 0.02 + 0.002 * rng.standard_normal(N), oracle_reading(200), PROMPTS))]
    inv_prompts, seeds = PROMPTS[:16], list(range(100_000, 100_016))
    cfg_psnr = 17 + rng.standard_normal(16)
    inversion = [gq.inversion_row("own", "cfgpp_0.6", cfg_psnr + 3 + 0.1 * rng.standard_normal(16), inv_prompts,
                                  seeds, 50),
                 gq.inversion_row("own", "cfg_7.5", cfg_psnr, inv_prompts, seeds, 50)]
    return dict(benchmark="guidance_quality", environment={"date": "2026-01-02"}, stats=_common.STATS,
                config=dict(model="reference", n=N, steps=25, norm_threshold=2.65, inversion_n=16, inversion_steps=50),
                accuracy_margin=gq.ACCURACY_MARGIN, items=dict(prompts=PROMPTS, seeds=list(range(N))),
                quality=rows, inversion=inversion, targets=gq.targets(rows, inversion, PROMPTS))


def test_guidance_rates_intervals_and_verdicts():
    data = json.loads(json.dumps(guidance_results()))
    table = report.guidance_quality(data)
    apg = [c.strip() for c in row_of(table, "| apg_15 |").strip("|").split("|")]
    assert apg[1] == str(N) and apg[3] == rate_cell(200) and apg[4] == apg[5] == rate_cell(N)
    assert rate_cell(230) in row_of(table, "| cfg_15 |")
    sat = row_of(table, "| APG 15 less saturated than CFG 15")
    acc = row_of(table, "| APG 15 at least as accurate as CFG 15 (difference >= -2 points)")
    inv = row_of(table, "| CFG++ 0.6 inverts with a higher PSNR than CFG 7.5, own images")
    assert sat.endswith("| met |") and inv.endswith("| met |") and acc.endswith("| missed |")
    change, v = expected_change(200, 230, -0.02)
    assert v == "missed" and f"{change.replace(' [', ' points [')} | missed |" in acc
    assert f"| {N} | {apg[6]} | " in acc  # A's mean accuracy with its interval, as in the settings table
    t = data["targets"]["cfgpp_psnr_above_cfg (own)"]
    assert t["n"] == 16 and t["target"] == ">= 0" and t["ci95"][0] > 0
    assert all(r["n"] == N and len(r["outcomes"]["object"]) == N for r in data["quality"])


def test_guidance_old_file_is_stale():
    """A file from before the intervals (the third weights' run had this shape): no stats, point estimates only."""
    def quality(name, sat, acc):
        return dict(setting=name, n=256, saturation=sat, acc_object=acc, acc_color=acc, acc_style=acc, acc_mean=acc)

    def inversion(images, method, psnr):
        return dict(images=images, method=method, n=16, steps=50, psnr_mean=psnr, psnr_std=8.0)

    old = dict(benchmark="guidance_quality", environment={"date": "2026-11-25 15:51:01"},
               config=dict(model="reference", n=256, steps=25, norm_threshold=2.65, scheduler="DDIMScheduler",
                           inversion_n=16, inversion_steps=50),
               quality=[quality("cfg_15", 0.251, 0.793), quality("apg_15", 0.222, 0.677),
                        quality("cfgpp_0.6", 0.217, 0.958)],
               inversion=[inversion("common (CFG 3)", "cfgpp_0.6", 20.2), inversion("common (CFG 3)", "cfg_7.5", 17.5),
                          inversion("own", "cfgpp_0.6", 20.9), inversion("own", "cfg_7.5", 16.7)],
               targets={"apg15_saturation_below_cfg15": True, "apg15_accuracy_at_least_cfg15": False,
                        "cfgpp_psnr_above_cfg (common (CFG 3))": True, "cfgpp_psnr_above_cfg (own)": True})
    table = report.guidance_quality(old)
    assert STALE.format("guidance_quality") in table.splitlines()[0]
    assert row_of(table, "| APG 15 less saturated than CFG 15").endswith("[—] | — |")


# -- the benchmarks' smoke runs write what the tables read --------------------------------------------------

def _oracle_or_skip():
    from diffkit.zoo import load_reference_classifier

    try:
        load_reference_classifier()
    except FileNotFoundError as e:
        pytest.skip(f"reference oracle missing: {e}")


def _redirect_results(monkeypatch, module, tmp_path):
    monkeypatch.setattr(module, "RESULTS", tmp_path)
    monkeypatch.setattr(sys.modules["_common"], "RESULTS", tmp_path)


def test_deepcache_smoke_json_renders(tmp_path, monkeypatch):
    _oracle_or_skip()
    dq = _load("deepcache_quality")
    _redirect_results(monkeypatch, dq, tmp_path)
    assert dq.main(["--smoke", "--device", "cpu"]) == 0
    data = json.loads((tmp_path / "deepcache_quality_smoke.json").read_text())
    assert data["items"]["seeds"] == [0] * 8 and len(data["items"]["prompts"]) == 8
    for r in data["results"]:
        assert r["n"] == 8 and set(r["rates"]) == set(r["outcomes"]) and len(r["per_image_accuracy"]) == 8
    assert set(data["target"]) == {"N=3 uniform b=0", "N=3 non-uniform b=0"}
    table = report.deepcache_quality(data)
    assert len([line for line in table.splitlines() if line.startswith("| uniform |")]) == 3


def test_guidance_smoke_json_renders(tmp_path, monkeypatch):
    _oracle_or_skip()
    gq = _load("guidance_quality")
    _redirect_results(monkeypatch, gq, tmp_path)
    assert gq.main(["--model", "tiny", "--n", "4", "--inversion-n", "2", "--steps", "3", "--inversion-steps", "3",
                    "--cfg-scales", "15", "--lambdas", "0.6"]) == 0
    data = json.loads((tmp_path / "guidance_quality_smoke.json").read_text())
    assert data["items"] == {"prompts": data["items"]["prompts"], "seeds": [0, 1, 2, 3]}
    assert {r["setting"] for r in data["quality"]} == {"cfg_15", "apg_15", "cfgpp_0.6"}
    assert all(len(r["per_image_saturation"]) == 4 and "outcomes" in r for r in data["quality"])
    assert all(len(r["per_image_psnr"]) == 2 for r in data["inversion"])
    assert {t["verdict"] for t in data["targets"].values()} <= {"met", "missed", "not resolved at this n"}
    assert len(data["targets"]) == 4
    table = report.guidance_quality(data)
    assert "stale" not in table and len(table.splitlines()) == 2 + (2 + 3) + 1 + (2 + 4)


def _wilson_rate(k: int, n: int) -> dict:
    return {"k": k, "n": n, "rate": k / n, "ci95": list(wilson(k, n))}


def test_reference_guidance_sweep_row_and_verdicts():
    """One sweep entry: each factor's rate with the Wilson interval; the bars judged on their intervals (a factor
    bar and every single value), grouped as missed / not resolved."""
    heldout = {"object": _wilson_rate(490, 512), "color": _wilson_rate(512, 512), "style": _wilson_rate(470, 512),
               "background": _wilson_rate(512, 512)}
    per_value = {"object": {"hexagon": _wilson_rate(40, 64), "star": _wilson_rate(60, 64)},
                 "style": {"dotted": _wilson_rate(54, 64), "solid": _wilson_rate(64, 64)}}
    entry = {"guidance_scale": 3.0,
             "results": {"heldout": {"rates": heldout, "per_value": per_value},
                         "synonyms": {"rates": {"object": _wilson_rate(200, 256), "color": _wilson_rate(256, 256)}}},
             "worst_value": {"object": {"value": "hexagon", **_wilson_rate(40, 64)},
                             "style": {"value": "dotted", **_wilson_rate(54, 64)}}}
    bars = {"heldout": {"object": 0.90, "color": 0.95, "style": 0.85, "background": 0.90},
            "synonyms": {"object": 0.85, "color": 0.85}}
    text = report.reference_guidance_sweep({"sweep": [entry], "bar": bars, "per_value_bar": 0.8})
    row = text.splitlines()[2].split(" | ")
    lo, hi = wilson(490, 512)
    assert row[1] == f"{100 * 490 / 512:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    assert row[0] == "| 3"
    assert row[7] == "hexagon 62.5%, dotted 84.4%"
    # synonyms object 78.1% [72.7, 82.7] < 85%: missed; hexagon 62.5% [50.3, 73.3]: missed;
    # dotted 84.4% [73.6, 91.3]: not resolved; every other bar met on its interval
    assert verdict(*wilson(200, 256), 0.85) == "missed" and verdict(*wilson(54, 64), 0.8) == "not resolved at this n"
    assert row[8] == "missed: synonyms object, hexagon; not resolved at this n: dotted |"


def test_guiders_summary_names_only_guiders_that_meet_both_verdicts():
    def row(name, sat, acc, less, accurate, vs="diffusers-cfg_7.5"):
        return {"setting": name, "vs": vs, "saturation_diff": {"difference": sat}, "accuracy_diff": {"difference": acc},
                "less_saturated": less, "at_least_as_accurate": accurate}

    guiders = [row("a_7.5", -0.02, 0.01, "met", "met"), row("b_7.5", -0.05, -0.1, "met", "missed"),
               row("c_7.5", -0.01, 0.0, "met", "met"), row("d_15", -0.03, 0.0, "not resolved at this n", "met",
                                                         vs="diffusers-cfg_15")]
    text = report.guiders_summary({"parts": {"guiders": {"rows": guiders}, "apg": {"rows": []}}})
    lines = text.splitlines()
    assert lines[2] == "| CFG scale 7.5: less saturated *and* at least as accurate as CFG | a_7.5, c_7.5 (of 3) |"
    # b has the largest drop but misses accuracy: the best is a
    assert lines[3].endswith("| a_7.5 (-0.020 saturation, +1.0 accuracy points) |")
    assert lines[4] == "| CFG scale 15: less saturated *and* at least as accurate as CFG | none (of 1) |"
    assert lines[5].endswith("| none meets both |")


def test_the_environment_records_the_cpu_kernels_instruction_set():
    import torch

    env = _common.environment()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() != ""
    assert {"torch", "diffusers", "transformers", "cpu_threads", "date"} <= set(env)
