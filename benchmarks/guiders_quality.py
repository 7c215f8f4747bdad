"""Every diffusers guider on the reference model: saturation and oracle accuracy, with intervals, vs CFG.

    python benchmarks/guiders_quality.py                 # 256 images a setting, ~30 min on 2 cores
    python benchmarks/guiders_quality.py --parts apg     # only APG's sweep (128 images a setting)
    python benchmarks/guiders_quality.py --smoke         # tiny SD 1.5, 8 images: logic check

Settings (DDIM 25 steps; every setting draws the same prompts with the same seeds):

* ``guiders``: diffusers' ClassifierFreeGuidance (the baseline) and every guider diffkit runs on the classic
  pipeline, each at two scales — the guidance scale 7.5 and 15 for the guiders that combine predictions
  (CFG-Zero*, TCFG, MAMBO-G, APG, APG-Mix), the perturbation scale at its default and twice it (with CFG 7.5)
  for the guiders that perturb the U-Net (PAG, SEG, SkipLayer) and AutoGuidance. FDG needs kornia (the
  JSON says when it is missing and is skipped).
* ``apg``: diffkit's APG at scale 15 over eta (0, 0.5, 1) x momentum (0, -0.5) x norm threshold (the
  size-scaled paper value, off), against CFG 15: the saturation / accuracy front (issue 18's paper claim).

Each row: n, mean HSV saturation with a 95% bootstrap interval over images, per-factor oracle accuracy
with Wilson intervals, the mean of the factors' accuracies, and for each guider the paired difference to
CFG at the same guidance scale on the same prompts and seeds (bootstrap over images), with verdicts
"less saturated" (difference interval below 0) and "at least as accurate" (difference interval above
-0.02, i.e. at most 2 points worse). Writes benchmarks/results/guiders_quality.json (smoke: _smoke).
Resumes settings already measured with the same configuration from a .partial.json next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, print_table, write_json  # noqa: E402
from guidance_quality import default_norm_threshold, load, prompt_specs  # noqa: E402

from diffkit.evaluation import (  # noqa: E402  # noqa: E402
    bootstrap_interval,
    classify_specs,
    generate_images,
    image_saturation,
    paired_difference,
    rate,
    verdict,
)
from diffkit.guidance import APG, CFG  # noqa: E402

ACCURACY_MARGIN = 0.02  # "at least as accurate": the paired difference's interval above -2 points


def guider_settings() -> tuple[list[tuple[str, float, object]], dict]:
    """(name, CFG scale it is compared with, guidance object); and the guiders skipped, with why."""
    from diffusers.guiders import AutoGuidance, ClassifierFreeGuidance

    from diffkit.guidance.diffusers_guiders import DiffusersGuidance, make_guider

    out, skipped = [], {}
    for s in (7.5, 15.0):
        out.append((f"diffusers-cfg_{s:g}", s, DiffusersGuidance(ClassifierFreeGuidance(guidance_scale=s))))
        for name in ("cfg-zero-star", "tcfg", "mambo", "apg-mix", "fdg"):
            try:
                out.append((f"{name}_{s:g}", s, make_guider(name, s)))
            except ImportError as e:
                skipped[name] = str(e)
        out.append((f"diffusers-apg_{s:g}", s, make_guider_apg(s)))
    for name, default in (("pag", 3.0), ("seg", 3.0), ("skip-layer", 2.8)):
        for k in (1, 2):
            out.append((f"{name}_{default * k:g}", 7.5, make_guider(name, default * k)))
    for k in (1, 2):
        out.append((f"autoguidance_{k:g}", 7.5, DiffusersGuidance(AutoGuidance(
            guidance_scale=7.5 * k, auto_guidance_layers=[0], dropout=1.0))))
    return out, skipped


def make_guider_apg(scale: float):
    from diffusers.guiders import AdaptiveProjectedGuidance

    from diffkit.guidance.diffusers_guiders import DiffusersGuidance

    return DiffusersGuidance(AdaptiveProjectedGuidance(guidance_scale=scale))


def apg_settings(r: float) -> list[tuple[str, float, object]]:
    out = [("cfg_15", 15.0, CFG(15.0))]
    for eta in (0.0, 0.5, 1.0):
        for momentum in (0.0, -0.5):
            for thr, label in ((r, f"r{r:.2f}"), (0.0, "r-off")):
                out.append((f"apg_15_eta{eta:g}_m{momentum:g}_{label}", 15.0,
                            APG(15.0, eta=eta, momentum=momentum, norm_threshold=thr)))
    return out


def measure(name, guidance, pipe, classifier, specs, steps, batch_size) -> dict:
    prompts, seeds = [s.prompt for s in specs], list(range(len(specs)))
    t0 = time.perf_counter()
    images = generate_images(pipe, prompts, seeds, batch_size=batch_size, progress=True, desc=name,
                             num_inference_steps=steps, guidance=guidance)
    sat = image_saturation(images).numpy().astype(float)
    row = dict(setting=name, guidance=repr(guidance), n=len(images), saturation=float(sat.mean()),
               saturation_ci95=list(bootstrap_interval(sat)), seconds=round(time.perf_counter() - t0, 1),
               per_image_saturation=sat.tolist())
    if classifier is not None:
        result = classify_specs(classifier, images, specs)
        hits = {}
        for f, expected in result.expected.items():
            pairs = [(p == e) for p, e in zip(result.predicted[f], expected) if e is not None]
            if pairs:
                r = rate(pairs)
                row[f"acc_{f}"] = r.to_json()
                hits[f] = [None if e is None else float(p == e) for p, e in zip(result.predicted[f], expected)]
        per_image = [float(np.mean([h[i] for h in hits.values() if h[i] is not None])) for i in range(len(images))]
        row["acc_mean"] = float(np.mean([row[f"acc_{f}"]["rate"] for f in hits]))
        row["acc_mean_ci95"] = list(bootstrap_interval(per_image))
        row["per_image_accuracy"] = per_image
    return row


def compare(rows: dict, baseline_of) -> None:
    """Add to each row the paired difference to its baseline row (same prompts and seeds) and verdicts."""
    for name, row in rows.items():
        base = baseline_of(name)
        if base is None or base == name or base not in rows:
            continue
        b = rows[base]
        ds = paired_difference(row["per_image_saturation"], b["per_image_saturation"])
        row["vs"] = base
        row["saturation_diff"] = ds.to_json()
        row["less_saturated"] = verdict(ds.low, ds.high, 0.0, "<=") if ds.high != 0 else "not resolved at this n"
        if "per_image_accuracy" in row:
            da = paired_difference(row["per_image_accuracy"], b["per_image_accuracy"])
            row["accuracy_diff"] = da.to_json()
            row["at_least_as_accurate"] = verdict(da.low, da.high, -ACCURACY_MARGIN, ">=")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--n", type=int, default=None, help="images a setting (default 256; apg sweep 128)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--parts", nargs="+", choices=("guiders", "apg"), default=["guiders", "apg"])
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    pipe, classifier = load("tiny" if args.smoke else "reference")
    side = pipe.unet.config.sample_size
    r = default_norm_threshold(pipe.unet.config.in_channels * side * side)
    out_name = "guiders_quality_smoke.json" if args.smoke else "guiders_quality.json"
    partial_path = RESULTS / out_name.replace(".json", ".partial.json")
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    payload = dict(benchmark="guiders_quality", smoke=args.smoke, steps=args.steps, sampler="DDIM",
                   accuracy_margin=ACCURACY_MARGIN, apg_norm_threshold=r, environment=environment(), parts={})
    for part in args.parts:
        n = args.n or (8 if args.smoke else 256 if part == "guiders" else 128)
        specs = prompt_specs(n, seed=0)
        if part == "guiders":
            settings, skipped = guider_settings()
            payload["skipped"] = skipped
        else:
            settings = apg_settings(r)
        baseline = {name: ("cfg_15" if part == "apg" else f"diffusers-cfg_{s:g}") for name, s, _ in settings}
        rows = {}
        for name, _, guidance in settings:
            key = f"{part}/{name}/{n}/{args.steps}"
            if key in partial:
                rows[name] = partial[key]
                continue
            rows[name] = measure(name, guidance, pipe, classifier, specs, args.steps, args.batch_size)
            partial[key] = rows[name]
            write_json(partial_path.name, partial)
        compare(rows, baseline.get)
        payload["parts"][part] = dict(n=n, rows=list(rows.values()))
        print_table([{k: row.get(k, "") for k in ("setting", "n", "saturation", "acc_mean", "less_saturated",
                                                  "at_least_as_accurate")} for row in rows.values()])
    path = write_json(out_name, payload)
    partial_path.unlink(missing_ok=True)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
