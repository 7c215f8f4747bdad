"""Overhead of a diffkit pipeline with no features against plain diffusers, interleaved in one run.

GPU (the issue's setting): full-size SD1.5 architecture, random weights, fp16, 512px, 50 DDIM steps,
batch 1 with CFG 7.5. ``--smoke`` runs the same comparison on a tiny pipeline on CPU (logic check;
its ratio is noise-dominated). Writes benchmarks/results/overhead.json (or overhead_smoke.json).

    python benchmarks/overhead.py            # on a CUDA machine
    python benchmarks/overhead.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved, median, print_table, sd15_for_timing, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.guidance import CFG  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    base, device, dtype, size = sd15_for_timing(ap, args.smoke)
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    kw = dict(prompt="a red star", num_inference_steps=args.steps, height=size, width=size, output_type="latent")

    def run(pipe, **extra):
        return lambda: pipe(generator=torch.Generator(device).manual_seed(0), **kw, **extra)

    times = interleaved({"diffusers": run(base, guidance_scale=7.5), "diffkit": run(ours, guidance_scale=7.5),
                         "diffkit_cfg": run(ours, guidance=CFG(7.5))}, device, args.repeats)
    ref = median(times["diffusers"])
    rows = [dict(pipeline=name, median_s=median(ts), ratio=median(ts) / ref) for name, ts in times.items()]
    print_table(rows)
    payload = dict(benchmark="overhead", smoke=args.smoke, setting=dict(arch="tiny-sd15" if args.smoke else "sd15",
                   dtype=str(dtype), size=size, steps=args.steps, guidance_scale=7.5, repeats=args.repeats),
                   environment=environment(), results=rows, raw_seconds=times)
    path = write_json("overhead_smoke.json" if args.smoke else "overhead.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
