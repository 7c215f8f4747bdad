"""Speed, measured on this CPU: DeepCache, pruning, guidance and torch.compile against their baselines (issue 19).

The full-size SD 1.5 architecture (random weights: compute does not depend on them; float32, 256 px, latents
out, DDIM, CFG 7.5) through a real diffkit pipeline, plus the shipped reference model (128 px). Within each
section every configuration runs alternately in one process (``_common.interleaved``), so drift hits all
alike; a figure is the median of the per-repeat ratios to the baseline run next to it, with min / max and a
95% bootstrap interval (``diffkit.evaluation.bootstrap_interval``) judged by ``verdict``.

Sections (``--only a,b,...``):

* **a** diffkit with no feature vs plain diffusers (target <= +1%): direct, in the same interleave as (b), plus
  the bound from the tiny SD 1.5 (the extra seconds per call are Python work independent of the U-Net's size,
  measured at many repeats on a U-Net of milliseconds and divided by the big model's call time; as
  benchmarks/overhead_cpu.py).
* **b** DeepCache N = 2 / 3 / 5, branch 0 and 1, uniform and non-uniform vs no cache, and vs the reference
  implementation ``DeepCache.DeepCacheSDHelper`` (PyPI ``deepcache==0.1.1``, extra ``[bench]``) with the same
  uniform settings on a plain diffusers pipeline (the helper has no non-uniform mode). The steps are 15, the
  smallest count divisible by 3 and 5: its full-step fraction ceil(T/N)/T equals 50 steps' for N = 5 and is
  within 2% for N = 3, so the targets (stated for 50 steps) mean the same. Targets: N = 3 branch 0 >= 2.3x and
  >= the helper's speedup (diffkit's speedup / the helper's >= 1); N = 5 branch 0 >= 3.0x.
* **c** pruned U-Nets (-10 / -20 / -30% parameters; random unit scores binarized at that parameter reduction,
  saved as a spec and slimmed by ``pipe.load_pruning``) vs unpruned: one U-Net evaluation (CFG batch 2).
  Target: -20% parameters gives >= 10% lower latency (ratio <= 0.90).
* **d** APG, CFG++ and every diffusers guider (``make_guider``) vs CFG, per step (target <= +2% for APG and
  CFG++): direct on SD 1.5, and the bound from the tiny SD 1.5 at the same latent size (their extra work is
  elementwise on the predictions).
* **e** torch.compile (inductor) with and without DeepCache N = 3: compile time, steady-state ratio, and graphs
  and recompiles from ``torch._dynamo.utils.counters`` per phase (first call, next calls, interval and
  schedule changes, a second resolution); and, on the tiny SD 1.5 with dynamo's ``eager`` backend (the counts
  are dynamo's, the backend does not change them), how ``dynamic=None / False / True`` behave over three sizes.

A missed target gets a ``torch.profiler`` summary (top operators by self CPU time) of its configuration.
Writes benchmarks/results/speed_cpu.json (``--smoke``: speed_cpu_smoke.json; ``--only``: merged into it).

    python benchmarks/speed_cpu.py                  # ~35 min on 2 cores
    python benchmarks/speed_cpu.py --only c,d       # some sections
    python benchmarks/speed_cpu.py --smoke          # tiny models, seconds (logic check; ratios are noise)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, interleaved, print_table, timed, write_json  # noqa: E402
from guidance_overhead import METHODS  # noqa: E402  (the APG / CFG++ settings of the GPU benchmark)

import diffkit  # noqa: E402
from diffkit.evaluation import bootstrap_interval, verdict  # noqa: E402
from diffkit.guidance import CFG  # noqa: E402

PROMPT = "a red star"
INTERVALS = (2, 3, 5)
BRANCHES = (0, 1)
SCHEDULES = ("uniform", "non-uniform")
REDUCTIONS = (0.1, 0.2, 0.3)
SECTIONS = ("a", "b", "c", "d", "e")


# ---------------------------------------------------------------------------------------------------------
# Settings and models
# ---------------------------------------------------------------------------------------------------------

def settings(args) -> dict:
    """Steps, repeats and sizes of every section (recorded in the JSON). Chosen for ~35 min on 2 cores."""
    if args.smoke:
        return dict(size=64, ref_size=64, steps=6, ref_steps=6, repeats=2, ref_repeats=2, tiny_repeats=3,
                    prune_repeats=2, guide_steps=2, guide_repeats=2, compile_steps=6, compile_repeats=1,
                    second_size=80, backend="eager")
    return dict(size=256, ref_size=128, steps=15, ref_steps=25, repeats=args.repeats, ref_repeats=6,
                tiny_repeats=40, prune_repeats=8, guide_steps=2, guide_repeats=3, compile_steps=6,
                compile_repeats=2, second_size=320, backend="inductor")


def sd15(smoke: bool):
    """The diffusers SD 1.5 pipeline the sections time: full-size architecture (tiny with ``smoke``)."""
    from diffkit.zoo import build_full_pipeline, build_tiny_pipeline

    pipe = build_tiny_pipeline("sd15") if smoke else build_full_pipeline("sd15", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference(smoke: bool):
    """The reference model as a plain diffusers pipeline (tiny SD 1.5 with ``smoke``)."""
    from diffkit.zoo import load_reference_pipeline

    if smoke:
        return sd15(True)
    ref = load_reference_pipeline("cpu")
    parent = next(c for c in type(ref).__mro__ if c.__module__.startswith("diffusers."))
    pipe = parent(**ref.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_unet(base, unet, ours: bool = True):
    """A pipeline of ``base``'s components with its own ``unet`` (a diffkit one unless ``ours`` is False)."""
    pipe = type(base)(**{**base.components, "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return diffkit.DiffusionPipeline.from_pipe(pipe) if ours else pipe


def caller(pipe, size: int, steps: int, outputs: dict | None = None, key: str | None = None, **extra):
    """A timed callable: one seeded call, latents out; ``fn(steps=k)`` runs a shorter warm-up call."""
    full = steps

    def fn(steps=full):
        out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, height=size,
                   width=size, output_type="latent", **extra).images
        if outputs is not None and steps == full:  # keep the measured call's latents, not the warm-up's
            outputs[key] = out
        return out

    return fn


def warm(fns: dict, steps: int = 2, only=None) -> None:
    """One short call of each configuration (or of those in ``only``: one per pipeline): first-call
    allocations out of the timed repeats (a full warm-up round would cost as much as a repeat here)."""
    for name, fn in fns.items():
        if only is None or name in only:
            fn(steps=steps)


# ---------------------------------------------------------------------------------------------------------
# Statistics and rows
# ---------------------------------------------------------------------------------------------------------

def summarize(values: list[float], target: float | None = None, direction: str = ">=") -> dict:
    """Median, min / max and 95% bootstrap interval of per-repeat ratios; a verdict when there is a target."""
    lo, hi = bootstrap_interval(values, statistics.median)
    out = dict(n=len(values), median=statistics.median(values), ci95=[lo, hi], min=min(values), max=max(values))
    out["target"] = None if target is None else f"{direction} {target:g}"
    out["verdict"] = "reported" if target is None else verdict(lo, hi, target, direction)
    return out


def speedups(times: dict, config: str, baseline: str) -> list[float]:
    """Per repeat: baseline time / configuration time (the two ran next to each other)."""
    return [b / a for a, b in zip(times[config], times[baseline])]


def ratios(times: dict, config: str, baseline: str) -> list[float]:
    """Per repeat: configuration time / baseline time."""
    return [a / b for a, b in zip(times[config], times[baseline])]


def row(section, model, config, vs, unit, values, target=None, direction=">=", **extra) -> dict:
    return dict(section=section, model=model, config=config, vs=vs, unit=unit,
                **summarize(values, target, direction), **extra)


def profile_summary(fn, top: int = 8) -> dict:
    """Where the time of one call goes: the top operators by self CPU time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    best = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return dict(wall_s=wall, self_cpu_s=total,
                top_ops=[dict(op=e.key, calls=e.count, self_cpu_s=e.self_cpu_time_total / 1e6,
                              share=e.self_cpu_time_total / 1e6 / total) for e in best])


# ---------------------------------------------------------------------------------------------------------
# (a) + (b): overhead and DeepCache, one interleave per model
# ---------------------------------------------------------------------------------------------------------

def helper_caller(pipe, helper, size, steps, n, b, outputs, key):
    """The reference helper with the same uniform settings, wrapped around one call (enable ... disable)."""
    inner = caller(pipe, size, steps, outputs, key)

    def fn(steps=steps):
        helper.set_params(cache_interval=n, cache_branch_id=b, skip_mode="uniform")
        helper.enable()
        try:
            return inner(steps)
        finally:
            helper.disable()

    return fn


def deepcache_caller(pipe, size, steps, n, b, schedule, outputs, key):
    inner = caller(pipe, size, steps, outputs, key, guidance_scale=7.5)

    def fn(steps=steps):
        pipe.enable_deepcache(interval=n, branch=b, schedule=schedule)  # same branch: in place
        return inner(steps)

    return fn


def deepcache_configs(base, size, steps, outputs, with_deepcache: bool) -> dict:
    """diffusers, diffkit no cache, and (with ``with_deepcache``) every DeepCache setting and the helper's."""
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    ours.set_progress_bar_config(disable=True)
    fns = {"diffusers": caller(base, size, steps, outputs, "diffusers", guidance_scale=7.5),
           "no-cache": caller(ours, size, steps, outputs, "no-cache", guidance_scale=7.5)}
    if not with_deepcache:
        return fns
    cached = with_unet(base, copy.deepcopy(base.unet))
    helper_class = deepcache_helper()
    if helper_class is not None:
        helped = with_unet(base, copy.deepcopy(base.unet), ours=False)
        helper = helper_class(pipe=helped)
    for n in INTERVALS:
        for b in BRANCHES:
            for s in SCHEDULES:
                key = f"N={n} b={b} {s}"
                fns[key] = deepcache_caller(cached, size, steps, n, b, s, outputs, key)
            if helper_class is not None:
                key = f"helper N={n} b={b}"
                fns[key] = helper_caller(helped, helper, size, steps, n, b, outputs, key)
    return fns


def deepcache_helper():
    """``DeepCache.DeepCacheSDHelper`` (``pip install diffkit[bench]``), or None: its rows are then left out."""
    try:
        from DeepCache import DeepCacheSDHelper
    except ImportError:
        print("DeepCache (pip install 'diffkit[bench]') is not installed: no DeepCacheSDHelper rows", flush=True)
        return None
    return DeepCacheSDHelper


def mac_ceilings(unet, size, steps) -> dict:
    """MAC ratio r of a cached step (meta device) and the ceiling T / (F + (T - F) r) per (N, branch)."""
    from diffusers import UNet2DConditionModel

    from diffkit.cache import unet_macs
    from diffkit.cache.cost import speed_ceiling

    with torch.device("meta"):  # the same architecture, nothing allocated
        meta = UNet2DConditionModel.from_config(unet.config)
    macs = unet_macs(meta, branches=BRANCHES, batch=2, height=size // 8, width=size // 8)
    r = {b: macs["cached"][b] / macs["full"] for b in BRANCHES}
    return {(n, b): (r[b], speed_ceiling(n, r[b], num_steps=steps)) for n in INTERVALS for b in BRANCHES}


def equality(outputs: dict) -> list[dict]:
    """Outputs that must be equal, and why."""
    checks = [("no-cache", "diffusers", "diffkit with no feature runs diffusers' own denoising loop")]
    checks += [(f"N={n} b={b} uniform", f"helper N={n} b={b}",
                "same full steps (0, N, 2N, ...), same cached feature, same shallow layers recomputed: the same "
                "arithmetic in the same order") for n in INTERVALS for b in BRANCHES]
    out = []
    for a, b, why in checks:
        if a in outputs and b in outputs:
            x, y = outputs[a], outputs[b]
            out.append(dict(a=a, b=b, why=why, equal=bool(torch.equal(x, y)),
                            max_abs_diff=float((x - y).abs().max())))
    out.append(dict(a="N=* non-uniform", b="-", equal=None, why="not compared: the helper has no non-uniform mode "
                    "(its skip_mode is uniform-only), and diffkit's eq. 7 points differ from the authors' "
                    "experimental pipeline by design (diffkit/cache/schedule.py)"))
    return out


def section_ab(name, base, size, steps, repeats, sections, out, profiles_for) -> None:
    outputs = {}
    fns = deepcache_configs(base, size, steps, outputs, "b" in sections)
    warm(fns, only=("diffusers", "no-cache", "N=3 b=0 uniform", "helper N=3 b=0"))
    times = interleaved(fns, "cpu", repeats, warmup=0)
    out["raw_seconds"][f"ab/{name}"] = times
    rows = out["rows"]
    rows.append(row("a", name, "diffkit, no feature", "diffusers", "ratio", ratios(times, "no-cache", "diffusers"),
                    1.01, "<=", baseline_s=statistics.median(times["diffusers"])))
    if "b" not in sections:
        return
    ceil = mac_ceilings(base.unet, size, steps)
    for n in INTERVALS:
        for b in BRANCHES:
            target = {3: 2.3, 5: 3.0}.get(n) if b == 0 else None
            for s in SCHEDULES:
                rows.append(row("b", name, f"DeepCache N={n} b={b} {s}", "no cache", "x",
                                speedups(times, f"N={n} b={b} {s}", "no-cache"), target if s == "uniform" else None,
                                mac_ratio=ceil[n, b][0], mac_ceiling=ceil[n, b][1]))
                if s == "uniform" and target is not None:
                    profiles_for[rows[-1]["config"] + f" ({name})"] = (rows[-1], fns[f"N={n} b={b} {s}"])
            if f"helper N={n} b={b}" not in times:
                continue
            rows.append(row("b", name, f"DeepCacheSDHelper N={n} b={b}", "no cache", "x",
                            speedups(times, f"helper N={n} b={b}", "no-cache"), mac_ceiling=ceil[n, b][1]))
            vs_helper = speedups(times, f"N={n} b={b} uniform", f"helper N={n} b={b}")  # helper time / ours
            rows.append(row("b", name, f"DeepCache N={n} b={b} uniform", "DeepCacheSDHelper", "x", vs_helper,
                            1.0 if (n, b) == (3, 0) else None))
    out["equality"][name] = equality(outputs)


def tiny_bound(steps, repeats, base_s: float, model: str, out) -> None:
    """(a) bound: extra seconds per call of diffkit over diffusers on the tiny SD 1.5, over ``base_s``."""
    tiny = sd15(True)
    fns = deepcache_configs(tiny, 64, steps, None, with_deepcache=False)
    times = interleaved(fns, "cpu", repeats)
    out["raw_seconds"][f"a/tiny-{steps}-steps"] = times
    diffs = [a - b for a, b in zip(times["no-cache"], times["diffusers"])]
    r = row("a", model, "diffkit, no feature (bound from tiny)", "diffusers", "ratio",
            [1 + d / base_s for d in diffs], 1.01, "<=", extra_s=statistics.median(diffs), baseline_s=base_s)
    out["rows"].append(r)


# ---------------------------------------------------------------------------------------------------------
# (c) pruning
# ---------------------------------------------------------------------------------------------------------

def pruned_pipelines(base, tmp: Path) -> dict:
    """reduction -> (diffkit pipeline slimmed by ``load_pruning``, spec stats)."""
    from diffkit.pruning import binarize, find_units, read_spec, save_pruning

    units = find_units(base.unet)
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.rand(u.size, generator=g) for u in units}
    pipes = {}
    for red in REDUCTIONS:
        kept = binarize(scores, units, target_reduction=red, unet=base.unet)
        save_pruning(tmp / f"p{red}", base.unet, kept, config=dict(scores="random", target_reduction=red))
        pipe = with_unet(base, copy.deepcopy(base.unet))
        pipe.load_pruning(tmp / f"p{red}", keep_original=False)  # no full copy kept: memory
        pipes[red] = (pipe, read_spec(tmp / f"p{red}")[0].stats)
    return pipes


def section_c(base, model, size, repeats, out) -> None:
    from diffkit.cache.cost import example_inputs

    x = example_inputs(base.unet, batch=2, height=size // 8, width=size // 8)
    g = torch.Generator().manual_seed(0)
    x = {k: torch.randn(v.shape, generator=g) if k != "timestep" else v for k, v in x.items()}
    with tempfile.TemporaryDirectory() as tmp:
        pipes = pruned_pipelines(base, Path(tmp))

    def forward(unet):
        return lambda: unet(**x)

    fns = {"unpruned": forward(base.unet), **{f"-{round(100 * r)}%": forward(p.unet) for r, (p, _) in pipes.items()}}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        times = interleaved(fns, "cpu", repeats, warmup=0)
    out["raw_seconds"]["c"] = times
    for r, (_, stats) in pipes.items():
        key = f"-{round(100 * r)}%"
        out["rows"].append(row("c", model, f"pruned {key} params (U-Net evaluation)", "unpruned", "ratio",
                               ratios(times, key, "unpruned"), 0.90 if r == 0.2 else None, "<=",
                               param_reduction=stats["param_reduction"], mac_reduction=stats.get("mac_reduction"),
                               kept_fraction=stats["kept_fraction"], baseline_s=statistics.median(times["unpruned"])))
        if r == 0.2:
            pipe = pipes[r][0]
            out["_profiles_for"][f"pruned {key}"] = (out["rows"][-1], lambda u=pipe.unet: u(**x))


# ---------------------------------------------------------------------------------------------------------
# (d) guidance
# ---------------------------------------------------------------------------------------------------------

def guidance_objects() -> dict:
    from diffkit.guidance.diffusers_guiders import GUIDERS, make_guider

    objs = {"cfg": CFG(7.5), "apg": METHODS["apg"], "cfg++": METHODS["cfgpp"]}
    for name in GUIDERS:
        try:
            objs[name] = make_guider(name)
        except ImportError:  # FDG without kornia
            continue
    return objs


def guided_times(base, size, steps, repeats, warmup: bool) -> dict:
    pipe = diffkit.DiffusionPipeline.from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    fns = {name: caller(pipe, size, steps, guidance=g) for name, g in guidance_objects().items()}
    if warmup:
        warm(fns, 1)
    return interleaved(fns, "cpu", repeats, warmup=0 if warmup else 1), fns


def perturbing_names() -> set[str]:
    """The guiders that evaluate the U-Net on an extra (perturbed) batch row: their cost is a U-Net pass, not
    elementwise work, so the tiny-model bound does not apply to them."""
    from diffkit.guidance.diffusers_guiders import GUIDERS, PERTURBING

    return {name for name, (cls, *_) in GUIDERS.items() if cls in PERTURBING}


def section_d(base, model, size, st, out) -> None:
    perturbing = perturbing_names()
    steps = st["guide_steps"]
    times, fns = guided_times(base, size, steps, st["guide_repeats"], warmup=True)
    out["raw_seconds"]["d/sd15-full"] = times
    targets = {"apg": 1.02, "cfg++": 1.02}
    step_s = statistics.median(times["cfg"]) / steps
    for name in times:
        if name == "cfg":
            continue
        perturbs = name in perturbing
        out["rows"].append(row("d", model, f"{name} (direct)", "CFG", "ratio", ratios(times, name, "cfg"),
                               targets.get(name), "<=", note="extra batch row (perturbed U-Net pass)" if perturbs
                               else None, baseline_s=statistics.median(times["cfg"])))
        if name in targets:
            out["_profiles_for"][name] = (out["rows"][-1], fns[name])
    tiny = sd15(True)
    ttimes, _ = guided_times(tiny, size, steps, st["tiny_repeats"], warmup=False)
    out["raw_seconds"]["d/tiny-same-latent"] = ttimes
    for name in ttimes:
        if name == "cfg" or name in perturbing:
            continue
        diffs = [(a - b) / steps for a, b in zip(ttimes[name], ttimes["cfg"])]
        out["rows"].append(row("d", model, f"{name} (bound from tiny)", "CFG", "ratio",
                               [1 + d / step_s for d in diffs], targets.get(name, 1.02), "<=",
                               extra_s_per_step=statistics.median(diffs), baseline_step_s=step_s))


# ---------------------------------------------------------------------------------------------------------
# (e) torch.compile
# ---------------------------------------------------------------------------------------------------------

class _Recompiles(logging.Handler):
    """Counts dynamo's "Recompiling function ..." records (its counters hold no recompile count) and keeps the
    function and the first failed guard of each."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record):
        lines = record.getMessage().splitlines()
        self.reasons.append(" / ".join(line.strip() for line in lines[:1] + lines[2:3]))


RECOMPILES = _Recompiles()


def watch_recompiles() -> None:
    """Route dynamo's recompile log to :data:`RECOMPILES` (only there: not printed)."""
    torch._logging.set_logs(recompiles=True)
    log = logging.getLogger("torch._dynamo.guards.__recompiles")
    log.handlers = [RECOMPILES]
    log.propagate = False


def dynamo_counts() -> dict:
    """Graphs compiled, frames converted, graph breaks (``torch._dynamo.utils.counters``) and recompiles so far."""
    from torch._dynamo.utils import counters

    return dict(graphs=int(counters["stats"]["unique_graphs"]), frames=int(counters["frames"]["ok"]),
                recompiles=len(RECOMPILES.reasons), graph_breaks=int(sum(counters["graph_break"].values())))


def delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


class Phases:
    """Run labelled phases, recording each one's wall time and its dynamo counter deltas."""

    def __init__(self):
        self.rows = []

    def run(self, label: str, fn) -> float:
        before, n = dynamo_counts(), len(RECOMPILES.reasons)
        seconds = timed(fn, "cpu")
        self.rows.append(dict(phase=label, seconds=seconds, **delta(before, dynamo_counts()),
                              recompile_reasons=RECOMPILES.reasons[n:][:4]))
        return seconds


def compiled_pipe(base, unet, backend: str, dynamic=None):
    pipe = diffkit.DiffusionPipeline.from_pipe(with_unet(base, unet, ours=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.unet = torch.compile(unet, backend=backend, dynamic=dynamic)
    return pipe


def section_e(base, model, size, st, out) -> None:
    # A cold inductor cache: compile times from scratch, not from files an earlier process left in /tmp.
    cache = tempfile.mkdtemp(prefix="speed_cpu_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
    try:
        compile_section(base, model, size, st, out)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    out["compile"]["inductor_cache"] = "cold (a fresh TORCHINDUCTOR_CACHE_DIR)"


def compile_section(base, model, size, st, out) -> None:
    watch_recompiles()
    torch._dynamo.reset()
    steps, backend = st["compile_steps"], st["backend"]
    cached_unet = copy.deepcopy(base.unet)
    eager = diffkit.DiffusionPipeline.from_pipe(base)
    eager_dc = with_unet(base, cached_unet)
    comp, comp_dc = compiled_pipe(base, base.unet, backend), compiled_pipe(base, cached_unet, backend)
    for p in (eager_dc, comp_dc):
        p.enable_deepcache(interval=3, branch=0)
    fns = {"eager": caller(eager, size, steps), "compiled": caller(comp, size, steps),
           "eager DeepCache N=3": caller(eager_dc, size, steps),
           "compiled DeepCache N=3": caller(comp_dc, size, steps)}
    ph = Phases()
    first = ph.run("compiled, first call", fns["compiled"])
    again = ph.run("compiled, second call", fns["compiled"])
    first_dc = ph.run("compiled DeepCache N=3, first call", fns["compiled DeepCache N=3"])
    again_dc = ph.run("compiled DeepCache N=3, second call", fns["compiled DeepCache N=3"])
    for n, s in ((5, "uniform"), (2, "uniform"), (3, "non-uniform"), (3, "uniform")):
        comp_dc.enable_deepcache(interval=n, branch=0, schedule=s)
        ph.run(f"compiled DeepCache, interval {n} {s}", fns["compiled DeepCache N=3"])
    warm(fns)
    before = dynamo_counts()
    times = interleaved(fns, "cpu", st["compile_repeats"], warmup=0)
    ph.rows.append(dict(phase=f"steady state, {st['compile_repeats']} interleaved repeats x 4 configurations",
                        seconds=float("nan"), **delta(before, dynamo_counts())))
    second = st["second_size"]
    # The second resolution with DeepCache only (both of its graphs meet the new size): a full-size inductor
    # compile costs minutes here.
    for k in ("first", "second"):
        ph.run(f"compiled DeepCache N=3, {second} px, {k} call", caller(comp_dc, second, steps))
    ph.run(f"compiled DeepCache N=3, back to {size} px", caller(comp_dc, size, steps))
    out["raw_seconds"]["e"] = times
    rows = out["rows"]
    rows.append(row("e", model, "compiled", "eager", "x", speedups(times, "compiled", "eager")))
    rows.append(row("e", model, "compiled DeepCache N=3", "eager DeepCache N=3", "x",
                    speedups(times, "compiled DeepCache N=3", "eager DeepCache N=3")))
    rows.append(row("e", model, "compiled DeepCache N=3", "eager, no cache", "x",
                    speedups(times, "compiled DeepCache N=3", "eager")))
    med = {k: statistics.median(v) for k, v in times.items()}
    out["compile"] = dict(backend=backend, steps=steps, size=size, second_size=second, phases=ph.rows,
                          compile_s=dict(no_cache=first - again, deepcache=first_dc - again_dc),
                          steady_median_s=med, dynamic_modes=dynamic_modes(st))


def dynamic_modes(st) -> list[dict]:
    """Graphs and recompiles of the tiny SD 1.5 U-Net with DeepCache over three sizes, per ``dynamic=``."""
    tiny = sd15(True)
    rows = []
    for dynamic in (None, False, True):
        torch._dynamo.reset()
        pipe = compiled_pipe(tiny, copy.deepcopy(tiny.unet), "eager", dynamic)
        pipe.enable_deepcache(interval=3, branch=0)
        before = dynamo_counts()
        per_size = []
        for size in (64, 80, 96, 64):
            b, n = dynamo_counts(), len(RECOMPILES.reasons)
            caller(pipe, size, 6)()
            per_size.append(dict(size=size, **delta(b, dynamo_counts()), recompile_reasons=RECOMPILES.reasons[n:][:4]))
        rows.append(dict(dynamic=repr(dynamic), sizes=per_size, **delta(before, dynamo_counts())))
    torch._dynamo.reset()
    return rows


# ---------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------

def unet_eval_seconds(base, size) -> float:
    """One U-Net evaluation (CFG batch 2) at ``size``: the unit the budget was planned in."""
    from diffkit.cache.cost import example_inputs

    x = example_inputs(base.unet, batch=2, height=size // 8, width=size // 8)
    with torch.no_grad():
        base.unet(**x)
        return timed(lambda: base.unet(**x), "cpu")


def add_profiles(out, smoke: bool) -> None:
    """A torch.profiler summary for every missed or unresolved target (one call of its configuration)."""
    todo, out["_profiles_for"] = out["_profiles_for"], {}
    for label, (r, fn) in todo.items():
        if r["verdict"] in ("met", "reported") or (smoke and out["profiles"]):
            continue
        out["profiles"][label] = dict(verdict=r["verdict"], **profile_summary(fn))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny models, seconds (logic check)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections of a,b,c,d,e")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of the SD 1.5 DeepCache interleave")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sections = set(args.only.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--only takes sections of {','.join(SECTIONS)}, got {args.only!r}")
    torch.set_num_threads(args.threads)
    st = settings(args)
    t0 = time.perf_counter()
    name = "speed_cpu_smoke.json" if args.smoke else "speed_cpu.json"
    model = "tiny-sd15" if args.smoke else "sd15-full"
    out = dict(rows=[], raw_seconds={}, equality={}, profiles={}, errors={}, _profiles_for={})
    base = sd15(args.smoke)
    st["unet_eval_s"] = unet_eval_seconds(base, st["size"])
    print(f"one U-Net evaluation (batch 2, {st['size']} px): {st['unet_eval_s']:.2f} s", flush=True)

    def ab():
        pf = out["_profiles_for"]
        section_ab(model, base, st["size"], st["steps"], st["repeats"], sections, out, pf)
        section_ab("reference", reference(args.smoke), st["ref_size"], st["ref_steps"], st["ref_repeats"],
                   sections, out, pf)
        for r in [r for r in out["rows"] if r["section"] == "a" and "bound" not in r["config"]]:
            tiny_bound(st["ref_steps"] if r["model"] == "reference" else st["steps"], st["tiny_repeats"],
                       r["baseline_s"], r["model"], out)

    # Profiles right after each section: their callables hold that section's U-Net copies (memory).
    steps = [("a,b", ab, bool(sections & {"a", "b"})), ("profiles a,b", lambda: add_profiles(out, args.smoke), True),
             ("c", lambda: section_c(base, model, st["size"], st["prune_repeats"], out), "c" in sections),
             ("profiles c", lambda: add_profiles(out, args.smoke), True),
             ("d", lambda: section_d(base, model, st["size"], st, out), "d" in sections),
             ("profiles d", lambda: add_profiles(out, args.smoke), True),
             ("e", lambda: section_e(base, model, st["size"], st, out), "e" in sections)]
    for label, fn, wanted in steps:
        if not wanted:
            continue
        try:  # a failed section is recorded; the others still run and the JSON keeps what was measured
            with torch.no_grad():
                fn()
        except Exception as e:  # noqa: BLE001
            out["errors"][label] = f"{type(e).__name__}: {e}"
            print(f"section {label} failed: {out['errors'][label]}", flush=True)
        st["wall_s"] = time.perf_counter() - t0
        save(name, args, sections, out, st)
        print(f"[{st['wall_s']:.0f} s] {label} done", flush=True)
    print_table([{k: r[k] for k in ("section", "model", "config", "vs", "n", "median", "verdict")}
                 for r in out["rows"]])
    if "compile" in out:
        print_table([{k: v for k, v in r.items() if k != "recompile_reasons"} for r in out["compile"]["phases"]])
    print(f"wrote {RESULTS / name}")
    return 1 if out["errors"] else 0


def save(name, args, sections, out, st) -> None:
    payload = merged(name, sections, out)
    env = environment()
    # One entry per run that wrote this file (a later ``--only`` run keeps the earlier runs' entries).
    prev = payload.pop("_previous")
    old_runs = payload.get("runs") or ([prev] if prev["wall_s"] is not None else [])
    started = out.setdefault("_started", env["date"])
    runs = [r for r in old_runs if r["started"] != started]
    runs.append(dict(started=started, sections=sorted(sections), wall_s=st["wall_s"]))
    payload.update(benchmark="speed_cpu", smoke=args.smoke, environment=env, threads=args.threads,
                   settings=st, wall_s=st["wall_s"], runs=runs)
    write_json(name, payload)


def merged(name: str, sections: set, out: dict) -> dict:
    """With ``--only``, the other sections' rows of the existing JSON are kept."""
    path = RESULTS / name
    old = json.loads(path.read_text()) if path.is_file() and sections != set(SECTIONS) else {}
    keep = [r for r in old.get("rows", []) if r["section"] not in sections]
    payload = {**old, **{k: v for k, v in out.items() if k not in ("raw_seconds", "equality", "profiles", "errors")
                         and not k.startswith("_")}}
    for k in ("raw_seconds", "equality", "profiles", "errors"):
        payload[k] = {**old.get(k, {}), **out[k]}
    payload["rows"] = sorted(keep + out["rows"], key=lambda r: SECTIONS.index(r["section"]))
    payload["_previous"] = dict(started=old.get("environment", {}).get("date"), sections=old.get("sections_run"),
                                wall_s=old.get("wall_s"))  # the file's run before this one (no "runs" list yet)
    payload["sections_run"] = sorted(sections | set(old.get("sections_run", [])))
    return json.loads(json.dumps(payload, default=_jsonable))


def _jsonable(v):
    return v.tolist() if isinstance(v, torch.Tensor) else str(v)


if __name__ == "__main__":
    sys.exit(main())
