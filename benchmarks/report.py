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
        best = max(same, key=lambda r: (_both(r), -r["saturation_diff"]["difference"]), default=None)
        rows.append(f"| CFG scale {scale}: less saturated *and* at least as accurate as CFG | "
                    f"{', '.join(both) or 'none'} (of {len(same)}) |")
        if best is not None:
            rows.append(f"| CFG scale {scale}: best guider (both verdicts met, then the largest saturation drop) | "
                        f"{best['setting']} ({best['saturation_diff']['difference']:+.3f} saturation, "
                        f"{100 * best['accuracy_diff']['difference']:+.1f} accuracy points) |")
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


#: table name -> (results file, renderer)
TABLES = {
    "reference_costs": ("reference_model.json", reference_costs),
    "reference_model": ("reference_model.json", reference_model),
    "guiders_summary": ("guiders_quality.json", guiders_summary),
    "overhead_cpu": ("overhead_cpu.json", overhead_cpu),
    "guiders_quality": ("guiders_quality.json", guiders_quality),
    "apg_sweep": ("guiders_quality.json", apg_sweep),
    "guiders_overhead": ("guiders_overhead_cpu.json", guiders_overhead),
}


def render(name: str) -> str:
    file, fn = TABLES[name]
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
