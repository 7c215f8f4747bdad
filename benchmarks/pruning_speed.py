"""Pruning speed and memory: full-size SD 1.5 / SDXL architectures, 20% fewer U-Net parameters (GPU).

Per architecture (random weights: latency and memory do not depend on them), in one run:

* end-to-end ``pipe(...)`` latency (median of ``--repeats`` after a warm-up, DDIM, CFG, VAE decode) and
  peak GPU memory, for: unpruned, pruned (20% fewer U-Net parameters), unpruned + DeepCache N=3, and
  pruned + DeepCache N=3. Masks are random scores binarized with the keep ratios of the quality
  benchmark's 20% row when ``results/pruning_quality.json`` exists, else ``target_reduction=0.2``;
  widths rounded to multiples of 8.
* SDXL only: time and peak memory of one mask-learning optimizer step at 1024 px, 50 steps, one prompt,
  with time-step gradient checkpointing and with plain backprop through the trajectory (which does
  not fit: measured at 1, 2 and 4 steps, extrapolated linearly to 50, and tried at 50 to record the OOM).

    python benchmarks/pruning_speed.py                      # CUDA; both architectures (about 10 min on an H100)
    python benchmarks/pruning_speed.py --arch sdxl --part learn
    python benchmarks/pruning_speed.py --smoke              # tiny zoo models on CPU: logic only, no figures

Writes results/pruning_speed.json (``--smoke``: pruning_speed_smoke.json); speed as ratios vs unpruned.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, interleaved, median, print_table, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.pruning import (  # noqa: E402
    KeepRatios,
    MaskLearningConfig,
    binarize,
    find_units,
    learn_masks,
    prune_unet,
    unet_macs,
    unet_parameters,
)
from diffkit.pruning.memory import peak_live_bytes  # noqa: E402

PROMPT = "a photo of a red star on a blue background"


def full_pipeline(arch: str, device, dtype):
    """SD 1.5 / SDXL pipeline of the real architecture (U-Net, VAE, CLIP text encoders) with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffkit.zoo import build_clip_tokenizer, build_full_unet
    from diffkit.zoo.tiny import SD_SCHEDULER

    tok = build_clip_tokenizer()

    def text_config(hidden, layers, heads, act, proj=768):
        return CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                              hidden_act=act, projection_dim=proj, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)

    with torch.device(device):
        unet = build_full_unet(arch, device=device)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                            sample_size=1024 if arch == "sdxl" else 512)
        te = CLIPTextModel(text_config(768, 12, 12, "quick_gelu"))
        if arch == "sdxl":
            te2 = CLIPTextModelWithProjection(text_config(1280, 32, 20, "gelu", proj=1280))
    sched = DDIMScheduler(**SD_SCHEDULER)
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                         tokenizer_2=build_clip_tokenizer(), unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = diffkit.to_diffkit(pipe.to(device=device, dtype=dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pipeline(arch: str, device, dtype):
    from diffkit.zoo import build_tiny_pipeline

    return diffkit.to_diffkit(build_tiny_pipeline(arch).to(device=device, dtype=dtype))


def keep_ratios_from_quality() -> KeepRatios | None:
    path = RESULTS / "pruning_quality.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("results", [])
    rows = [r for r in rows if r.get("target") == 0.2 and r.get("masks") == "learned" and "kept_fraction" in r]
    return KeepRatios(**rows[0]["kept_fraction"]) if rows else None


def random_kept(unet, keep: KeepRatios | None, seed: int = 0):
    units = find_units(unet)
    g = torch.Generator().manual_seed(seed)
    scores = {u.name: torch.rand(u.size, generator=g) for u in units}
    if keep is None:
        return units, binarize(scores, units, target_reduction=0.2, unet=unet)
    return units, binarize(scores, units, keep)


def peak_call(fn, device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_live_bytes(fn)[0]


def bench_inference(arch, args, device, dtype) -> dict:
    build = tiny_pipeline if args.smoke else full_pipeline
    pipe = build(arch, device, dtype)
    size = 64 if args.smoke else (1024 if arch == "sdxl" else 512)
    call = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size, output_type="np")
    latent = (1, 4, size // 8, size // 8)
    gen = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    run = lambda: pipe(PROMPT, generator=gen(), **call)  # noqa: E731
    params0, macs0 = unet_parameters(pipe.unet), unet_macs(pipe.unet, latent)
    rows = {}

    def measure(name, macs):
        times = interleaved({name: run}, device, repeats=args.repeats, warmup=1)[name]
        rows[name] = dict(config=name, seconds=median(times), peak_bytes=peak_call(run, device),
                          unet_params=unet_parameters(pipe.unet), unet_macs=macs)

    measure("unpruned", macs0)
    has_deepcache = hasattr(pipe, "enable_deepcache")
    if has_deepcache:
        pipe.enable_deepcache(interval=3)
        measure("unpruned + DeepCache N=3", macs0)  # MACs of one full U-Net evaluation
        pipe.disable_deepcache()
    keep = keep_ratios_from_quality()
    units, kept = random_kept(pipe.unet, keep)
    prune_unet(pipe.unet, units, kept)
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
    macs1 = unet_macs(pipe.unet, latent)
    measure("pruned 20%", macs1)
    if has_deepcache:
        pipe.enable_deepcache(interval=3)
        measure("pruned 20% + DeepCache N=3", macs1)
        pipe.disable_deepcache()
    base = rows["unpruned"]
    out = []
    for r in rows.values():
        r["speedup_vs_unpruned"] = base["seconds"] / r["seconds"]
        r["peak_memory_ratio"] = r["peak_bytes"] / base["peak_bytes"]
        r["param_reduction"] = 1 - r["unet_params"] / params0
        r["mac_reduction"] = 1 - r["unet_macs"] / macs0
        out.append(r)
    frac = {k: sum(len(kept[u.name]) for u in units if u.kind == k) / sum(u.size for u in units if u.kind == k)
            for k in ("heads", "ffn", "channels")}
    return dict(arch=arch, image_size=size, steps=args.steps, keep_source="quality 20% row" if keep else
                "target_reduction=0.2 on random scores", kept_fraction=frac, rows=out)


def bench_learning(args, device, dtype) -> dict:
    """One mask-learning optimizer step on SDXL: checkpointed at full length; plain at few steps + extrapolation."""
    arch = "sdxl"
    build = tiny_pipeline if args.smoke else full_pipeline
    pipe = build(arch, device, dtype)
    size = 64 if args.smoke else 1024
    steps = 4 if args.smoke else 50

    def one_step(n, checkpointing):
        cfg = MaskLearningConfig(num_inference_steps=n, guidance_scale=7.5, epochs=1, height=size, width=size,
                                 checkpointing=checkpointing)
        t0 = time.perf_counter()
        peak = peak_call(lambda: learn_masks(pipe, [PROMPT], cfg, progress=False), device)
        return dict(steps=n, checkpointing=checkpointing, seconds=time.perf_counter() - t0, peak_bytes=peak)

    rows = [one_step(steps, True)]
    plain = [one_step(n, False) for n in ((1, 2) if args.smoke else (1, 2, 4))]
    rows += plain
    (n1, p1), (n2, p2) = (plain[0]["steps"], plain[0]["peak_bytes"]), (plain[-1]["steps"], plain[-1]["peak_bytes"])
    slope = (p2 - p1) / (n2 - n1)
    extrapolated = p1 + slope * (steps - n1)
    full_plain = None
    if not args.smoke:
        try:
            full_plain = one_step(steps, False)
        except torch.cuda.OutOfMemoryError:
            full_plain = dict(steps=steps, checkpointing=False, oom=True)
            torch.cuda.empty_cache()
        rows.append(full_plain)
    return dict(arch=arch, image_size=size, rows=rows, plain_peak_bytes_per_step=slope,
                plain_peak_bytes_extrapolated=extrapolated,
                memory_saving_vs_plain=1 - rows[0]["peak_bytes"] / extrapolated)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny zoo models on CPU (logic check, no figures)")
    ap.add_argument("--arch", choices=("sd15", "sdxl", "both"), default="both")
    ap.add_argument("--part", choices=("inference", "learn", "all"), default="all")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.smoke:
        device, dtype = "cpu", torch.float32
        args.steps, args.repeats = min(args.steps, 4), 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("pruning_speed needs a CUDA GPU (use --smoke for a CPU logic check)")
        device, dtype = "cuda", torch.float16
    name = "pruning_speed_smoke.json" if args.smoke else "pruning_speed.json"
    path = RESULTS / name
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload.update(benchmark="pruning_speed", environment=environment(), smoke=args.smoke,
                   dtype=str(dtype).replace("torch.", ""))
    payload.setdefault("inference", {})
    archs = ("sd15", "sdxl") if args.arch == "both" else (args.arch,)
    if args.part in ("inference", "all"):
        for arch in archs:
            payload["inference"][arch] = bench_inference(arch, args, device, dtype)
            write_json(name, payload)
            cols = ("config", "seconds", "speedup_vs_unpruned", "peak_memory_ratio", "param_reduction", "mac_reduction")
            print_table([{k: r[k] for k in cols} for r in payload["inference"][arch]["rows"]])
    if args.part in ("learn", "all") and "sdxl" in archs:
        payload["learning"] = bench_learning(args, device, dtype)
        write_json(name, payload)
        print_table([{k: r.get(k, "-") for k in ("steps", "checkpointing", "seconds", "peak_bytes", "oom")}
                     for r in payload["learning"]["rows"]])
        learn = payload["learning"]
        print(f"plain backprop, extrapolated peak at full length: {learn['plain_peak_bytes_extrapolated']:.4g} bytes;"
              f" checkpointing saves {100 * learn['memory_saving_vs_plain']:.1f}%")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
