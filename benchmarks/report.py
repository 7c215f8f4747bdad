"""Regenerate the README's and docs' generated tables from benchmarks/results/*.json.

A generated table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in a markdown file; this
script rewrites what is between the markers from the JSON, and ``--check`` exits 1 (listing the tables)
when a file differs from what it would write (tests/test_report.py runs the check: no hand-typed figure).

    python benchmarks/report.py           # rewrite README.md and docs/*.md
    python benchmarks/report.py --check   # verify only
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _pct(x: float) -> str:
    return f"{100 * (x - 1):+.1f}%"


def overhead_cpu(data: dict) -> str:
    rows = ["| model | configuration | n | time vs diffusers (median) | 95% interval | min / max | diffusers s/call | "
            "target <= +1% |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    labels = {"diffkit": "diffkit, no feature", "diffkit_cfg": "diffkit, `guidance=CFG(7.5)`"}
    for r in data["results"]:
        rows.append(f"| {r['model']} | {labels.get(r['config'], r['config'])} | {r['n']} | {_pct(r['median_ratio'])} | "
                    f"[{_pct(r['ci95_low'])}, {_pct(r['ci95_high'])}] | {_pct(r['min_ratio'])} / "
                    f"{_pct(r['max_ratio'])} | {r['diffusers_median_s']:.2f} | {r['verdict']} |")
    return "\n".join(rows)


def _ci(lo: float, hi: float, scale: float = 1.0, fmt: str = "{:.3f}") -> str:
    return "[" + fmt.format(lo * scale) + ", " + fmt.format(hi * scale) + "]"


def _quality_rows(part: dict) -> list[str]:
    rows = ["| setting | n | saturation [95% CI] | vs baseline | saturation diff [95% CI] | mean accuracy [95% CI] | "
            "accuracy diff, points [95% CI] | less saturated | at least as accurate (-2 points) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in part["rows"]:
        sd, ad = r.get("saturation_diff"), r.get("accuracy_diff")
        rows.append(
            f"| {r['setting']} | {r['n']} | {r['saturation']:.3f} {_ci(*r['saturation_ci95'])} | {r.get('vs', '—')} | "
            + (f"{sd['difference']:+.3f} {_ci(*sd['ci95'], fmt='{:+.3f}')}" if sd else "—") + " | "
            + (f"{r['acc_mean']:.3f} {_ci(*r['acc_mean_ci95'])}" if "acc_mean" in r else "—") + " | "
            + (f"{100 * ad['difference']:+.1f} {_ci(*ad['ci95'], 100, '{:+.1f}')}" if ad else "—") + " | "
            + f"{r.get('less_saturated', '—')} | {r.get('at_least_as_accurate', '—')} |")
    return rows


def guiders_quality(data: dict) -> str:
    return "\n".join(_quality_rows(data["parts"]["guiders"]))


def apg_sweep(data: dict) -> str:
    return "\n".join(_quality_rows(data["parts"]["apg"]))


def guiders_overhead(data: dict) -> str:
    rows = ["| measure | guider | n | time vs CFG (median) | 95% interval | verdict (<= +2% for prediction-only) |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        rows.append(f"| {r['measure']} | {r['guider']} | {r['n']} | {_pct(r['ratio'])} | "
                    f"[{_pct(r['ci95_low'])}, {_pct(r['ci95_high'])}] | {r['verdict']} |")
    return "\n".join(rows)


def _both(row: dict) -> bool:
    return row.get("less_saturated") == "met" and row.get("at_least_as_accurate") == "met"


def guiders_summary(data: dict) -> str:
    """Which guiders are both less saturated than CFG and at least as accurate, per scale; and APG's claim."""
    rows = ["| question | answer (verdicts from the intervals above) |", "| --- | --- |"]
    guiders = data["parts"]["guiders"]["rows"]
    for scale in ("7.5", "15"):
        vs = f"diffusers-cfg_{scale}"
        same = [r for r in guiders if r.get("vs") == vs]
        both = [r["setting"] for r in same if _both(r)]
        best = max((r for r in same if _both(r)), key=lambda r: -r["saturation_diff"]["difference"], default=None)
        rows.append(f"| CFG scale {scale}: less saturated *and* at least as accurate as CFG | "
                    f"{', '.join(both) or 'none'} (of {len(same)}) |")
        rows.append(f"| CFG scale {scale}: best guider (both verdicts met, then the largest saturation drop) | " + (
            "none meets both" if best is None else
            f"{best['setting']} ({best['saturation_diff']['difference']:+.3f} saturation, "
            f"{100 * best['accuracy_diff']['difference']:+.1f} accuracy points)") + " |")
    apg = [r for r in data["parts"]["apg"]["rows"] if r.get("vs")]
    held = [r["setting"] for r in apg if _both(r)]
    answer = "holds for " + ", ".join(held) if held else "does not hold: no setting"
    rows.append(f"| APG's claim at scale 15 (less saturated than CFG 15 and at least as accurate), over the "
                f"{len(apg)}-setting sweep | {answer} |")
    return "\n".join(rows)


def _rate(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}]"


def _bar(r: dict, bar: float) -> str:
    """A rate against its bar, judged on the interval (issue 16): met, missed or not resolved at this n."""
    from diffkit.evaluation import verdict

    return f"{100 * bar:.0f}%: {verdict(r['ci95'][0], r['ci95'][1], bar, '>=')}"


def reference_model(data: dict) -> str:
    """The reference model's bar: each factor's rate with its Wilson interval, the worst single value, and the
    same-seed background swap."""
    rows = ["| prompts | n | factor | rate [95% CI] | bar: verdict on the interval | worst single value [95% CI]: "
            "verdict vs 80% |",
            "| --- | --- | --- | --- | --- | --- |"]
    bars, worst = data["bar"], data.get("worst_value", {})
    for name, res in data["results"].items():
        for f, r in res.get("rates", {}).items():
            if name == "swap" and f != "background":
                continue
            bar = bars.get(name, {}).get(f)
            w = worst.get(f) if name == "heldout" else None
            wcell = f"{w['value']} {_rate(w)}: {_bar(w, data['per_value_bar']).split(': ')[1]}" if w else "—"
            rows.append(f"| {name} | {res['n_images']} | {f} | {_rate(r)} | {'—' if bar is None else _bar(r, bar)} "
                        f"| {wcell} |")
    sw = data["results"].get("swap")
    if sw and "both_as_asked" in sw:
        rows.append(f"| swap: black and white drawn as asked, same seed | {sw['pairs']} pairs | background | "
                    f"{_rate(sw['both_as_asked'])} | — | same background for both: "
                    f"{_rate(sw['same_background_drawn'])} |")
    return "\n".join(rows)


def _sweep_verdicts(entry: dict, bars: dict, per_value_bar: float) -> str:
    """Every bar of one sweep entry judged on its interval (each factor's rate, and each single value against
    ``per_value_bar``): the bars not met, grouped by verdict."""
    from diffkit.evaluation import verdict

    judged = [(f"{name} {f}", verdict(*entry["results"][name]["rates"][f]["ci95"], bar, ">="))
              for name, fbars in bars.items() for f, bar in fbars.items()]
    judged += [(value, verdict(*r["ci95"], per_value_bar, ">="))
               for rows in entry["results"]["heldout"]["per_value"].values() for value, r in rows.items()]
    out = [f"{v}: {', '.join(k for k, vv in judged if vv == v)}" for v in ("missed", "not resolved at this n")
           if any(vv == v for _, vv in judged)]
    return "; ".join(out) or "all met"


def reference_guidance_sweep(data: dict) -> str:
    """The reference model's bar at each CFG scale (same prompts and seeds): each factor's rate with its Wilson
    interval, the worst single value of each factor, and every bar judged on its interval."""
    rows = ["| CFG scale | object [95% CI] | color | style | background | synonyms: object | synonyms: color | "
            "worst single value per factor | bars not met (on the interval) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in data["sweep"]:
        h, s = e["results"]["heldout"]["rates"], e["results"]["synonyms"]["rates"]
        worst = ", ".join(f"{w['value']} {100 * w['rate']:.1f}%" for w in e["worst_value"].values())
        rows.append(f"| {e['guidance_scale']:g} | {_rate(h['object'])} | {_rate(h['color'])} | {_rate(h['style'])} | "
                    f"{_rate(h['background'])} | {_rate(s['object'])} | {_rate(s['color'])} | {worst} | "
                    f"{_sweep_verdicts(e, data['bar'], data['per_value_bar'])} |")
    return "\n".join(rows)


def reference_costs(data: dict) -> str:
    """What the reference model costs: load, one image, training, weights."""
    t = data["training"]
    vae, unet = (t.get("vae_seconds") or 0) / 60, (t.get("unet_seconds") or 0) / 60
    rows = ["| | |", "| --- | --- |",
            f"| load (offline, CPU) | {data['load_seconds']:.2f} s |",
            f"| one 64x64 image, {data['sampler']['steps']} DDIM steps with CFG, batch 1, {data['threads']} CPU "
            f"threads | {data['seconds_per_image_batch1']:.2f} s |",
            f"| training, CPU ({t.get('threads')} threads) | VAE {vae:.1f} min + U-Net and text encoder {unet:.1f} min "
            f"({t.get('unet_steps')} steps, batch {t.get('batch')}, data encoding included) = {vae + unet:.1f} min |"]
    if "weights_mb" in data:
        rows.append(f"| weights (fp32 safetensors) | {data['weights_mb']:.1f} MiB |")
    return "\n".join(rows)


def _figure(unit: str, x: float) -> str:
    return f"{x:.2f}x" if unit == "x" else _pct(x)


def _target(unit: str, target: str | None) -> str:
    if not target:
        return "—"
    direction, value = target.split()
    return ("≤ " if direction == "<=" else "≥ ") + _figure(unit, float(value))


def speed_cpu(data: dict) -> str:
    rows = ["| section | model | configuration | vs | n | median | 95% interval | min / max | target | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        f = lambda x, u=r["unit"]: _figure(u, x)  # noqa: E731
        rows.append(f"| {r['section']} | {r['model']} | {r['config']} | {r['vs']} | {r['n']} | {f(r['median'])} | "
                    f"[{f(r['ci95'][0])}, {f(r['ci95'][1])}] | {f(r['min'])} / {f(r['max'])} | "
                    f"{_target(r['unit'], r['target'])} | {r['verdict']} |")
    return "\n".join(rows)


def speed_targets(data: dict) -> str:
    """The rows of speed_cpu.json that carry one of issue 19's targets, on full-size SD 1.5 (the summary)."""
    rows = ["| target (full-size SD 1.5) | configuration | vs | n | median [95% interval] | verdict |",
            "| --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        if r["target"] is None or r["model"] != "sd15-full":
            continue
        f = lambda x, u=r["unit"]: _figure(u, x)  # noqa: E731
        rows.append(f"| {_target(r['unit'], r['target'])} | {r['config']} | {r['vs']} | {r['n']} | "
                    f"{f(r['median'])} [{f(r['ci95'][0])}, {f(r['ci95'][1])}] | {r['verdict']} |")
    t = (data.get("compile") or {}).get("steady_median_s", {})
    for num, den in (("eager", "compiled"), ("eager DeepCache N=3", "compiled DeepCache N=3"),
                     ("eager", "compiled DeepCache N=3")):
        if num in t and den in t:  # speedup of `den` over `num`: steady-state medians of one compiled run
            rows.append(f"| — | {den} (steady state) | {num} | — | {t[num] / t[den]:.2f}x | reported |")
    return "\n".join(rows)


def speed_compile(data: dict) -> str:
    c = data.get("compile")
    if not c:
        return "_(section e not run yet)_"
    model = "Tiny SD 1.5 (smoke)" if data.get("smoke") else "Full-size SD 1.5"
    rows = [f"{model}, {c['size']} px, {c['steps']} DDIM steps, CFG, backend `{c['backend']}`; counts are "
            "deltas of `torch._dynamo.utils.counters` (graphs, frames) and of dynamo's recompile log, per phase.", "",
            "| phase | seconds | graphs | frames | recompiles | graph breaks |",
            "| --- | --- | --- | --- | --- | --- |"]
    for p in c["phases"]:
        sec = "—" if p["seconds"] is None or p["seconds"] != p["seconds"] else f"{p['seconds']:.1f}"
        rows.append(f"| {p['phase']} | {sec} | {p['graphs']} | {p['frames']} | {p['recompiles']} | "
                    f"{p['graph_breaks']} |")
    rows += ["", "Tiny SD 1.5 U-Net with DeepCache N=3, dynamo's `eager` backend, 6 steps a call, sizes in order "
             "(graphs / recompiles compiled at each):", "",
             "| `dynamic=` | " + " | ".join(f"{z['size']} px" for z in c["dynamic_modes"][0]["sizes"]) +
             " | graphs in all | recompiles in all |",
             "| --- |" + " --- |" * (len(c["dynamic_modes"][0]["sizes"]) + 2)]
    for m in c["dynamic_modes"]:
        rows.append(f"| {m['dynamic']} | " + " | ".join(f"{z['graphs']} / {z['recompiles']}" for z in m["sizes"]) +
                    f" | {m['graphs']} | {m['recompiles']} |")
    return "\n".join(rows)


# -- guidance, DeepCache and pruning quality (issue 16): rates with n and 95% intervals, paired differences --

def _est(value: float, ci=None, scale: float = 1.0, digits: int = 3, unit: str = "", sign: bool = False) -> str:
    """``value [low, high]`` (``[—]`` where the JSON has no interval)."""
    f = lambda x: f"{x * scale:{'+' if sign else ''}.{digits}f}"  # noqa: E731
    return f"{f(value)}{unit} " + (f"[{f(ci[0])}, {f(ci[1])}]" if ci else "[—]")


def _share(value: float, ci=None) -> str:
    return _est(value, ci, 100, 1, "%")


def _factor(r, n: int) -> str:
    """A factor's accuracy: a ``Rate`` JSON with its Wilson interval (its n when it is not the row's), or the
    bare rate of an old file."""
    if r is None:
        return "—"
    if not isinstance(r, dict):
        return _share(r)
    return _share(r["rate"], r["ci95"]) + ("" if r["n"] == n else f" (n={r['n']})")


def _caption(data: dict, name: str, settings: str) -> str:
    """The settings the figures were measured at; for a file from before the per-image outcomes, the stale note."""
    date = data.get("environment", {}).get("date", "?")[:10]
    if "stats" not in data:
        return (f"_stale: measured before intervals, re-run `python -m benchmarks.quality --only {name}`._ "
                f"{settings}; measured {date}; `—`: not in the JSON.")
    return (f"{settings}; measured {date}. 95% intervals: Wilson for each factor's rate, a bootstrap over prompts "
            "for means, a paired bootstrap over the same prompts and seeds for differences.")


def _header(*cols: str) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]


def _factor_heads(factors: list[str]) -> list[str]:
    return [f"{f} [95% CI]" for f in factors] + ["mean accuracy [95% CI]"]


def _factors(rows: list[dict]) -> list[str]:
    first = rows[0]
    if isinstance(first.get("accuracy"), dict) and first["accuracy"]:
        return list(first.get("rates", first["accuracy"]))
    return [k[4:] for k in first if k.startswith("acc_") and k not in ("acc_mean", "acc_mean_ci95")]


def _accuracy_cells(row: dict, factors: list[str], n: int) -> list[str]:
    """Each factor's accuracy, then the mean accuracy, of a DeepCache / pruning row (new or old file)."""
    rates = row.get("rates", row["accuracy"])
    return [_factor(rates[f], n) for f in factors] + [_share(row["mean_accuracy"], row.get("mean_accuracy_ci95"))]


def _change(row: dict, margin: float) -> list[str]:
    """The change in mean accuracy from the baseline in points, with its paired interval and the verdict."""
    d = row.get("accuracy_diff")
    if d is None:
        return [f"{row['delta_points']:+.1f} [—]", "—"]
    return [_est(d["difference"], d["ci95"], 100, 1, sign=True), d["verdict"]]


def _psnr(row: dict) -> str:
    return "—" if row["psnr_db"] == float("inf") else _est(row["psnr_db"], row.get("psnr_db_ci95"), 1, 1, " dB")


#: how each guidance target reads (JSON key prefix -> words), and how its measure is written
GUIDANCE_TARGETS = {
    "apg15_saturation_below_cfg15": "APG 15 less saturated than CFG 15 (difference < 0)",
    "apg15_accuracy_at_least_cfg15": "APG 15 at least as accurate as CFG 15 (difference >= -{margin} points)",
    "cfgpp_psnr_above_cfg": "CFG++ 0.6 inverts with a higher PSNR than CFG 7.5, {source} images (difference > 0)",
}


def _guidance_target(data: dict, key: str, t) -> str:
    """One target row: both settings' figures with their intervals, the paired difference and the verdict."""
    by = {r["setting"]: r for r in data["quality"]}
    margin = 100 * data.get("accuracy_margin", 0.02)
    prefix, _, source = key.partition(" (")
    source = source[:-1]  # "cfgpp_psnr_above_cfg (own)" -> "own"
    words = GUIDANCE_TARGETS.get(prefix, key).format(margin=f"{margin:g}", source=source)
    new = isinstance(t, dict)
    if prefix == "cfgpp_psnr_above_cfg":
        inv = {r["method"]: r for r in data["inversion"] if r["images"] == source}
        a, b = inv["cfgpp_0.6"], inv["cfg_7.5"]
        cells = [_est(x["psnr_mean"], x.get("psnr_ci95"), 1, 1, " dB") for x in (a, b)]
        n, diff = a["n"], (t["difference"] if new else a["psnr_mean"] - b["psnr_mean"])
        dcell = _est(diff, t["ci95"] if new else None, 1, 1, " dB", sign=True)
    elif prefix == "apg15_saturation_below_cfg15":
        a, b = by["apg_15"], by["cfg_15"]
        cells = [_est(x["saturation"], x.get("saturation_ci95")) for x in (a, b)]
        n, diff = a["n"], (t["difference"] if new else a["saturation"] - b["saturation"])
        dcell = _est(diff, t["ci95"] if new else None, sign=True)
    else:
        a, b = by["apg_15"], by["cfg_15"]
        cells = [_share(x["acc_mean"], x.get("acc_mean_ci95")) for x in (a, b)]
        n, diff = a["n"], (t["difference"] if new else a["acc_mean"] - b["acc_mean"])
        dcell = _est(diff, t["ci95"] if new else None, 100, 1, " points", sign=True)
    return f"| {words} | {n} | {cells[0]} | {cells[1]} | {dcell} | {t['verdict'] if new else '—'} |"


def guidance_quality(data: dict) -> str:
    """CFG / APG / CFG++ on the same prompts and seeds: saturation and the oracle's accuracy per setting, then
    the issue's targets as paired differences with verdicts (benchmarks/guidance_quality.py)."""
    c = data["config"]
    settings = (f"{c['model']} model, n = {c['n']} prompts (image i: seed i), DDIM {c['steps']} steps, APG eta 0, "
                f"momentum -0.5, r = {c['norm_threshold']:.2f}; inversion: {c['inversion_n']} images, "
                f"{c['inversion_steps']} DDIM steps")
    rows = data["quality"]
    factors = _factors(rows)
    out = [_caption(data, "guidance_quality", settings), "",
           *_header("setting", "n", "saturation [95% CI]", *_factor_heads(factors))]
    for r in rows:
        acc = [_factor(r.get("accuracy", {}).get(f, r.get(f"acc_{f}")), r["n"]) for f in factors]
        acc.append(_share(r["acc_mean"], r.get("acc_mean_ci95")) if "acc_mean" in r else "—")
        out.append(f"| {r['setting']} | {r['n']} | {_est(r['saturation'], r.get('saturation_ci95'))} | "
                   + " | ".join(acc) + " |")
    out += ["", "| target | n | A [95% CI] | B (baseline) [95% CI] | A - B [95% CI] | verdict |",
            "| --- | --- | --- | --- | --- | --- |"]
    out += [_guidance_target(data, k, t) for k, t in data.get("targets", {}).items()]
    return "\n".join(out)


def _versus_table(data: dict, name: str, settings: str, lead_heads: tuple, baseline: str, target: str,
                  margin: float, lead_cells, n_default: int, is_base) -> str:
    """A quality table of settings against one baseline row measured on the same prompts and seeds: the
    ``lead_cells(row, base)`` columns, n, PSNR vs the baseline, per-factor rates, the paired change in mean
    accuracy and its verdict against ``-margin`` points."""
    rows = data["results"]
    factors = _factors(rows)
    out = [_caption(data, name, settings), "",
           *_header(*lead_heads, "n", f"PSNR vs {baseline} [95% CI]", *_factor_heads(factors),
                    f"change vs {baseline}, points [95% CI]", f">= -{margin:g} points ({target})")]
    for r in rows:
        base = is_base(r)
        n = r.get("n", n_default)
        change = ["—", "—"] if base else _change(r, margin)
        out.append("| " + " | ".join([*lead_cells(r, base), str(n), _psnr(r)]) + " | "
                   + " | ".join(_accuracy_cells(r, factors, n) + change) + " |")
    return "\n".join(out)


def deepcache_quality(data: dict) -> str:
    """DeepCache at N = 2/3/5, both schedules, vs no cache on the same prompts and seeds
    (benchmarks/deepcache_quality.py); issue 5's target: at N = 3 at most 2 points of accuracy lost."""
    s = data["setting"]
    settings = (f"n = {s['n_images']} prompts, seed 0 each, DDIM {s['steps']} steps, CFG {s['guidance_scale']:g}, "
                f"branch {s['branch']}, {s['device']}")
    return _versus_table(
        data, "deepcache_quality", settings, ("schedule", "N"), "no cache",
        f"target at N = {data.get('target_interval', 3)}", 100 * data.get("accuracy_margin", 0.02),
        lambda r, base: ("—", "1 (no cache)") if base else (r["schedule"], str(r["interval"])),
        s["n_images"], lambda r: r["config"] == "no-cache",
    )


def pruning_quality(data: dict) -> str:
    """Learned (and random) masks at 10/20/30% fewer U-Net parameters vs unpruned on the same prompts and seeds
    (benchmarks/pruning_quality.py); issue 8's target: at 20% at most 3 points of accuracy lost."""
    s = data["setting"]
    settings = (f"n = {s['n']} prompts, seed 0 each, {s['steps']} denoising steps, CFG {s['guidance_scale']:g}; "
                f"masks learned on {s['calib']} prompts, {s['learn_steps']}-step trajectories, {s['epochs']} "
                f"epoch(s); no retraining; {s['device']}")

    def lead(r, base):
        if base:
            return ("none (unpruned)", "—", "—")
        return (r["masks"], *(f"{-100 * r[k]:+.1f}%" for k in ("param_reduction", "mac_reduction")))

    return _versus_table(
        data, "pruning_quality", settings, ("masks", "U-Net parameters", "MACs"), "unpruned",
        f"target at -{data.get('target_reduction', 0.2):.0%}", 100 * data.get("accuracy_margin", 0.03),
        lead, s["n"], lambda r: r["masks"] == "none",
    )


def pruning_sweep(files: dict) -> str:
    """Every pruning_quality results file (the default run and the ``--tag`` side runs; files from before the
    target was judged are left out) side by side at the target's row: how the mask-learning settings move the
    paired change in accuracy (same prompts and seeds)."""
    out = ["Each row: one run of `benchmarks/pruning_quality.py` (results file in the first column) at its -20% "
           "row; change: paired bootstrap 95% interval of the mean accuracy against unpruned on the same prompts "
           "and seeds; final MSE / penalty: the mask-learning loss terms at its last step.", "",
           *_header("results file", "calib prompts", "trajectory steps", "epochs", "beta", "lr", "learning steps",
                    "final MSE / penalty", "learning s", "U-Net parameters", "MACs", "n",
                    "change vs unpruned, points [95% CI]", "verdict (>= -3 points)")]
    for name, data in files.items():
        s, learning = data["setting"], data.get("learning") or {}
        target = data.get("target") or {}
        row = next((r for r in data["results"]
                    if r["masks"] == "learned" and r.get("target") == data.get("target_reduction")), None)
        if row is None or not target:
            continue
        final = learning.get("final", {})
        out.append("| " + " | ".join([
            f"`{name}`", str(s["calib"]), str(s["learn_steps"]), str(s["epochs"]), f"{s['beta']:g}", f"{s['lr']:g}",
            str(learning.get("steps", "—")),
            f"{final['mse']:.3f} / {final['penalty']:.3f}" if final else "—",
            f"{learning['seconds_this_run']:.0f}" if "seconds_this_run" in learning else "—",
            f"{-100 * row['param_reduction']:+.1f}%", f"{-100 * row['mac_reduction']:+.1f}%", str(row.get("n", s["n"])),
            _est(target["difference"], target["ci95"], 100, 1, sign=True), target["verdict"]]) + " |")
    return "\n".join(out)


# -- erasure (issues 16, 17, 20): every rate with its n and 95% interval, every target judged on an interval -----

#: the rates of an erasure row (JSON key, column words)
ERASURE_RATES = (("ua", "UA forget"), ("ua_synonyms", "UA synonym"), ("ira", "IRA"), ("cra", "CRA"))
#: how each method's training length is named in the JSON's settings
ERASURE_STEPS = {"esd": "esd_steps", "salun": "salun_steps", "advunlearn": "adv_steps", "doco": "doco_steps"}


def _erasure_settings(data: dict) -> str:
    s = data["setting"]
    seeds = s.get("seeds") or [0]
    bases = dict.fromkeys(m.split("-")[0] for m in s.get("methods", []))
    train = ", ".join(f"{b} {s[ERASURE_STEPS[b]]} steps" for b in bases if ERASURE_STEPS.get(b) in s)
    attacks = []
    for a in s.get("attack") or ["soft-prompt"]:
        attacks.append(f"UnlearnDiffAtk ({s.get('attack_tokens')} tokens, {s.get('attack_iterations')} iterations x "
                       f"{s.get('attack_timesteps')} timesteps)" if a == "unlearndiffatk" else
                       f"{a} ({s.get('attack_steps')} steps)")
    probes = ", ".join(s.get("probes") or []) or "none"
    where = "; tiny random model (smoke: logic only)" if data.get("smoke") else ""
    note = f"; {s['note']}" if s.get("note") else ""
    copies = s.get("attack_seeds", 1)
    over = f"{s['attack_prompts']} forget prompts" + (f" x {copies} seeds" if copies > 1 else "")
    return (f"{s['n_prompts'] * len(seeds)} images a group ({s['n_prompts']} prompts x {len(seeds)} seeds), "
            f"{s['inference_steps']} DDIM steps, CFG {s['guidance']:g}; training: {train}; attacks over "
            f"{over}: {', '.join(attacks)}; probes: {probes}{where}{note}")


def _erasure_caption(data: dict, name: str, command: str | None = None) -> str:
    """The settings and date of an erasure file; for one from before the intervals, the stale note first."""
    date = data.get("environment", {}).get("date", "?")[:10]
    partial = " **Partial run** (interrupted: only the finished jobs)." if data.get("complete") is False else ""
    if "stats" not in data:
        return (f"_stale: measured on earlier weights before intervals; re-run "
                f"`{command or f'python -m benchmarks.quality --only {name}'}`._ {_erasure_settings(data)}; measured "
                f"{date}; `—`: not in the JSON.{partial}")
    return (f"{_erasure_settings(data)}; measured {date}. 95% intervals: Wilson for UA, UA synonym, IRA and every "
            f"attack and probe rate; CRA: bootstrap over images; a cell's (n=...) where its n is not the column's. "
            f"KID: the unbiased MMD^2 (cubic kernel) between the erased and the original model's retain images on the "
            f"oracle's penultimate features, in those features' raw units (0: indistinguishable; negative values "
            f"are estimator noise), mean ± sd over 100 random subsets."
            f"{partial}")


def _erasure_originals(data: dict) -> list[dict]:
    """The rows with the original model's row (same prompts and seeds) before each concept's methods: from
    ``originals`` (with intervals), or for an old file from each report's ``original`` rates."""
    by = {o["concept"]: o for o in data.get("originals", [])}
    out = []
    for r in data["results"]:
        c = r["concept"]
        if not any(o["concept"] == c for o in out):
            report = data.get("details", {}).get(f"{r['method']}-{c}", {}).get("report", {})
            old = dict(concept=c, factor=r["factor"], n_images=report.get("n_images"), **report.get("original", {}))
            out.append(dict(by.get(c, old), method="original"))
        out.append(r)
    return out


def _erasure_attacks(data: dict) -> list[tuple[str, str]]:
    """(column, row key) of every attack and probe rate; an old file has the soft-prompt attack's alone."""
    s = data["setting"]
    if "attack" not in s:
        return [("ASR soft-prompt [95% CI]", "asr"), ("pre-attack [95% CI]", "pre_attack")]
    cols = []
    for i, a in enumerate(s["attack"]):
        cols += [(f"ASR {a} [95% CI]", f"asr_{a.replace('-', '_')}")] + ([("pre-attack [95% CI]", "pre_attack")]
                                                                         if i == 0 else [])
    return cols + [(f"{p.replace('-', ' ')} [95% CI]", f"probe_{p.replace('-', '_')}") for p in s.get("probes") or []]


def _erasure_rate(row: dict, key: str, n) -> str:
    """A rate with its interval (``[—]`` where the JSON has none) and its n where it is not the column's."""
    if row.get(key) is None:
        return "—"
    rn = row.get(f"{key}_n")
    return _share(row[key], row.get(f"{key}_ci95")) + ("" if rn is None or rn == n else f" (n={rn})")


def _kid(row: dict) -> str:
    """KID with its spread over the random subsets (``± sd`` where the JSON records it)."""
    if row.get("kid") is None:
        return "—"
    return f"{row['kid']:.1f}" + ("" if row.get("kid_std") is None else f" ± {row['kid_std']:.1f}")


def _num(row: dict, key: str, fmt: str) -> str:
    return "—" if row.get(key) is None else fmt.format(row[key])


def _erasure_main(data: dict, tail, originals: bool = False, extra_heads=(), extra_cells=None) -> list[str]:
    """One row per (concept, method): n images a group, each rate [95% CI], KID, the attacked prompts' n and each
    attack / probe rate [95% CI], ``extra_cells(row)``, training seconds and the ``tail`` ((column, key, format))."""
    attacks = _erasure_attacks(data)
    out = _header("concept", "method", "n", *(f"{w} [95% CI]" for _, w in ERASURE_RATES), "KID ± sd",
                  "attack prompts",
                  *(h for h, _ in attacks), *extra_heads, "train s", *(h for h, _, _ in tail))
    for r in _erasure_originals(data) if originals else data["results"]:
        report = data.get("details", {}).get(f"{r['method']}-{r['concept']}", {}).get("report", {})
        n = (r.get("n_images") or report.get("n_images") or {}).get("forget", "—")
        na = r.get(f"{attacks[0][1]}_n", "—" if r["method"] == "original" else data["setting"].get("attack_prompts"))
        out.append("| " + " | ".join([
            f"{r['concept']} ({r['factor']})", r["method"], str(n), *(_erasure_rate(r, k, n) for k, _ in ERASURE_RATES),
            _kid(r), str(na), *(_erasure_rate(r, k, na) for _, k in attacks),
            *(extra_cells(r) if extra_cells else ()), _num(r, "train_s", "{:.0f}"),
            *(_num(r, k, f) for _, k, f in tail)]) + " |")
    return out


ERASURE_TARGETS_CAPTION = (
    "Targets, each judged on a 95% interval (met: the whole interval clears the target; missed: it lies wholly on "
    "the wrong side; else not resolved at this n): a rate against its bar on its Wilson interval (CRA: bootstrap "
    "over images); one method against another on the paired bootstrap of the per-image differences (same prompts "
    "and seeds; CRA: the difference of the pooled shares){asr}. Cells: verdict: estimate [95% CI] (n).")
#: how the ASR target is judged (in the caption of the tables that have it)
ERASURE_ASR_HALF = ("; AdvUnlearn's attack success against half of ESD's on the paired bootstrap over the attack "
                    "prompts of ASR_adv - 0.5 ASR_esd (met when <= 0)")


def _erasure_target_cell(t) -> str:
    if isinstance(t, bool):  # an old file: a comparison of point estimates
        return f"— (point estimates: {'held' if t else 'did not hold'})"
    if t["kind"] == "n/a":
        return f"n/a: {t['reason']}"
    figure = (_share(t["estimate"], t["ci95"]) if t["kind"] == "rate" else
              _est(t["estimate"], t["ci95"], 100, 1, " points", sign=True))
    return f"{t['verdict']}: {figure} (n={t['n']})"


def _erasure_targets(data: dict) -> list[str]:
    """The targets table: one row per target, one column per concept."""
    targets = data.get("targets", {})
    factors = {r["concept"]: r["factor"] for r in data["results"]}
    concepts = [c for c in factors if c in targets]
    keys = list(dict.fromkeys(k for c in concepts for k in targets[c]))
    asr = ERASURE_ASR_HALF if "advunlearn_asr_le_half_esd" in keys else ""
    old = any(isinstance(t, bool) for c in concepts for t in targets[c].values())
    caption = ("Targets as the stale file recorded them (their earlier definitions): comparisons of point estimates, "
               "not judged on intervals." if old else ERASURE_TARGETS_CAPTION.format(asr=asr))
    out = [caption, "", *_header("target", *(f"{c} ({factors[c]})" for c in concepts))]
    for k in keys:
        first = next(targets[c][k] for c in concepts if k in targets[c])
        label = first["label"] if isinstance(first, dict) else k.replace("_", " ")
        out.append(f"| {label} | " + " | ".join(_erasure_target_cell(targets[c][k]) if k in targets[c] else "—"
                                               for c in concepts) + " |")
    return out


def erasure_quality(data: dict) -> str:
    """ESD and SalUn against the original model per concept, then issue 6's targets
    (benchmarks/erasure_quality.py)."""
    return "\n".join([_erasure_caption(data, "erasure_quality"), "",
                      *_erasure_main(data, (("artifact KiB", "storage_kib", "{:.0f}"),), originals=True), "",
                      *_erasure_targets(data)])


def erasure_methods(data: dict) -> str:
    """The four methods side by side, then issue 17's targets (benchmarks/erasure_methods.py)."""
    tail = (("state MiB", "state_mib", "{:.1f}"), ("peak RSS GiB", "peak_rss_gib", "{:.2f}"))
    return "\n".join([_erasure_caption(data, "erasure_methods"), "", *_erasure_main(data, tail), "",
                      *_erasure_targets(data)])


def erasure_targets(data: dict) -> str:
    """erasure_methods' targets alone (the README's summary)."""
    return "\n".join([_erasure_caption(data, "erasure_methods"), "", *_erasure_targets(data)])


def advunlearn_sweep(files: dict) -> str:
    """AdvUnlearn in every erasure_methods results file with intervals (the documented run and ``--tag`` side
    runs, e.g. the reference's 30-step inner attack), per concept: its training settings, UA, UnlearnDiffAtk
    success beside ESD's on the same prompts, and issue 17's "at most half of ESD's" on its interval."""
    out = ["Each row: AdvUnlearn in one run of `benchmarks/erasure_methods.py` (results file in the first column; "
           "files from before the intervals left out). Inner attack: `sign` = one signed step (the fast variant), "
           "`adam` = the reference's PGD (30 steps unless set). ASR: UnlearnDiffAtk over the run's forget prompts; "
           "Attacked: the attacked prompts x seeds (n of both ASR columns). ASR_adv - 0.5 ASR_esd: paired bootstrap "
           "over those instances (target <= 0).", "",
           *_header("results file", "concept", "steps", "lr", "inner attack", "train s", "UA forget [95% CI]",
                    "attacked", "ASR AdvUnlearn [95% CI]", "ASR ESD [95% CI]", "ASR_adv - 0.5 ASR_esd, points [95% CI]",
                    "verdict (<= 0)")]
    for name, data in files.items():
        if "stats" not in data or "advunlearn" not in data["setting"].get("methods", []):
            continue
        s = data["setting"]
        rows = {(r["concept"], r["method"]): r for r in data["results"]}
        for concept in s["concepts"]:
            adv, esd = rows.get((concept, "advunlearn")), rows.get((concept, "esd"))
            if adv is None:
                continue
            t = data.get("targets", {}).get(concept, {}).get("advunlearn_asr_le_half_esd", {})
            out.append("| " + " | ".join([
                f"`{name}`", concept, str(s["adv_steps"]), f"{s['adv_lr']:g}", s["adv_attack"], f"{adv['train_s']:.0f}",
                _share(adv["ua"], adv.get("ua_ci95")), str(adv.get("asr_unlearndiffatk_n", "—")),
                _share(adv["asr"], adv.get("asr_unlearndiffatk_ci95")),
                "—" if esd is None else _share(esd["asr"], esd.get("asr_unlearndiffatk_ci95")),
                _est(t["estimate"], t["ci95"], 100, 1, sign=True) if "ci95" in t else "—",
                t.get("verdict", "—")]) + " |")
    return "\n".join(out)


def doco_sweep(files: dict) -> str:
    """DoCo in every erasure_methods results file with intervals (the documented runs and ``--tag`` side runs at
    other rates, step counts and adversarial weights), per concept: UA on the forget words and the
    evaluation-only synonym (its target), IRA, CRA and UnlearnDiffAtk success."""
    out = ["Each row: DoCo in one run of `benchmarks/erasure_methods.py` (results file in the first column; files "
           "from before the intervals left out); discriminator warm-up a quarter of the steps. Adv. weight: the "
           "generator's adversarial loss weight (`--doco-adv-weight`, the reference's 1).", "",
           *_header("results file", "concept", "steps", "lr", "adv. weight", "train s", "UA forget [95% CI]",
                    "UA synonym [95% CI]", "IRA [95% CI]", "CRA [95% CI]", "attacked", "ASR unlearndiffatk [95% CI]")]
    for name, data in files.items():
        s = data["setting"]
        if "stats" not in data or "doco" not in s.get("methods", []):
            continue
        for r in data["results"]:
            if r["method"] == "doco":
                out.append("| " + " | ".join([
                    f"`{name}`", r["concept"], str(s["doco_steps"]), f"{s['doco_lr']:g}",
                    f"{s.get('doco_adv_weight', SETTING_DEFAULTS['doco_adv_weight']):g}", f"{r['train_s']:.0f}",
                    *(_share(r[k], r.get(f"{k}_ci95")) for k in ("ua", "ua_synonyms", "ira", "cra")),
                    str(r.get("asr_unlearndiffatk_n", "—")),
                    _erasure_rate(r, "asr_unlearndiffatk", r.get("asr_unlearndiffatk_n"))]) + " |")
    return "\n".join(out)


def erasure_lora_sweep(files: dict) -> str:
    """Every LoRA setting in every erasure_lora results file (the documented run and ``--tag`` side runs, e.g. a
    higher ``--lora-lr-scale``) with its learning rate and the claim UA(LoRA) - UA(full) >= -5 points."""
    out = ["Each row: one LoRA setting in one run of `benchmarks/erasure_lora.py` (results file in the first "
           "column) against full fine-tuning of the same method on the same images (paired bootstrap).", "",
           *_header("results file", "concept", "setting", "lr", "train s", "artifact KiB", "UA forget [95% CI]",
                    "UA - full, points [95% CI]", "UA - full >= -5 points")]
    for name, data in files.items():
        comps, jobs = data.get("comparisons", {}), data.get("details", {})
        for r in data["results"]:
            c = comps.get(f"{r['method']}-{r['concept']}", {}).get("ua")
            if c is None:
                continue
            # the rates the jobs trained at, as their configs recorded them
            lr = jobs[f"{r['method']}-{r['concept']}"]["config"]["lr"]
            full = jobs[f"{r['method'].rpartition('-')[0]}-full-{r['concept']}"]["config"]["lr"]
            out.append("| " + " | ".join([
                f"`{name}`", r["concept"], r["method"], f"{lr:g} ({lr / full:g} x full's)", f"{r['train_s']:.0f}",
                f"{r['storage_kib']:.0f}", _share(r["ua"], r.get("ua_ci95")),
                _est(c["difference"], c["ci95"], 100, 1, sign=True),
                comps[f"{r['method']}-{r['concept']}"].get("verdict_ua_within_5pt", "—")]) + " |")
    return "\n".join(out)


def esd_sweep(files: dict) -> str:
    """ESD-x in every erasure results file that trained it (runs that reused another file's ESD rows left out), by
    concept and step count: the 300-step documented runs beside the 1000-step side runs (the paper's count)."""
    out = ["Each row: ESD-x trained in one run of `benchmarks/erasure_quality.py` or `benchmarks/erasure_methods.py` "
           "(results file in the first column; runs that reused another file's ESD rows, and files from before the "
           "intervals, left out). UnlearnDiffAtk over the run's forget prompts.", "",
           *_header("results file", "concept", "steps", "lr", "train s", "UA forget [95% CI]",
                    "UA synonym [95% CI]", "IRA [95% CI]", "CRA [95% CI]", "attack prompts",
                    "ASR unlearndiffatk [95% CI]")]
    rows = []
    for name, data in files.items():
        if "stats" not in data or "esd" in (data.get("reused") or {}).get("methods", []):
            continue
        s = data["setting"]
        for r in data["results"]:
            if r["method"] == "esd":
                rows.append(((r["concept"], s["esd_steps"], name), "| " + " | ".join([
                    f"`{name}`", r["concept"], str(s["esd_steps"]), f"{s['esd_lr']:g}", f"{r['train_s']:.0f}",
                    *(_share(r[k], r.get(f"{k}_ci95")) for k in ("ua", "ua_synonyms", "ira", "cra")),
                    str(r.get("asr_unlearndiffatk_n", "—")),
                    _erasure_rate(r, "asr_unlearndiffatk", r.get("asr_unlearndiffatk_n"))]) + " |"))
    return "\n".join(out + [row for _, row in sorted(rows)])


#: The two runs of the documented erasure_methods protocol that together cover issue 17's six concepts (two objects,
#: two colors, two styles): the quality plan's run (star, red, striped) and :data:`SIX_COMMAND`, the same flags
#: with ``--concepts circle blue dotted --tag _new`` and no ``--reuse`` (erasure_quality has no rows for them).
SIX_FILES = ("erasure_methods.json", "erasure_methods_new.json")
SIX_COMMAND = ("python benchmarks/erasure_methods.py --n-prompts 64 --seeds 0 1 --attack-prompts 32 --attack "
               "unlearndiffatk soft-prompt --attack-timesteps 10 --probes noise-search completion --esd-steps 300 "
               "--esd-lr 5e-4 --salun-steps 100 --salun-lr 2e-4 --salun-batch 4 --salun-images 16 --sample-steps 10 "
               "--inference-steps 15 --adv-steps 200 --adv-lr 2e-4 --doco-steps 200 --doco-lr 5e-4 --attack-steps 20 "
               "--concepts circle blue dotted --tag _new")
#: settings that may differ between runs merged into one table: which concepts, the file name, how it was run
RUN_ONLY = {"concepts", "tag", "note", "resume", "reuse"}
#: settings added after files were written, at the value those files were measured at (as
#: ``erasure_quality.SETTING_DEFAULTS``; this script does not import the benchmarks)
SETTING_DEFAULTS = {"attack_seeds": 1, "doco_adv_weight": 1.0}


def _differing(a: dict, b: dict, ignore) -> dict:
    """{setting: (value in a, value in b)} for the settings of two runs that differ, sorted, ``ignore`` left out; a
    setting a file predates counts at its :data:`SETTING_DEFAULTS` value."""
    pairs = {k: (a.get(k, SETTING_DEFAULTS.get(k)), b.get(k, SETTING_DEFAULTS.get(k))) for k in set(a) | set(b)}
    return {k: pairs[k] for k in sorted(pairs) if k not in ignore and pairs[k][0] != pairs[k][1]}


def merge_erasure_runs(runs: list[dict]) -> dict:
    """One erasure results dict (rows, details, originals, targets) from runs of the same protocol and training
    settings on different concepts. ValueError naming each setting that differs, or a concept measured twice."""
    first = runs[0]["setting"]
    for run in runs[1:]:
        diff = _differing(first, run["setting"], RUN_ONLY)
        if diff:
            raise ValueError("runs with other settings cannot share a table: " +
                             ", ".join(f"{k} ({a!r} / {b!r})" for k, (a, b) in diff.items()))
    concepts = [c for run in runs for c in run["setting"]["concepts"]]
    twice = sorted({c for c in concepts if concepts.count(c) > 1})
    if twice:
        raise ValueError(f"concepts measured in more than one run: {', '.join(twice)}")
    dates = sorted(run.get("environment", {}).get("date", "?")[:10] for run in runs)
    return dict(runs[0], setting=dict(first, concepts=concepts), environment=dict(date=dates[-1]),
                complete=all(run.get("complete", True) for run in runs),
                results=[r for run in runs for r in run["results"]],
                originals=[o for run in runs for o in run.get("originals", [])],
                details={k: v for run in runs for k, v in run.get("details", {}).items()},
                targets={k: v for run in runs for k, v in run.get("targets", {}).items()},
                comparisons={k: v for run in runs for k, v in run.get("comparisons", {}).items()})


#: issue 17's count target: AdvUnlearn's UnlearnDiffAtk success <= half of ESD's on at least this many concepts
ASR_HALF_AT_LEAST = 4


def _target_counts(data: dict) -> list[str]:
    """Per target, on how many concepts it was met / missed / not resolved / not applicable (concepts named), and
    issue 17's "on >= 4 of 6 concepts" for AdvUnlearn's attack success: met when the met count reaches it, missed
    when even the unresolved ones could not bring it there."""
    targets = data.get("targets", {})
    concepts = [c for c in data["setting"]["concepts"] if c in targets]
    keys = list(dict.fromkeys(k for c in concepts for k in targets[c]))
    out = [f"Per target, the concepts of the {len(concepts)} where it is met, missed, not resolved at this n, or not "
           "applicable (each judged on its interval as above).", "",
           *_header("target", "met", "missed", "not resolved", "n/a")]
    count = {}
    for k in keys:
        by = {v: [c for c in concepts if k in targets[c] and targets[c][k]["verdict"].startswith(v)]
              for v in ("met", "missed", "not resolved", "n/a")}
        count[k] = by
        label = next(targets[c][k]["label"] for c in concepts if k in targets[c])
        out.append(f"| {label} | " + " | ".join(f"{len(v)}" + (f" ({', '.join(v)})" if v else "")
                                               for v in by.values()) + " |")
    by = count.get("advunlearn_asr_le_half_esd")
    if by is not None:
        met, open_ = len(by["met"]), len(by["not resolved"])
        verdict = ("met" if met >= ASR_HALF_AT_LEAST else "missed" if met + open_ < ASR_HALF_AT_LEAST
                   else "not resolved at this n")
        out += ["", f"AdvUnlearn's attack success <= half of ESD's on >= {ASR_HALF_AT_LEAST} of {len(concepts)} "
                    f"concepts: **{verdict}** (met on {met}, not resolved on {open_})."]
    return out


#: Where the original model's rows of the six concepts were measured (erasure_methods runs have none): part 1's run
#: (star, red, striped) and the 1000-step ESD side run on the new concepts (circle, blue, dotted), both on the same
#: prompts, seeds and sampling as the six-concept runs (checked: :data:`ORIGINAL_PROTOCOL`).
ORIGINAL_FILES = ("erasure_quality.json", "erasure_quality_esd1000_new.json")
#: what the original model's rows depend on: the model, the oracle, the prompts and seeds, the sampling
ORIGINAL_PROTOCOL = ("smoke", "model", "classifier", "n_prompts", "seeds", "inference_steps", "guidance")


def six_originals(six: dict, sources: list[dict]) -> list[dict]:
    """The original model's rows for the concepts of the merged six-concept run ``six``, from ``sources`` (results
    files with ``originals``). ValueError naming a source's protocol setting that differs from the run's (its
    original rows would be of other images), or a concept no source has."""
    by = {}
    for src in sources:
        diff = [k for k in ORIGINAL_PROTOCOL if src["setting"].get(k) != six["setting"].get(k)]
        if diff:
            raise ValueError(f"original rows measured with other settings: {', '.join(diff)}")
        by.update({o["concept"]: o for o in src.get("originals", [])})
    missing = [c for c in six["setting"]["concepts"] if c not in by]
    if missing:
        raise ValueError(f"no original rows for {', '.join(missing)}")
    return [by[c] for c in six["setting"]["concepts"]]


def erasure_six(runs: list) -> str:
    """Issue 17's table, 4 methods x 6 concepts: the documented erasure_methods run and its run on the other three
    concepts merged (:func:`merge_erasure_runs`), each concept's original-model row (:func:`six_originals`), the
    per-concept targets, and the targets counted over the six."""
    runs, sources = runs[:len(SIX_FILES)], runs[len(SIX_FILES):]
    if any(run is None for run in runs):
        missing = [f for f, run in zip(SIX_FILES, runs) if run is None]
        return f"_owed: {', '.join(missing)} (run `{SIX_COMMAND}`)._"
    data = merge_erasure_runs(runs)
    if sources and all(src is not None for src in sources):
        data["originals"] = six_originals(data, sources)
        origin = (f" Original-model rows from {' and '.join(f'`{f}`' for f in ORIGINAL_FILES)} (the same prompts, "
                  "seeds and sampling, checked).")
    else:
        origin = ""
    tail = (("state MiB", "state_mib", "{:.1f}"), ("peak RSS GiB", "peak_rss_gib", "{:.2f}"))
    return "\n".join([f"Merged from {' and '.join(f'`{f}`' for f in SIX_FILES)} (every setting but the concepts "
                      f"equal, checked).{origin} " + _erasure_caption(data, "erasure_methods"), "",
                      *_erasure_main(data, tail, originals=bool(origin)), "", *_erasure_targets(data), "",
                      *_target_counts(data)])


#: Issue 17's attack over 32 forget prompts x 2 seeds: the six concepts' jobs again with UnlearnDiffAtk alone at
#: ``--attack-seeds 2`` (every prompt attacked twice, each copy with its own target image, draws and generation
#: seed; copy 0 is the one-seed protocol's instance), the training and evaluation flags of :data:`SIX_COMMAND`.
SEEDS2_FILE = "erasure_methods_seeds2.json"
SEEDS2_COMMAND = (SIX_COMMAND.replace("--attack unlearndiffatk soft-prompt", "--attack-seeds 2 --attack unlearndiffatk")
                  .replace("--probes noise-search completion", "--probes")
                  .replace("--concepts circle blue dotted --tag _new",
                           "--concepts star circle red blue striped dotted --tag _seeds2 --resume"))
#: the settings the two-seed run may differ in from the one-seed runs (what is attacked, not what is trained)
SEEDS2_MAY_DIFFER = {"attack_seeds", "attack", "probes"}


def erasure_attack_seeds(runs: list) -> str:
    """UnlearnDiffAtk success at 32 prompts x 1 seed (the six-concept table, :data:`SIX_FILES`) beside 32 prompts x
    2 seeds (:data:`SEEDS2_FILE`) per (concept, method): the same jobs retrained (a job repeats exactly on one
    machine, not always on another CPU: the table shows whether UA and IRA match and how many of copy 0's outcomes
    equal the one-seed run's), AdvUnlearn's
    "<= half of ESD's" at both n, and the two-seed run's targets counted. ValueError when the runs differ in a
    setting other than what is attacked."""
    *six, two = runs
    if two is None or any(run is None for run in six):
        return f"_owed: {SEEDS2_FILE} (run `{SEEDS2_COMMAND}`)._"
    one = merge_erasure_runs(six)
    s1, s2 = one["setting"], two["setting"]
    diff = _differing(s1, s2, RUN_ONLY | SEEDS2_MAY_DIFFER)
    if diff:
        raise ValueError(f"{SEEDS2_FILE} differs from the six-concept runs in {', '.join(diff)}")
    rows1 = {(r["concept"], r["method"]): r for r in one["results"]}
    out = [f"UnlearnDiffAtk over {s2['attack_prompts']} forget prompts x 1 seed (n={s1['attack_prompts']}, "
           f"{' and '.join(f'`{f}`' for f in SIX_FILES)}) and x {s2['attack_seeds']} seeds "
           f"(n={s2['attack_prompts'] * s2['attack_seeds']}, `{SEEDS2_FILE}`, every other setting equal, checked); "
           "each job trained again in the two-seed run. Same training: UA and IRA equal to the one-seed run's "
           "(else that run's; a job repeats exactly on one machine, but these runs ran on CPUs whose kernels "
           "round differently). "
           "Copy 0: the attacked prompts of the first seed whose outcome equals the one-seed run's. "
           "ASR_adv - 0.5 ASR_esd: paired bootstrap over the attacked instances (target <= 0).", "",
           *_header("concept", "method", "UA forget [95% CI]", "same training", "ASR, 1 seed [95% CI]",
                    "ASR, 2 seeds [95% CI]", "copy 0 = 1-seed run", "ASR_adv - 0.5 ASR_esd, 1 seed",
                    "ASR_adv - 0.5 ASR_esd, 2 seeds")]
    for r in two["results"]:
        c, m = r["concept"], r["method"]
        r1 = rows1.get((c, m))
        if r1 is None:
            continue
        a1 = one["details"][f"{m}-{c}"]["attack"]["unlearndiffatk"]["success"]
        a2 = two["details"][f"{m}-{c}"]["attack"]["unlearndiffatk"]["success"]
        agree = sum(x == y for x, y in zip(a1, a2[: len(a1)]))
        half = ["—", "—"]
        if m == "advunlearn":
            for i, data in enumerate((one, two)):
                t = data["targets"].get(c, {}).get("advunlearn_asr_le_half_esd", {})
                half[i] = ("—" if "ci95" not in t else
                           f"{t['verdict']}: {_est(t['estimate'], t['ci95'], 100, 1, ' points', sign=True)}")
        same = all(r[k] == r1[k] for k in ("ua", "ira"))
        out.append("| " + " | ".join([
            f"{c} ({r['factor']})", m, _share(r["ua"], r.get("ua_ci95")),
            "yes" if same else f"**no**: UA {r1['ua']:.1%}, IRA {r1['ira']:.1%} there",
            _erasure_rate(r1, "asr_unlearndiffatk", None), _erasure_rate(r, "asr_unlearndiffatk", None),
            f"{agree}/{len(a1)}", *half]) + " |")
    return "\n".join(out + ["", *_target_counts(two)])


def erasure_six_targets(runs: list) -> str:
    """The six-concept targets counted (the README's summary of :func:`erasure_six`)."""
    if any(run is None for run in runs):
        return erasure_six(runs)
    return "\n".join(_target_counts(merge_erasure_runs(runs)))


def attack_batch_speed(data: dict) -> str:
    """UnlearnDiffAtk's prompts in batches against one at a time (benchmarks/attack_batch_speed.py)."""
    s = data["setting"]
    rows = [f"{s['prompts']} forget prompts of \"star\", {s['prefix_tokens']} tokens, {s['iterations']} iterations x "
            f"{s['timesteps']} timesteps, {s['num_inference_steps']}-step generations; "
            f"{data['environment']['device']}, {data['environment']['cpu_threads']} threads; measured "
            f"{data['environment']['date'][:10]}. Speed-up: median over {s['repeats']} interleaved repeats of "
            f"time(batch 1) / time(batch B), 95% bootstrap interval.", "",
            "| batch size | baseline | n | speed-up [95% CI] | s / prompt | baseline s / prompt "
            "| same tokens as batch 1 |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["results"]:
        lo, hi = r["ci95"]
        rows.append(f"| {r['batch_size']} | {r['baseline']} | {r['n']} | {r['speedup']:.2f}x [{lo:.2f}, {hi:.2f}] | "
                    f"{r['s_per_prompt']:.2f} | {r['baseline_s_per_prompt']:.2f} | "
                    f"{'yes' if r['same_tokens'] else 'no'} |")
    return "\n".join(rows)


#: The documented LoRA comparison: erasure_methods' protocol and ESD / AdvUnlearn training flags, its full
#: fine-tuning rows reused, UnlearnDiffAtk only (the table's attack column).
LORA_COMMAND = ("python benchmarks/erasure_lora.py --n-prompts 64 --seeds 0 1 --attack-prompts 32 --attack "
                "unlearndiffatk --attack-timesteps 10 --esd-steps 300 --esd-lr 5e-4 --sample-steps 10 "
                "--inference-steps 15 --adv-steps 200 --adv-lr 2e-4 --attack-steps 20 --reuse "
                "benchmarks/results/erasure_methods.json")


def erasure_lora(data: dict | None) -> str:
    """LoRA ranks against full fine-tuning of the same method, with the paired UA difference and issue 20's claim
    (benchmarks/erasure_lora.py); owed while its JSON does not exist."""
    command = LORA_COMMAND
    if data is None:
        return (f"_owed: run `{command}` (ESD and AdvUnlearn, full fine-tuning against LoRA ranks 4 and 16; not "
                "measured yet)._")
    comps = data.get("comparisons", {})

    def claim(r):
        c = comps.get(f"{r['method']}-{r['concept']}", {})
        d = c.get("ua")
        return ["—" if d is None else _est(d["difference"], d["ci95"], 100, 1, sign=True),
                c.get("verdict_ua_within_5pt", "—")]

    reused = data.get("reused")
    source = (f" The full fine-tuning rows ({', '.join(reused['methods'])}) are {reused['source']}'s, the same jobs "
              "(settings checked)." if reused else "")
    return "\n".join([_erasure_caption(data, "erasure_lora", command) + " UA - full: paired bootstrap over the same "
                      "images." + source, "",
                      *_erasure_main(data, (("artifact KiB", "storage_kib", "{:.0f}"),),
                                     extra_heads=("UA - full, points [95% CI]", "UA - full >= -5 points"),
                                     extra_cells=claim)])


#: The LoRA comparison on the other three concepts: the documented command on erasure_methods_new.json's rows.
LORA_SIX_FILES = ("erasure_lora.json", "erasure_lora_new.json")
LORA_SIX_COMMAND = (LORA_COMMAND.replace("erasure_methods.json", "erasure_methods_new.json") +
                    " --concepts circle blue dotted --tag _new")


def _lora_counts(data: dict) -> list[str]:
    """Per LoRA setting, the concepts where UA(LoRA) - UA(full) >= -5 points is met / missed / not resolved."""
    comps = data.get("comparisons", {})
    concepts = data["setting"]["concepts"]
    settings = [m for m in data["setting"]["methods"] if not m.endswith("-full")]
    out = [f"Issue 20's claim per LoRA setting over the {len(concepts)} concepts (UA - full >= -5 points, paired "
           "interval as above):", "", *_header("setting", "met", "missed", "not resolved")]
    for m in settings:
        verdicts = {c: comps.get(f"{m}-{c}", {}).get("verdict_ua_within_5pt", "—") for c in concepts}
        by = {v: [c for c in concepts if verdicts[c].startswith(v)] for v in ("met", "missed", "not resolved")}
        out.append(f"| {m} | " + " | ".join(f"{len(v)}" + (f" ({', '.join(v)})" if v else "")
                                            for v in by.values()) + " |")
    return out


def erasure_lora_six(runs: list) -> str:
    """The LoRA comparison on the six concepts: the documented run and its run on circle, blue and dotted merged
    (every setting but the concepts and the reused file checked equal), then the claim counted per setting."""
    first, new = runs
    if first is None:
        return erasure_lora(None)
    if new is None:
        return erasure_lora(first) + f"\n\n_owed: circle, blue and dotted (run `{LORA_SIX_COMMAND}`)._"
    data = merge_erasure_runs(runs)
    sources = " and ".join(f"{r['reused']['source']}'s" for r in runs if r.get("reused"))
    table = erasure_lora(dict(data, reused=None)).splitlines()
    table[0] = (f"Merged from {' and '.join(f'`{f}`' for f in LORA_SIX_FILES)} (every setting but the concepts "
                f"equal, checked); the full fine-tuning rows are {sources}, the same jobs (settings checked). "
                + table[0])
    return "\n".join([*table, "", *_lora_counts(data)])


#: What the GPU suite owes (section -> figures); listed as "owed" while benchmarks/results/gpu_suite.json is absent.
GPU_OWED = {
    "parity": "CUDA fp16 parity with diffusers: no guidance / CFG / DeepCache N=1, SDPA and xformers",
    "sd15_e2e": "SD 1.5 512 px, 50 DDIM steps, CFG 7.5, end to end: diffusers, diffkit eager and compiled, "
                "DeepCache N=3 / 5 eager and compiled, DeepCacheSDHelper (targets: <= 0.30 s with N=3 + compile; "
                "overhead <= 1%; within 90% of the MAC ceiling)",
    "sdxl_deepcache": "SDXL 1024 px DeepCache (target <= 1.0 s)",
    "overhead": "the guided call's overhead vs diffusers (fp16, 512 px)",
    "guidance": "APG, CFG++ vs CFG per step (fp16, 512 px)",
    "pruned": "pruned U-Net latency and peak memory (-20% parameters)",
    "erasure": "each erasure method's seconds per step and peak memory (bf16, 512 px)",
    "mask_learning": "mask learning's peak memory on SDXL 1024 px",
}


def _gpu_figures(name: str, res: dict) -> str:
    """The headline numbers of one measured GPU-suite section, in one cell."""
    if name == "parity":
        rows = [r for r in res["rows"] if "equal" in r]
        return "; ".join(f"{r['backend']} {r['case']}: max diff {r['max_abs_diff']:.2g}" for r in rows)
    if name in ("sd15_e2e", "sdxl_deepcache"):
        return "; ".join(f"{r['config']} {r['median_s']:.3f} s" for r in res["rows"])
    if name == "overhead":
        return "; ".join(f"{r['pipeline']} {_pct(r['ratio'])}" for r in res["results"])
    if name == "guidance":
        return "; ".join(f"{r['scheduler']}/{r['method']} {r['overhead_pct']:+.1f}%" for r in res["results"])
    if name == "pruned":
        return "; ".join(f"{r['config']} {r['speedup_vs_unpruned']:.2f}x, peak {r['peak_memory_ratio']:.2f}"
                         for r in res["inference"]["sd15"]["rows"])
    if name == "erasure":
        return "; ".join(f"{r['method']} {r['s_per_step']:.2f} s/step, {r['peak_gib']:.1f} GiB"
                         for part in ("part1", "part2") for r in res[part]["results"])
    if name == "mask_learning":
        return "; ".join(f"{r['steps']} steps{' checkpointed' if r['checkpointing'] else ''}: "
                         + ("OOM" if r.get("oom") else f"{r['peak_bytes'] / 2**30:.1f} GiB")
                         for r in res["learning"]["rows"])
    return "see the JSON"


def gpu_suite(data: dict | None) -> str:
    rows = ["| section | figures | status |", "| --- | --- | --- |"]
    sections = (data or {}).get("sections", {})
    for name, what in GPU_OWED.items():
        entry = sections.get(name)
        if entry is None:
            status = "owed"
        elif entry["status"] == "done":
            status = f"{_gpu_figures(name, entry['results'])} ({entry['seconds']:.0f} s)"
        else:
            status = f"owed ({entry['status']}: {entry.get('reason', '')})"
        rows.append(f"| {name} | {what} | {status} |")
    return "\n".join(rows)


#: table name -> (results file, renderer)
TABLES = {
    "speed_targets": ("speed_cpu.json", speed_targets),
    "reference_costs": ("reference_model.json", reference_costs),
    "reference_model": ("reference_model.json", reference_model),
    "reference_pilot_ztsnr": ("reference_model_pilot_ztsnr.json", reference_model),
    "reference_v4": ("reference_model_v4.json", reference_model),
    "reference_guidance_sweep": ("reference_model_guidance_sweep.json", reference_guidance_sweep),
    "reference_ztsnr_floor01_3500": ("reference_model_ztsnr_floor0.1_step3500.json", reference_model),
    "guiders_summary": ("guiders_quality.json", guiders_summary),
    "overhead_cpu": ("overhead_cpu.json", overhead_cpu),
    "guiders_quality": ("guiders_quality.json", guiders_quality),
    "apg_sweep": ("guiders_quality.json", apg_sweep),
    "guiders_overhead": ("guiders_overhead_cpu.json", guiders_overhead),
    "speed_cpu": ("speed_cpu.json", speed_cpu),
    "speed_compile": ("speed_cpu.json", speed_compile),
    "gpu_suite": ("gpu_suite.json", gpu_suite),
    "guidance_quality": ("guidance_quality.json", guidance_quality),
    "deepcache_quality": ("deepcache_quality.json", deepcache_quality),
    "pruning_quality": ("pruning_quality.json", pruning_quality),
    "pruning_quality_short_learning": ("pruning_quality_v5_small_learning.json", pruning_quality),
    "pruning_sweep": ("pruning_quality*.json", pruning_sweep),
    "erasure_quality": ("erasure_quality.json", erasure_quality),
    "erasure_methods": ("erasure_methods.json", erasure_methods),
    "erasure_targets": ("erasure_methods.json", erasure_targets),
    "erasure_lora": ("erasure_lora.json", erasure_lora),
    "attack_batch_speed": ("attack_batch_speed.json", attack_batch_speed),
    "advunlearn_sweep": ("erasure_methods*.json", advunlearn_sweep),
    "erasure_lora_sweep": ("erasure_lora*.json", erasure_lora_sweep),
    # erasure_quality*.json and erasure_methods*.json: every run that may have trained ESD
    "esd_sweep": ("erasure_[mq]*.json", esd_sweep),
    "doco_sweep": ("erasure_methods*.json", doco_sweep),
    "erasure_lora_six": (LORA_SIX_FILES, erasure_lora_six),
    "erasure_six": ((*SIX_FILES, *ORIGINAL_FILES), erasure_six),
    "erasure_six_targets": (SIX_FILES, erasure_six_targets),
    "erasure_attack_seeds": ((*SIX_FILES, SEEDS2_FILE), erasure_attack_seeds),
}
#: tables rendered from ``None`` while their results file does not exist yet (what is owed)
OPTIONAL = {"gpu_suite", "erasure_lora"}


def _finished(path: Path) -> dict | None:
    """A results file's JSON; None when it does not exist or is a run still going (or killed): its partial JSON
    (``"complete": false``) would put half a run beside finished ones."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return None if data.get("complete") is False else data


def render(name: str) -> str:
    file, fn = TABLES[name]
    if isinstance(file, tuple):  # runs merged into one table: [JSON, or None while the run is owed or running]
        return fn([_finished(RESULTS / f) for f in file])
    if "*" in file:  # several runs side by side: {file name: JSON}, the smoke runs and unfinished runs left out
        runs = {p.name: _finished(p) for p in sorted(RESULTS.glob(file)) if "smoke" not in p.name}
        return fn({name: data for name, data in runs.items() if data is not None})
    if name in OPTIONAL and not (RESULTS / file).is_file():
        return fn(None)
    return fn(json.loads((RESULTS / file).read_text(encoding="utf-8")))


def rewrite(text: str) -> str:
    def sub(m):
        return f"{m.group(1)}\n{render(m.group(2))}\n{m.group(3)}"

    return re.sub(r"(<!-- table:(\w+) -->)\n(?:.*?\n)?(<!-- /table:\2 -->)", sub, text, flags=re.S)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when a file differs from what would be written")
    args = ap.parse_args(argv)
    stale = []
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        new = rewrite(text)
        if new != text:
            stale.append(str(path.relative_to(ROOT)))
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print("stale generated tables in: " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
