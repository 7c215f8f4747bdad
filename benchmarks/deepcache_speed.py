"""DeepCache speed: no cache vs uniform N = 2, 3, 5 at branch 0 and branch 1, interleaved, eager and compiled.

GPU setting (issue 5): full-size SD 1.5 (512 px) and SDXL (1024 px) U-Net architectures with random weights
(speed does not depend on the weights), fp16, 50 DDIM steps, CFG 7.5 (U-Net batch 2). Two timings:

* ``unet_loop``: the denoising loop alone (U-Net + CFG + ``scheduler.step``) through ``apply_deepcache`` on
  the bare U-Net, for SD 1.5 and SDXL: the figure to hold against the MAC ceiling N / (1 + (N - 1) r);
* ``controlnet_loop``: SD 1.5 with a ControlNet, DeepCache on the U-Net only vs paired with the ControlNet;
* ``pipeline``: SD 1.5 end to end through ``pipe.enable_deepcache`` (text encoder, loop; latents out).

Every configuration runs on its own copy of the U-Net (the no-cache one never sees a hook), and the runs
of all configurations alternate, so drift hits all alike. ``--compile`` adds the same set with each U-Net
``torch.compile``d (default mode); the intervals share one compiled U-Net per branch (changing the interval
keeps the graphs). The MAC ratio r of a cached step is counted on the ``meta`` device (no GPU needed) and
printed with the ceiling T / (F + (T - F) r) for the run's T steps (F = ceil(T/N) full ones) and the share
of it reached.

    python benchmarks/deepcache_speed.py              # CUDA: writes results/deepcache_speed.json
    python benchmarks/deepcache_speed.py --smoke      # CPU logic check on tiny U-Nets (ratios are noise)
    python benchmarks/deepcache_speed.py --macs-only  # MAC ratios of the full-size architectures, any machine
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from diffusers import ControlNetModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved, median, print_table, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.cache import apply_deepcache, reset_deepcache, unet_macs  # noqa: E402
from diffkit.cache.cost import example_inputs, speed_ceiling  # noqa: E402
from diffkit.zoo import build_full_pipeline, build_full_unet, build_tiny_pipeline  # noqa: E402

#: Branch 0 (diffusers' docs, fastest) and branch 1 = the paper's branch 2, its SD 1.5 setting.
BRANCHES = (0, 1)
INTERVALS = (2, 3, 5)
SIZES = {"sd15": 512, "sdxl": 1024}


def mac_table(archs, size_of, branches=(0, 1, 2, 3), batch=2) -> list[dict]:
    """MACs of a cached step vs a full one; for SD 1.5 also with a paired ControlNet (shallow on cached steps)."""
    rows = []
    for arch in archs:
        unet = build_full_unet(arch, device="meta") if arch in SIZES else _tiny_unet(arch)
        size = size_of(arch) // 8
        variants = {arch: None}
        if arch == "sd15":
            with torch.device("meta"):
                variants["sd15+controlnet"] = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
        for name, controlnet in variants.items():
            macs = unet_macs(unet, branches=branches, controlnet=controlnet, batch=batch, height=size, width=size)
            for b in branches:
                r = macs["cached"][b] / macs["full"]
                rows.append(dict(arch=name, branch=b, full_gmac=macs["full"] / 1e9,
                                 cached_gmac=macs["cached"][b] / 1e9, ratio=r,
                                 **{f"ceiling_N{n}": speed_ceiling(n, r) for n in INTERVALS}))
    return rows


def _tiny_unet(arch):
    return build_tiny_pipeline(arch.removeprefix("tiny-")).unet


def _loop_inputs(unet, size, device, dtype):
    x = example_inputs(unet, batch=2, height=size // 8, width=size // 8)
    g = torch.Generator(device).manual_seed(0)
    x["encoder_hidden_states"] = torch.randn(x["encoder_hidden_states"].shape, generator=g, device=device,
                                             dtype=dtype)
    latents = torch.randn((1, *x["sample"].shape[1:]), generator=g, device=device, dtype=dtype)
    return x, latents


def unet_loop(unet, scheduler, inputs, latents, steps, scale=7.5, controlnet=None):
    """The SD denoising loop with CFG: what a pipeline does per step, minus everything else."""
    scheduler.set_timesteps(steps, device=latents.device)
    reset_deepcache(unet)  # a new trajectory (no-op without DeepCache)
    lat = latents.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            kw = {k: v for k, v in inputs.items() if k not in ("sample", "timestep", "controlnet_cond")}
            if controlnet is not None:
                down, mid = controlnet(torch.cat([lat, lat]), t, inputs["encoder_hidden_states"],
                                       controlnet_cond=inputs["controlnet_cond"], return_dict=False)
                kw.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
            eps = unet(torch.cat([lat, lat]), t, **kw).sample
            u, c = eps.chunk(2)
            lat = scheduler.step(u + scale * (c - u), t, lat).prev_sample
    return lat


def _maybe_compile(unet, compile_backend):
    return unet if compile_backend is None else torch.compile(unet, backend=compile_backend)


def time_unet_loops(arch, unet, scheduler, size, device, dtype, steps, repeats, compile_backend) -> dict:
    inputs, latents = _loop_inputs(unet, size, device, dtype)
    unets = {"no-cache": _maybe_compile(unet, compile_backend)}
    fns = {"no-cache": lambda: unet_loop(unets["no-cache"], scheduler, inputs, latents, steps)}
    for b in BRANCHES:
        cached = copy.deepcopy(unet)
        apply_deepcache(cached, interval=INTERVALS[0], branch=b)
        unets[b] = _maybe_compile(cached, compile_backend)
        for n in INTERVALS:
            def run(b=b, n=n):
                apply_deepcache(unets[b], interval=n, branch=b)  # same branch: in place, graphs kept
                return unet_loop(unets[b], scheduler, inputs, latents, steps)
            fns[f"N={n} b={b}"] = run
    return interleaved(fns, device, repeats, warmup=1)


def time_controlnet_loops(unet, scheduler, size, device, dtype, steps, repeats, compile_backend) -> dict:
    """SD 1.5 + ControlNet loop: no cache; DeepCache on the U-Net only ("unet-only", the ControlNet runs in full
    every step); and DeepCache with the ControlNet paired (its shallow branch on cached steps). Branch 0."""
    inputs, latents = _loop_inputs(unet, size, device, dtype)
    inputs["controlnet_cond"] = torch.rand(2, 3, size, size, device=device, dtype=dtype)
    with torch.device(device):
        controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    controlnet = controlnet.to(dtype).eval()
    plain_unet, unet_only, paired_unet = (copy.deepcopy(unet) for _ in range(3))
    paired_cn = copy.deepcopy(controlnet)
    apply_deepcache(unet_only, interval=INTERVALS[0], branch=0)
    apply_deepcache(paired_unet, interval=INTERVALS[0], branch=0, controlnet=paired_cn)
    full_cn = _maybe_compile(controlnet, compile_backend)
    runs = {"no-cache": (_maybe_compile(plain_unet, compile_backend), full_cn),
            "unet-only": (_maybe_compile(unet_only, compile_backend), full_cn),
            "paired": (_maybe_compile(paired_unet, compile_backend), _maybe_compile(paired_cn, compile_backend))}

    def loop(key, n=None):
        u, c = runs[key]
        if key == "unet-only":
            apply_deepcache(u, interval=n, branch=0)  # same branch: in place
        elif key == "paired":
            apply_deepcache(u, interval=n, branch=0, controlnet=paired_cn)
        return unet_loop(u, scheduler, inputs, latents, steps, controlnet=c)

    fns = {"no-cache": lambda: loop("no-cache")}
    for n in INTERVALS:
        fns[f"N={n} b=0 unet-only"] = lambda n=n: loop("unet-only", n)
        fns[f"N={n} b=0"] = lambda n=n: loop("paired", n)
    return interleaved(fns, device, repeats, warmup=1)


def time_pipelines(base, size, device, steps, repeats, compile_backend) -> dict:
    kw = dict(prompt="a red star", num_inference_steps=steps, height=size, width=size, guidance_scale=7.5,
              output_type="latent")
    pipes = {"no-cache": diffkit.DiffusionPipeline.from_pipe(base)}
    for b in BRANCHES:
        pipes[b] = diffkit.DiffusionPipeline.from_pipe(
            type(base)(**{**base.components, "unet": copy.deepcopy(base.unet)}))
        pipes[b].enable_deepcache(interval=INTERVALS[0], branch=b)
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
        p.unet = _maybe_compile(p.unet, compile_backend)

    def run(pipe):
        return pipe(generator=torch.Generator(device).manual_seed(0), **kw)

    fns = {"no-cache": lambda: run(pipes["no-cache"])}
    for b in BRANCHES:
        for n in INTERVALS:
            def go(b=b, n=n):
                pipes[b].enable_deepcache(interval=n, branch=b)
                return run(pipes[b])
            fns[f"N={n} b={b}"] = go
    return interleaved(fns, device, repeats, warmup=1)


def rows_from(times: dict, macs: dict, arch: str, what: str, mode: str, steps: int) -> list[dict]:
    ref = median(times["no-cache"])
    rows = []
    for name, ts in times.items():
        row = dict(arch=arch, timing=what, mode=mode, config=name, median_s=median(ts), speedup=ref / median(ts))
        row["mac_ceiling"] = row["share_of_ceiling"] = "-"
        parts = name.split()
        if len(parts) == 2:  # "N=3 b=0": a ceiling from the MAC table when it has this (arch, branch)
            n, b = (int(part.split("=")[1]) for part in parts)
            if (arch, b) in macs:
                row["mac_ceiling"] = speed_ceiling(n, macs[(arch, b)], num_steps=steps)
                row["share_of_ceiling"] = row["speedup"] / row["mac_ceiling"]
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny U-Nets on CPU, few steps (logic check only)")
    ap.add_argument("--macs-only", action="store_true", help="only the MAC ratios of the full-size architectures")
    ap.add_argument("--archs", nargs="+", default=["sd15", "sdxl"], choices=["sd15", "sdxl"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--no-pipeline", action="store_true", help="skip the SD 1.5 end-to-end pipeline timing")
    ap.add_argument("--no-controlnet", action="store_true", help="skip the SD 1.5 + ControlNet loop timing")
    args = ap.parse_args(argv)

    # MACs of the full-size architectures (meta device, any machine); the smoke run counts its tiny U-Nets
    macs_rows = [] if args.smoke else mac_table(args.archs, lambda a: SIZES[a])
    if macs_rows:
        print("MACs of one U-Net evaluation (CFG batch 2), cached step at branch b vs full step:")
        print_table(macs_rows)
    macs = {(r["arch"], r["branch"]): r["ratio"] for r in macs_rows}
    payload = dict(benchmark="deepcache_speed", environment=environment(), macs=macs_rows)
    if args.macs_only:
        payload["benchmark"] = "deepcache_macs"
        print(f"wrote {write_json('deepcache_macs.json', payload)}")
        return 0

    if args.smoke:
        device, dtype, steps, repeats = "cpu", torch.float32, min(args.steps, 10), min(args.repeats, 2)
        archs = [f"tiny-{a}" for a in args.archs]
        backends = [("eager", None)] + ([] if args.no_compile else [("compile[dynamo, eager backend]", "eager")])
        sizes = {a: 64 for a in archs}
        payload["macs"] = mac_table(archs, lambda a: 64, branches=BRANCHES)
        print_table(payload["macs"])
        macs.update({(r["arch"], r["branch"]): r["ratio"] for r in payload["macs"]})
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (use --smoke for the CPU logic check, --macs-only for the MAC ratios)")
        device, dtype, steps, repeats = "cuda", torch.float16, args.steps, args.repeats
        archs = list(args.archs)
        backends = [("eager", None)] + ([] if args.no_compile else [("compile", "inductor")])
        sizes = dict(SIZES)

    from diffusers import DDIMScheduler

    from diffkit.zoo.tiny import SD_SCHEDULER

    rows, raw = [], {}
    for arch in archs:
        base_arch = arch.removeprefix("tiny-")
        unet = (_tiny_unet(arch) if args.smoke else build_full_unet(base_arch, device=device)).to(device, dtype)
        unet.eval()
        for mode, backend in backends:
            torch._dynamo.reset()
            times = time_unet_loops(arch, unet, DDIMScheduler(**SD_SCHEDULER), sizes[arch], device, dtype, steps,
                                    repeats, backend)
            rows += rows_from(times, macs, arch, "unet_loop", mode, steps)
            raw[f"{arch}/unet_loop/{mode}"] = times
        if base_arch == "sd15" and not args.no_controlnet:
            for mode, backend in backends:
                torch._dynamo.reset()
                times = time_controlnet_loops(unet, DDIMScheduler(**SD_SCHEDULER), sizes[arch], device, dtype, steps,
                                              repeats, backend)
                # the MAC ceiling of the paired rows is the ControlNet + U-Net one
                rows += rows_from(times, macs, arch.replace("sd15", "sd15+controlnet"), "controlnet_loop", mode,
                                  steps)
                raw[f"{arch}/controlnet_loop/{mode}"] = times
        del unet
        if base_arch == "sd15" and not args.no_pipeline:
            base = build_tiny_pipeline("sd15") if args.smoke else build_full_pipeline("sd15", device=device,
                                                                                     dtype=dtype)
            for mode, backend in backends:
                torch._dynamo.reset()
                times = time_pipelines(base, sizes[arch], device, steps, repeats, backend)
                rows += rows_from(times, macs, arch, "pipeline", mode, steps)
                raw[f"{arch}/pipeline/{mode}"] = times
            del base
        if device == "cuda":
            torch.cuda.empty_cache()
    print_table(rows)
    payload.update(smoke=args.smoke, setting=dict(dtype=str(dtype), steps=steps, repeats=repeats, guidance_scale=7.5,
                                                  sizes=sizes, intervals=INTERVALS, branches=BRANCHES,
                                                  scheduler="DDIM", schedule="uniform"),
                   results=rows, raw_seconds=raw)
    print(f"wrote {write_json('deepcache_speed_smoke.json' if args.smoke else 'deepcache_speed.json', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
