"""Per-step cost of every guider against CFG on this CPU, interleaved in one run.

Two measurements (the same idea as benchmarks/overhead_cpu.py):

* **Direct**, on the reference model (25 DDIM steps, 128 px): each guider's call time over CFG's next to it,
  median of the per-repeat ratios with a 95% bootstrap interval. The guiders that perturb the U-Net (PAG,
  SEG, SkipLayer, AutoGuidance) evaluate an extra batch row per image: their ratio is that cost.
* **Bound for the prediction-only guiders** at SD 1.5's 256 px latent size (4 x 32 x 32): their extra work is
  elementwise on the predictions, independent of the U-Net, so it is measured on the tiny SD 1.5 at 256 px
  (a U-Net of milliseconds), as the median paired difference guider - CFG in seconds per step, and divided
  by the full-size SD 1.5 step time of benchmarks/results/overhead_cpu.json. Target (issue 18): <= 2%.

    python benchmarks/guiders_overhead_cpu.py            # ~6 min
    python benchmarks/guiders_overhead_cpu.py --smoke    # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, interleaved, print_table, write_json  # noqa: E402
from diffusers.utils import is_kornia_available  # noqa: E402

import diffkit  # noqa: E402
from diffkit.evaluation import bootstrap_interval, verdict  # noqa: E402
from diffkit.guidance import CFG  # noqa: E402

PREDICTION_ONLY = ("cfg-zero-star", "tcfg", "mambo", "apg-mix") + (("fdg",) if is_kornia_available() else ())
PERTURBING = ("pag", "seg", "skip-layer")


def guiders() -> dict:
    from diffkit.guidance.diffusers_guiders import make_guider

    return {name: make_guider(name) for name in PREDICTION_ONLY + PERTURBING}


def timed_calls(pipe, steps, size, repeats):
    kw = dict(prompt="a red star", num_inference_steps=steps, height=size, width=size, output_type="latent")
    fns = {"cfg": lambda: pipe(generator=torch.Generator().manual_seed(0), guidance=CFG(7.5), **kw)}
    for name, g in guiders().items():
        fns[name] = lambda g=g: pipe(generator=torch.Generator().manual_seed(0), guidance=g, **kw)
    return interleaved(fns, "cpu", repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--tiny-repeats", type=int, default=40)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    from diffkit.zoo import build_tiny_pipeline, load_reference_pipeline

    rows = []
    ref = diffkit.to_diffkit(build_tiny_pipeline("sd15")) if args.smoke else load_reference_pipeline("cpu")
    ref.set_progress_bar_config(disable=True)
    steps = 4 if args.smoke else 25
    times = timed_calls(ref, steps, 64 if args.smoke else 128, 2 if args.smoke else args.repeats)
    for name in PREDICTION_ONLY + PERTURBING:
        ratios = [a / b for a, b in zip(times[name], times["cfg"])]
        lo, hi = bootstrap_interval(ratios, statistics.median)
        rows.append(dict(measure="direct, reference model", guider=name, n=len(ratios),
                         ratio=statistics.median(ratios), ci95_low=lo, ci95_high=hi,
                         verdict=verdict(lo, hi, 1.02, "<=") if name in PREDICTION_ONLY else "extra batch rows"))
    tiny = diffkit.to_diffkit(build_tiny_pipeline("sd15"))
    tiny.set_progress_bar_config(disable=True)
    tsteps = 6
    ttimes = timed_calls(tiny, tsteps, 256, 3 if args.smoke else args.tiny_repeats)
    full = RESULTS / "overhead_cpu.json"
    sd15 = next((r for r in json.loads(full.read_text())["results"] if r["model"] == "sd15-full-256px"), None) \
        if full.is_file() else None
    step_s = sd15["diffusers_median_s"] / 6 if sd15 else float("nan")
    for name in PREDICTION_ONLY:
        diffs = [(a - b) / tsteps for a, b in zip(ttimes[name], ttimes["cfg"])]
        est = statistics.median(diffs)
        lo, hi = bootstrap_interval(diffs, statistics.median)
        rows.append(dict(measure="bound, SD 1.5 256 px", guider=name, n=len(diffs), ratio=1 + est / step_s,
                         ci95_low=1 + lo / step_s, ci95_high=1 + hi / step_s, extra_s_per_step=est,
                         verdict=verdict(1 + lo / step_s, 1 + hi / step_s, 1.02, "<=")))
    print_table(rows)
    payload = dict(benchmark="guiders_overhead_cpu", smoke=args.smoke, target="prediction-only guiders <= 1.02 x CFG",
                   sd15_step_s=step_s, environment=environment(), results=rows,
                   raw_seconds=dict(reference=times, tiny_256px=ttimes))
    path = write_json("guiders_overhead_cpu_smoke.json" if args.smoke else "guiders_overhead_cpu.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
