"""Every GPU figure diffkit owes, in one command that ends within 9 minutes on one H200 (issue 19).

Sections, in priority order (each runs under its own time cap, never past the whole budget: a section that
would not fit is recorded as "skipped", one that overruns as "timeout", so one call yields every figure
that fits and says which did not):

* ``parity``     CUDA fp16: diffkit vs diffusers latents with no guidance, CFG 7.5 and DeepCache N = 1, with
                 SDPA and (when installed) xformers; equal / max abs difference.
* ``sd15_e2e``   SD 1.5 512 px, 50 DDIM steps, CFG 7.5, fp16, end to end (latents out), interleaved: diffusers
                 eager, diffkit eager and compiled, DeepCache N = 3 / 5 (branch 0) eager and compiled,
                 ``DeepCacheSDHelper`` N = 3 / 5; speedups and the MAC ceiling N / (1 + (N - 1) r) reached.
* ``sdxl_deepcache`` SDXL 1024 px U-Net loop (``deepcache_speed.time_unet_loops``), eager.
* ``overhead``   ``benchmarks/overhead.py`` (diffkit no feature and the guided call vs diffusers).
* ``guidance``   ``benchmarks/guidance_overhead.py`` (APG, CFG++ vs CFG per step).
* ``pruned``     ``benchmarks/pruning_speed.py --arch sd15 --part inference`` (20% fewer parameters).
* ``erasure``    ``benchmarks/erasure_gpu.py`` and ``erasure_gpu_part2.py``: each method's s/step and peak memory.
* ``mask_learning`` ``benchmarks/pruning_speed.py --arch sdxl --part learn``: mask learning's peak memory.

The scripts of the later sections are run in this process through their own ``main`` (they write their own
JSON; it is copied in here without raw timings). Writes benchmarks/results/gpu_suite.json after every
section (``--smoke``: gpu_suite_smoke.json) and, at the end, its markdown table (gpu_suite.md, the renderer of
``benchmarks/report.py``, which also puts it in the README).

    python benchmarks/gpu_suite.py            # one H200, <= 9 min
    python benchmarks/gpu_suite.py --smoke    # the same code on CPU with tiny models, < 2 min
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deepcache_speed  # noqa: E402
import erasure_gpu  # noqa: E402
import erasure_gpu_part2  # noqa: E402
import guidance_overhead  # noqa: E402
import overhead  # noqa: E402
import pruning_speed  # noqa: E402
import report  # noqa: E402
import speed_cpu  # noqa: E402
from _common import RESULTS, environment, interleaved, median, sd15_for_timing, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.guidance import CFG  # noqa: E402

#: The sections' caps (``SECTIONS``) add up to about this; what is left of it bounds each section too.
BUDGET_S = 500  # of the 9 minutes: startup (imports, CUDA context) and the last write take the rest


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise :class:`SectionTimeout` in this (main) thread after ``seconds`` (SIGALRM): a section that overruns
    its cap ends there instead of taking the next sections' time."""
    def fire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s cap")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ---------------------------------------------------------------------------------------------------------
# Sections measured here
# ---------------------------------------------------------------------------------------------------------

def parity(ctx) -> dict:
    """diffkit vs diffusers, the same seed: no guidance, CFG, DeepCache N = 1; per attention backend."""
    from diffusers.utils import is_xformers_available

    from diffkit.attention import set_attention_backend

    base, size = ctx["base"], ctx["size"]
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    ours.set_progress_bar_config(disable=True)
    steps = 4 if ctx["smoke"] else 20
    cases = {"no guidance": (dict(guidance_scale=1.0), dict(guidance_scale=1.0), False),
             "CFG 7.5": (dict(guidance_scale=7.5), dict(guidance=CFG(7.5)), False),
             "DeepCache N=1": (dict(guidance_scale=7.5), dict(guidance_scale=7.5), True)}
    rows = []
    for backend in ("sdpa", "xformers"):
        if backend == "xformers" and not is_xformers_available():
            rows.append(dict(backend=backend, case="-", status="xformers not installed"))
            continue
        set_attention_backend(base.unet, backend)  # shared by both pipelines
        for case, (theirs_kw, ours_kw, cache) in cases.items():
            a = speed_cpu.caller(base, size, steps, **theirs_kw)()
            if cache:
                ours.enable_deepcache(interval=1)
            b = speed_cpu.caller(ours, size, steps, **ours_kw)()
            ours.disable_deepcache()
            rows.append(dict(backend=backend, case=case, steps=steps, equal=bool(torch.equal(a, b)),
                             max_abs_diff=float((a.float() - b.float()).abs().max())))
    set_attention_backend(base.unet, "sdpa")
    return dict(rows=rows)


def sd15_e2e(ctx) -> dict:
    """SD 1.5 end to end, 50 DDIM steps with CFG: eager, compiled, DeepCache and the reference helper."""
    base, size, device = ctx["base"], ctx["size"], ctx["device"]
    steps, repeats = (10, 1) if ctx["smoke"] else (50, 3)
    backend = "eager" if ctx["smoke"] else "inductor"
    cfg = dict(guidance_scale=7.5)
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    compiled = speed_cpu.compiled_pipe(base, base.unet, backend)
    cached = speed_cpu.with_unet(base, copy.deepcopy(base.unet))
    cached_c = speed_cpu.compiled_pipe(base, copy.deepcopy(base.unet), backend)
    helper_class = speed_cpu.deepcache_helper()
    if helper_class is not None:
        helped = speed_cpu.with_unet(base, copy.deepcopy(base.unet), ours=False)
        helper = helper_class(pipe=helped)
    fns = {"diffusers": speed_cpu.caller(base, size, steps, **cfg),
           "diffkit": speed_cpu.caller(ours, size, steps, **cfg),
           "diffkit compiled": speed_cpu.caller(compiled, size, steps, **cfg)}
    for n in (3, 5):
        fns[f"DeepCache N={n}"] = speed_cpu.deepcache_caller(cached, size, steps, n, 0, "uniform", {}, "")
        fns[f"DeepCache N={n} compiled"] = speed_cpu.deepcache_caller(cached_c, size, steps, n, 0, "uniform", {}, "")
        if helper_class is not None:
            fns[f"DeepCacheSDHelper N={n}"] = speed_cpu.helper_caller(helped, helper, size, steps, n, 0, {}, "")
    compile_s = {}
    for name in ("diffkit compiled", "DeepCache N=3 compiled"):
        compile_s[name] = speed_cpu.timed(fns[name], device)  # first call: compiles (N=5 reuses the graphs)
    times = interleaved(fns, device, repeats, warmup=1)
    ceil = speed_cpu.mac_ceilings(base.unet, size, steps)
    rows = []
    for name, ts in times.items():
        r = dict(config=name, median_s=median(ts), min_s=min(ts), max_s=max(ts),
                 speedup_vs_diffusers=median(times["diffusers"]) / median(ts))
        if name.startswith(("DeepCache N=", "DeepCacheSDHelper N=")):
            n = int(name.split("N=")[1].split()[0])
            eager_ref = "diffkit compiled" if name.endswith("compiled") else "diffkit"
            r["speedup_vs_no_cache"] = median(times[eager_ref]) / median(ts)
            r["mac_ceiling"] = ceil[n, 0][1]
            r["share_of_ceiling"] = r["speedup_vs_no_cache"] / r["mac_ceiling"]
        rows.append(r)
    return dict(steps=steps, repeats=repeats, size=size, backend=backend, compile_first_call_s=compile_s, rows=rows,
                targets={"DeepCache N=3 compiled <= 0.30 s": "see median_s", "overhead <= 1%": "diffkit vs diffusers",
                         "DeepCache within 90% of its MAC ceiling": "share_of_ceiling >= 0.9"},
                note="random weights: image PSNR vs the uncached image is owed to real weights")


def sdxl_deepcache(ctx) -> dict:
    """SDXL U-Net loop at 1024 px (tiny SDXL at 64 px with smoke), no cache vs N = 2 / 3 / 5, branch 0 and 1."""
    from diffusers import DDIMScheduler

    from diffkit.zoo import build_full_unet
    from diffkit.zoo.tiny import SD_SCHEDULER

    device, dtype = ctx["device"], ctx["dtype"]
    arch, size = ("tiny-sdxl", 64) if ctx["smoke"] else ("sdxl", 1024)
    steps, repeats = (6, 1) if ctx["smoke"] else (50, 2)
    unet = deepcache_speed._tiny_unet(arch) if ctx["smoke"] else build_full_unet("sdxl", device=device)
    unet = unet.to(device, dtype).eval()
    macs = {(r["arch"], r["branch"]): r["ratio"]
            for r in deepcache_speed.mac_table([arch], lambda a: size, branches=deepcache_speed.BRANCHES)}
    with torch.no_grad():
        times = deepcache_speed.time_unet_loops(arch, unet, DDIMScheduler(**SD_SCHEDULER), size, device, dtype, steps,
                                                repeats, None)
    return dict(steps=steps, repeats=repeats, size=size,
                rows=deepcache_speed.rows_from(times, macs, arch, "unet_loop", "eager", steps))


# ---------------------------------------------------------------------------------------------------------
# Sections run through the existing scripts
# ---------------------------------------------------------------------------------------------------------

def script(module, argv: list[str], result: str, smoke_argv: tuple[str, ...] = ()):
    """A section that runs ``module.main(argv)`` and returns its JSON (``result`` or its _smoke twin);
    ``smoke_argv`` is added with ``--smoke`` (fewer steps: the smoke run is a logic check)."""
    def run(ctx) -> dict:
        args = argv + (["--smoke", *smoke_argv] if ctx["smoke"] else [])
        code = module.main(args)
        name = result.replace(".json", "_smoke.json") if ctx["smoke"] else result
        data = json.loads((RESULTS / name).read_text())
        data.pop("raw_seconds", None)
        data.pop("environment", None)
        return dict(exit_code=code, argv=args, file=name, **data)
    return run


def erasure(ctx) -> dict:
    steps = ["--steps", "2" if ctx["smoke"] else "3"]
    return dict(part1=script(erasure_gpu, steps, "erasure_gpu.json")(ctx),
                part2=script(erasure_gpu_part2, steps, "erasure_gpu_part2.json")(ctx))


#: name -> (function, GPU time cap in seconds), in priority order.
SECTIONS = {
    "parity": (parity, 30),
    "sd15_e2e": (sd15_e2e, 180),
    "sdxl_deepcache": (sdxl_deepcache, 50),
    "overhead": (script(overhead, ["--repeats", "5"], "overhead.json", ("--steps", "10")), 30),
    "guidance": (script(guidance_overhead, ["--repeats", "3"], "guidance_overhead.json", ("--steps", "10")), 40),
    "pruned": (script(pruning_speed, ["--arch", "sd15", "--part", "inference", "--repeats", "3"],
                      "pruning_speed.json"), 35),
    "erasure": (erasure, 100),
    "mask_learning": (script(pruning_speed, ["--arch", "sdxl", "--part", "learn"], "pruning_speed.json"), 45),
}


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

def finite_numbers(obj) -> bool:
    """Whether every number in ``obj`` is finite (NaN / inf would mean a failed measurement)."""
    if isinstance(obj, dict):
        return all(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return all(finite_numbers(v) for v in obj)
    return not isinstance(obj, float) or math.isfinite(obj)


def run_sections(ctx, names, budget_s: float, payload: dict, name: str) -> None:
    t0 = time.perf_counter()
    for sec in names:
        fn, cap = SECTIONS[sec]
        left = budget_s - (time.perf_counter() - t0)
        limit = min(cap, left) if not ctx["smoke"] else left
        entry = dict(cap_s=cap)
        if limit < 0.5 * cap and not ctx["smoke"]:
            entry.update(status="skipped", reason=f"{left:.0f} s of the budget left, cap {cap} s")
        else:
            s0 = time.perf_counter()
            try:
                with deadline(limit):
                    entry.update(status="done", results=fn(ctx))
            except SectionTimeout as e:
                entry.update(status="timeout", reason=str(e))
            except (Exception, SystemExit) as e:  # noqa: BLE001 - a failed section must not end the suite
                entry.update(status="error", reason=f"{type(e).__name__}: {e}")
            entry["seconds"] = time.perf_counter() - s0
            if ctx["device"] == "cuda":
                entry["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
        payload["sections"][sec] = entry
        print(f"[{time.perf_counter() - t0:.0f} s] {sec}: {entry['status']} {entry.get('reason', '')}", flush=True)
        payload["wall_s"] = time.perf_counter() - t0
        write_json(name, payload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code on CPU with tiny models (< 2 min)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {','.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all sections together")
    args = ap.parse_args(argv)
    names = args.only.split(",")
    if not set(names) <= set(SECTIONS):
        ap.error(f"--only takes sections of {','.join(SECTIONS)}")
    if args.smoke:
        torch.set_num_threads(2)
    base, device, dtype, size = sd15_for_timing(ap, args.smoke)
    ctx = dict(smoke=args.smoke, base=base, device=device, dtype=dtype, size=size)
    name = "gpu_suite_smoke.json" if args.smoke else "gpu_suite.json"
    payload = dict(benchmark="gpu_suite", smoke=args.smoke, environment=environment(), budget_s=args.budget,
                   setting=dict(dtype=str(dtype), size=size, scheduler="DDIM", guidance_scale=7.5), sections={})
    run_sections(ctx, names, args.budget, payload, name)
    payload["all_finite"] = finite_numbers(payload["sections"])
    print(f"wrote {write_json(name, payload)}")
    table = report.gpu_suite(json.loads(json.dumps(payload)))  # the README's renderer, on what was just written
    (RESULTS / name.replace(".json", ".md")).write_text(table + "\n", encoding="utf-8")
    print(table)
    done = [s for s, e in payload["sections"].items() if e["status"] == "done"]
    print(f"{len(done)}/{len(names)} sections done: {', '.join(done)}")
    return 0 if len(done) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
