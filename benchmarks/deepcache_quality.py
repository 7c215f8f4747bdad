"""DeepCache quality on the reference model: PSNR against no-cache images and oracle accuracy, N = 2, 3, 5.

For ``--n`` shapes-world prompts (default 256, one seed each) the reference pipeline
(``diffkit.zoo.load_reference_pipeline``) generates the no-cache images, then the same prompts and seeds
with DeepCache at every interval N and both schedules (uniform 1:N and the non-uniform eq. 7 schedule).
Reported per configuration: mean per-image PSNR against the no-cache image of the same prompt and seed
(``diffkit.evaluation.psnr``, averaged), the oracle's per-factor accuracy (``load_reference_classifier``,
``diffkit.evaluation.evaluate_concepts``) and its change from no cache, and the wall time. Issue 5's
target: at N = 3, accuracy within 2 points of no cache.

Statistics (issue 16): each row keeps its per-image outcomes (each factor read right or not) and per-image
PSNR, with the prompts and seeds; each factor's accuracy has its n and Wilson interval, the mean accuracy and
the mean PSNR a bootstrap interval over prompts (identical pairs count at 100 dB), and the change from no
cache is the paired bootstrap interval of the per-image difference (whole prompts resampled), judged against
-2 points (``verdict``: met / missed / not resolved at this n).

Each finished configuration is written at once (atomically) to results/deepcache_quality.json, with the
no-cache images kept in results/.work/, so a killed run resumes where it stopped (``--resume``).

    python benchmarks/deepcache_quality.py                    # 256 images per configuration
    python benchmarks/deepcache_quality.py --smoke            # tiny random pipeline, 8 images (logic only)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, STATS, environment, print_table, reference_models, versus_baseline, write_json  # noqa: E402

from diffkit.evaluation import evaluate_concepts, shapes_prompt_specs  # noqa: E402

INTERVALS = (2, 3, 5)
SCHEDULES = ("uniform", "non-uniform")
#: Issue 5: at N = 3 the mean accuracy at most 2 points below no cache (judged on the paired interval)
TARGET_INTERVAL, ACCURACY_MARGIN = 3, 0.02


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random pipeline, few images (logic check)")
    ap.add_argument("--n", type=int, default=256, help="number of prompts (one image each)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=7.5)
    ap.add_argument("--branch", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--resume", action="store_true", help="keep finished configurations of a previous run")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.steps, args.batch_size = min(args.n, 8), min(args.steps, 10), min(args.batch_size, 8)
    name = "deepcache_quality_smoke.json" if args.smoke else "deepcache_quality.json"
    work = RESULTS / ".work"
    work.mkdir(parents=True, exist_ok=True)
    baseline_npz = work / name.replace(".json", "_baseline.npz")

    pipe, oracle = reference_models(args.smoke, args.device)
    specs = shapes_prompt_specs(args.n, seed=0)
    call = dict(seeds=(0,), batch_size=args.batch_size, num_inference_steps=args.steps,
                guidance_scale=args.guidance_scale, progress=not args.smoke)
    setting = dict(n_images=args.n, steps=args.steps, guidance_scale=args.guidance_scale, branch=args.branch,
                   scheduler=type(pipe.scheduler).__name__, device=args.device, smoke=args.smoke)
    from diffkit.artifacts import model_digest as fingerprint  # identifies the weights: --resume never mixes models

    prompts = [s.prompt for s in specs]
    payload = dict(benchmark="deepcache_quality", setting=setting, model=fingerprint(pipe.unet),
                   environment=environment(), stats=STATS, accuracy_margin=ACCURACY_MARGIN,
                   target_interval=TARGET_INTERVAL, items=dict(prompts=prompts, seeds=[0] * len(prompts)),
                   results=[])
    previous = RESULTS / name
    if args.resume and previous.is_file() and baseline_npz.is_file():
        old = json.loads(previous.read_text())
        # a file without per-image outcomes ("stats") cannot be compared image by image: it is measured afresh
        if old.get("setting") == setting and old.get("model") == payload["model"] and "stats" in old:
            payload["results"] = old["results"]
    done = {r["config"] for r in payload["results"]}

    if "no-cache" in done:
        base_images = np.load(baseline_npz)["images"]
    else:
        pipe.disable_deepcache()
        t0 = time.perf_counter()
        base = evaluate_concepts(pipe, oracle, specs, desc="no-cache", **call)
        base_images = base.images
        np.savez_compressed(baseline_npz, images=base_images)
        payload["results"].append(dict(config="no-cache", interval=1, schedule="-", **versus_baseline(base, prompts),
                                       seconds=time.perf_counter() - t0))
        write_json(name, payload)
    base_row = next(r for r in payload["results"] if r["config"] == "no-cache")

    for schedule in SCHEDULES:
        for n in INTERVALS:
            config = f"N={n} {schedule} b={args.branch}"
            if config in done:
                continue
            pipe.enable_deepcache(interval=n, branch=args.branch, schedule=schedule)
            t0 = time.perf_counter()
            res = evaluate_concepts(pipe, oracle, specs, desc=config, **call)
            payload["results"].append(dict(config=config, interval=n, schedule=schedule,
                                           **versus_baseline(res, prompts, base_row, base_images, ACCURACY_MARGIN),
                                           seconds=time.perf_counter() - t0))
            write_json(name, payload)  # checkpoint after every configuration
    pipe.disable_deepcache()
    payload["target"] = {r["config"]: r["accuracy_diff"]["verdict"] for r in payload["results"]
                         if r["interval"] == TARGET_INTERVAL}
    write_json(name, payload)
    print_table([{k: r[k] for k in ("config", "psnr_db", "mean_accuracy", "delta_points", "seconds")}
                 | {"verdict (>= -2 points)": r.get("accuracy_diff", {}).get("verdict", "—")}
                 for r in payload["results"]])
    print(f"target (N={TARGET_INTERVAL}, accuracy at most 2 points below no cache): {payload['target']}")
    print(f"wrote {RESULTS / name}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
