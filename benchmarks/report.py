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
    "guiders_summary": ("guiders_quality.json", guiders_summary),
    "overhead_cpu": ("overhead_cpu.json", overhead_cpu),
    "guiders_quality": ("guiders_quality.json", guiders_quality),
    "apg_sweep": ("guiders_quality.json", apg_sweep),
    "guiders_overhead": ("guiders_overhead_cpu.json", guiders_overhead),
    "speed_cpu": ("speed_cpu.json", speed_cpu),
    "speed_compile": ("speed_cpu.json", speed_compile),
    "gpu_suite": ("gpu_suite.json", gpu_suite),
}
#: tables rendered from ``None`` while their results file does not exist yet (what is owed)
OPTIONAL = {"gpu_suite"}


def render(name: str) -> str:
    file, fn = TABLES[name]
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
