"""Per-step overhead of APG and CFG++ against CFG, interleaved in one run (target: < 2 %).

GPU (the issue's setting): full-size SD1.5 architecture (``diffkit.zoo.build_full_pipeline``), random
weights, fp16, 512px, batch 1, 50 steps, with DDIM and with DPM-Solver++(2M). Every method evaluates the
U-Net on the same [uncond, cond] batch, so any difference is the guidance rule and the step rule.
``--smoke`` runs the same comparison on a tiny pipeline on CPU (logic check; its ratios are noise).
Writes benchmarks/results/guidance_overhead.json (or guidance_overhead_smoke.json).

    python benchmarks/guidance_overhead.py            # on a CUDA machine
    python benchmarks/guidance_overhead.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved, median, print_table, sd15_for_timing, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.guidance import APG, CFG, CFGPlusPlus  # noqa: E402

METHODS = {"cfg": CFG(7.5), "apg": APG(7.5, eta=0.0, norm_threshold=15.0, momentum=-0.5),
           "apg_epsilon": APG(7.5, eta=0.0, norm_threshold=15.0, momentum=-0.5, space="epsilon"),
           "cfgpp": CFGPlusPlus(0.6)}
SCHEDULERS = ("DDIMScheduler", "DPMSolverMultistepScheduler")


def overhead_rows(times: dict[str, list[float]], steps: int) -> list[dict]:
    """Median time per call and per step, and each method's per-step overhead against CFG on that scheduler."""
    rows = []
    for key, ts in times.items():
        scheduler, method = key.split("/")
        base = median(times[f"{scheduler}/cfg"])
        rows.append(dict(scheduler=scheduler, method=method, median_s=median(ts), per_step_ms=1e3 * median(ts) / steps,
                         overhead_pct=100.0 * (median(ts) / base - 1.0)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args(argv)
    base, device, dtype, size = sd15_for_timing(ap, args.smoke)
    kw = dict(prompt="a red star", num_inference_steps=args.steps, height=size, width=size, output_type="latent")
    pipes = {}
    for name in SCHEDULERS:
        pipe = diffkit.DiffusionPipeline.from_pipe(base)
        pipe.scheduler = getattr(diffusers, name).from_config(base.scheduler.config)
        pipes[name] = pipe

    def run(pipe, guidance):
        return lambda: pipe(generator=torch.Generator(device).manual_seed(0), guidance=guidance, **kw)

    fns = {f"{s}/{m}": run(pipes[s], g) for s in SCHEDULERS for m, g in METHODS.items()}
    times = interleaved(fns, device, args.repeats)
    rows = overhead_rows(times, args.steps)
    print_table(rows)
    setting = dict(arch="tiny-sd15" if args.smoke else "sd15", dtype=str(dtype), size=size, steps=args.steps,
                   repeats=args.repeats, methods={k: repr(v) for k, v in METHODS.items()})
    payload = dict(benchmark="guidance_overhead", smoke=args.smoke, setting=setting,
                   environment=environment(), results=rows, raw_seconds=times)
    path = write_json("guidance_overhead_smoke.json" if args.smoke else "guidance_overhead.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
