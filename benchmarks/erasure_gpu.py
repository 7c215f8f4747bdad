"""Erasure cost on the full-size SD 1.5 architecture (random weights): seconds per step and peak memory.

The issue's setting: bf16 (accelerate mixed precision: bf16 compute, float32 master weights and Adam
state), 512 px, batch 1, gradient checkpointing on. ESD-x (reference settings: 50 DDIM steps of the
frozen model to reach x_t, so a step costs on average ~25 guided U-Net evaluations plus one training
forward/backward) and SalUn (all U-Net weights are candidates; the saliency mask's gradient pass, the
forget/retain image generation and the masked Adam steps are all included in its figures). Every
figure comes from the engine's own metrics (``erasure.json``), measured in this run. Peak memory is
``torch.cuda.max_memory_allocated`` over the whole job (reset between methods); the target is 24 GB.

    python benchmarks/erasure_gpu.py            # on a CUDA machine -> benchmarks/results/erasure_gpu.json
    python benchmarks/erasure_gpu.py --smoke    # tiny pipeline on CPU, logic check only
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402

import diffkit  # noqa: E402
from diffkit.erasure import ErasureConfig, erase, make_accelerator, read_sidecar  # noqa: E402
from diffkit.zoo import build_tiny_pipeline  # noqa: E402

GIB = 1024**3


def jobs(smoke: bool, steps: int) -> dict[str, ErasureConfig]:
    common = dict(concept="a red star", steps=steps, seed=0, batch_size=1, checkpoint_every=10_000,
                  mixed_precision="no" if smoke else "bf16", gradient_checkpointing=not smoke,
                  resolution=None if smoke else 512, sample_steps=2 if smoke else 50)
    return {
        "esd-x": ErasureConfig(method="esd", parameters="esd-x", **common),
        "esd-u": ErasureConfig(method="esd", parameters="esd-u", **common),
        "salun": ErasureConfig(method="salun", retain_prompts=["a blue circle", "a green square"],
                               num_images=1 if smoke else 2, **common),
    }


def main(argv=None, *, job_factory=jobs, name: str = "erasure_gpu", description: str = __doc__) -> int:
    """Run ``job_factory(smoke, steps)``'s jobs one after the other, each on a fresh pipeline; write ``name``.json."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny pipeline on CPU (logic check)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per job (default 10; smoke 2)")
    args = ap.parse_args(argv)
    steps = args.steps or (2 if args.smoke else 10)
    if args.smoke:
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (use --smoke for the CPU logic check)")
        device = "cuda"
    configs = job_factory(args.smoke, steps)
    acc = make_accelerator(next(iter(configs.values())).mixed_precision)
    rows, details = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for job, cfg in configs.items():
            if args.smoke:
                pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15"))
            else:
                from diffkit.zoo.full import build_full_pipeline

                pipe = diffkit.to_diffkit(build_full_pipeline("sd15", device=device))
            pipe.set_progress_bar_config(disable=True)
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            result = erase(pipe, cfg, Path(tmp) / job, accelerator=acc, progress=False)
            m = result.sidecar["metrics"]
            prep = m["wall_time_s"] - m["loop_s_per_step"] * steps
            rows.append(dict(method=job, s_per_step=m["loop_s_per_step"], prepare_s=prep,
                             peak_gib=m["peak_memory_bytes"] / GIB, fits_24gb=m["peak_memory_bytes"] < 24 * GIB,
                             trained_weights=m["trained_weights"],
                             artifact_mib=read_sidecar(result.path)["storage_bytes"] / 2**20))
            details[job] = dict(metrics={k: v for k, v in m.items() if k != "losses"}, config=cfg.to_dict())
            del pipe, result
    print_table(rows)
    payload = dict(benchmark=name, smoke=args.smoke,
                   setting=dict(arch="tiny-sd15" if args.smoke else "sd15 (random weights)",
                                precision="float32" if args.smoke else "bf16 autocast, fp32 master weights",
                                resolution=64 if args.smoke else 512, batch=1, steps=steps,
                                gradient_checkpointing=not args.smoke),
                   environment=environment(), results=rows, details=details)
    path = write_json(f"{name}_smoke.json" if args.smoke else f"{name}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
