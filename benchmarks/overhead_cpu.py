"""The lifecycle's overhead with every feature off, against plain diffusers, on this CPU, interleaved.

Two models: the shipped reference model (128 px, 25 DDIM steps) and the full-size SD 1.5 architecture
(random weights, float32, 256 px, latents out). Per model, three configurations run alternately in one
process: plain diffusers, the diffkit pipeline with no feature (``guidance_scale=7.5``), and the same with
``guidance=CFG(7.5)`` (the guided call: one U-Net hook and a wrapped step). The figure is the per-repeat
ratio to the diffusers run next to it; reported as the median with a 95% bootstrap interval over repeats
(`diffkit.evaluation` has no timing statistics; the bootstrap here is 2000 resamples of the ratios).
Target (issue 15): the diffkit pipeline with no feature within 1% of diffusers ("met" when the interval's
upper end is <= 1.01). Writes benchmarks/results/overhead_cpu.json and prints the table.

    python benchmarks/overhead_cpu.py                 # ~6 min on 2 cores
    python benchmarks/overhead_cpu.py --smoke         # tiny SD 1.5, seconds (logic check)
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved, print_table, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.guidance import CFG  # noqa: E402


def bootstrap_median(xs: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def models(smoke: bool):
    from diffkit.zoo import build_full_pipeline, build_tiny_pipeline, load_reference_pipeline

    if smoke:
        yield "tiny-sd15", build_tiny_pipeline("sd15"), 64, 4
        return
    ref = load_reference_pipeline("cpu")
    yield "reference", diffusers_copy(ref), 128, 25
    yield "sd15-full-256px", build_full_pipeline("sd15", device="cpu", dtype=torch.float32), 256, 6


def diffusers_copy(pipe):
    """The same components in a plain diffusers pipeline of the parent class."""
    parent = next(c for c in type(pipe).__mro__ if c.__module__.startswith("diffusers."))
    return parent(**pipe.components)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, raw = [], {}
    for name, base, size, steps in models(args.smoke):
        base.set_progress_bar_config(disable=True)
        ours = diffkit.DiffusionPipeline.from_pipe(base)
        kw = dict(prompt="a red star", num_inference_steps=steps, height=size, width=size, output_type="latent")

        def run(pipe, **extra):
            return lambda: pipe(generator=torch.Generator().manual_seed(0), **kw, **extra)

        times = interleaved({"diffusers": run(base, guidance_scale=7.5), "diffkit": run(ours, guidance_scale=7.5),
                             "diffkit_cfg": run(ours, guidance=CFG(7.5))}, "cpu", args.repeats)
        raw[name] = times
        for config in ("diffkit", "diffkit_cfg"):
            ratios = [a / b for a, b in zip(times[config], times["diffusers"])]
            lo, hi = bootstrap_median(ratios)
            rows.append(dict(model=name, config=config, n=len(ratios), median_ratio=statistics.median(ratios),
                             ci95_low=lo, ci95_high=hi, min_ratio=min(ratios), max_ratio=max(ratios),
                             diffusers_median_s=statistics.median(times["diffusers"]),
                             verdict=("met" if hi <= 1.01 else "missed" if lo > 1.01 else "not resolved at this n")
                             if config == "diffkit" else "reported"))
    print_table(rows)
    payload = dict(benchmark="overhead_cpu", smoke=args.smoke, target="diffkit / diffusers <= 1.01 (upper 95% bound)",
                   environment=environment(), threads=args.threads, repeats=args.repeats, results=rows,
                   raw_seconds=raw)
    path = write_json("overhead_cpu_smoke.json" if args.smoke else "overhead_cpu.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
