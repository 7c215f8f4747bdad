"""Quality bar of the shipped reference model, read by the oracle classifier.

    python benchmarks/reference_model.py            # 512 held-out + 256 synonym-only + 2 x 128 swap images
    python benchmarks/reference_model.py --smoke    # a few images, to check the script

Held-out prompts name an (object, color, style) triple the diffusion model never saw in training
(``diffkit.zoo.shapes.HELDOUT``) and a background: all four factors; synonym-only prompts name object and
color by their evaluation-only synonyms ("a scarlet pentagram"). Each image has its own seed. The
*background swap* set draws the same prompt on a black and on a white background with the same seed: a
model whose brightness comes from the starting noise rather than from the prompt draws both alike
(issue 16). Every rate has its n and a 95% Wilson interval; the bar (issue 16) is judged on the rate
itself, and each factor's every single value must reach ``PER_VALUE_BAR``. Writes
benchmarks/results/reference_model.json (per-value rates, confusion matrices) and the sample grid
docs/images/reference_grid.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from PIL import Image

from diffkit.artifacts import atomic_write_json
from diffkit.evaluation import PromptSpec, classify_specs, generate_images, rate, shapes_prompt_specs
from diffkit.zoo import REFERENCE_GUIDANCE_SCALE, load_reference_pipeline, reference_path
from diffkit.zoo.classifier import load_reference_classifier
from diffkit.zoo.shapes import BACKGROUNDS, COLORS, OBJECTS, STYLES, prompt_for

ROOT = Path(__file__).resolve().parents[1]
BAR = {"heldout": {"object": 0.90, "color": 0.95, "style": 0.85, "background": 0.90},
       "synonyms": {"object": 0.85, "color": 0.85}}
#: Every single value of every factor of the held-out set (each object, color, style, background).
PER_VALUE_BAR = 0.80


def _display(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _time_generation(pipe, steps: int, guidance_scale: float, repeats: int = 3) -> float:
    """Median seconds for one 64x64 image (batch 1, CFG), after a warm-up call."""
    pipe("a red star", num_inference_steps=steps, guidance_scale=guidance_scale,
         generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        pipe("a blue dotted moon", num_inference_steps=steps, guidance_scale=guidance_scale,
             generator=torch.Generator().manual_seed(i))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def confusion(expected, predicted) -> dict[str, dict[str, int]]:
    """expected label -> {predicted label: count}, over the images whose expected label is given."""
    out: dict[str, dict[str, int]] = {}
    for e, p in zip(expected, predicted):
        if e is not None:
            row = out.setdefault(e, {})
            row[p] = row.get(p, 0) + 1
    return out


def per_value(expected, predicted) -> dict[str, dict]:
    """Each expected label -> its rate (k, n, rate, 95% Wilson interval) over the images that asked for it."""
    out = {}
    for label in sorted({e for e in expected if e is not None}):
        out[label] = rate([p == e for e, p in zip(expected, predicted) if e == label]).to_json()
    return out


def swap_specs(n: int, seed: int) -> list[PromptSpec]:
    """``n`` held-out (object, color, style) prompts, each twice: on a black and on a white background."""
    base = shapes_prompt_specs(n, seed=seed, heldout_only=True, words="canonical", factors=("object", "color", "style"))
    out = []
    for spec in base:
        for bg in ("black", "white"):
            labels = {**spec.labels, "background": bg}
            out.append(PromptSpec(prompt_for(**labels), labels))
    return out


def swap_result(res, n_pairs: int) -> dict:
    """Both backgrounds drawn as asked, and the same background drawn for both prompts, over the pairs."""
    got = res.predicted["background"]
    both = [got[2 * i] == "black" and got[2 * i + 1] == "white" for i in range(n_pairs)]
    same = [got[2 * i] == got[2 * i + 1] for i in range(n_pairs)]
    return {"pairs": n_pairs, "both_as_asked": rate(both).to_json(), "same_background_drawn": rate(same).to_json()}


def sample_grid(pipe, path: Path, steps: int, guidance_scale: float) -> None:
    """One row per object, one column per color (style cycling, backgrounds alternating black and white),
    each from its own seed."""
    prompts, seeds = [], []
    for i, obj in enumerate(OBJECTS):
        for j, color in enumerate(COLORS):
            prompts.append(prompt_for(object=obj, color=color, style=STYLES[(i + j) % len(STYLES)],
                                      background=BACKGROUNDS[(i + j) % 2]))
            seeds.append(1000 + 8 * i + j)
    imgs = generate_images(pipe, prompts, seeds, batch_size=16, progress=False, num_inference_steps=steps,
                           guidance_scale=guidance_scale)
    n = len(COLORS)
    rows = [np.concatenate(list(imgs[r * n : (r + 1) * n]), 1) for r in range(len(OBJECTS))]
    grid = np.concatenate(rows, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a 256-colour palette keeps the committed PNG under 300 KB (these images have few colours)
    Image.fromarray(grid).quantize(256).save(path, optimize=True)


def measure(pipe, clf, n_heldout: int, n_synonyms: int, n_swap: int, batch_size: int, **call) -> dict:
    """Every set's rates (n, Wilson interval), per-value rates and confusion matrices at one sampler setting."""
    sets = {
        "heldout": shapes_prompt_specs(n_heldout, seed=0, heldout_only=True, words="canonical",
                                       factors=("object", "color", "style", "background")),
        "synonyms": shapes_prompt_specs(n_synonyms, seed=1, words="eval_only", factors=("object", "color")),
        "swap": swap_specs(n_swap, seed=2),
    }
    results = {}
    for offset, (name, specs) in enumerate(sets.items()):
        # the swap set's two prompts of a pair share a seed: only the background word differs
        seeds = [100_000 * offset + (i // 2 if name == "swap" else i) for i in range(len(specs))]
        images = generate_images(pipe, [s.prompt for s in specs], seeds, batch_size=batch_size, desc=name, **call)
        res = classify_specs(clf, images, specs)
        named = [f for f in res.accuracy if any(e is not None for e in res.expected[f])]
        results[name] = {
            "n_images": len(specs),
            "accuracy": {f: res.accuracy[f] for f in named},
            "rates": {f: rate([p == e for e, p in zip(res.expected[f], res.predicted[f]) if e is not None]).to_json()
                      for f in named},
            "per_value": {f: per_value(res.expected[f], res.predicted[f]) for f in named},
            "confusion": {f: confusion(res.expected[f], res.predicted[f]) for f in named},
            "examples": [s.prompt for s in specs[:4]],
        }
        if name == "swap":
            results[name].update(swap_result(res, n_swap))
    return results


def judge(results: dict) -> tuple[dict, dict]:
    """(passed, worst): each bar on its rate, and each held-out factor's worst single value against
    ``PER_VALUE_BAR``."""
    passed = {name: {f: results[name]["accuracy"][f] >= bar for f, bar in bars.items()} for name, bars in BAR.items()}
    worst = {f: min(rows.items(), key=lambda kv: kv[1]["rate"]) for f, rows in results["heldout"]["per_value"].items()}
    passed["heldout"]["every_value"] = all(r["rate"] >= PER_VALUE_BAR for _, r in worst.values())
    return passed, {f: {"value": v, **r} for f, (v, r) in worst.items()}


def guidance_sweep(pipe, clf, a, model_dir: Path) -> int:
    """The bar at each CFG scale of ``a.guidance_sweep`` (same prompts and seeds at every scale): one entry a
    scale with its rates, worst single values and verdicts; the table is ``benchmarks/report.py``'s
    ``reference_guidance_sweep``."""
    rows = []
    for scale in a.guidance_sweep:
        call = dict(num_inference_steps=a.steps, guidance_scale=scale)
        if a.guidance_rescale:
            call["guidance_rescale"] = a.guidance_rescale
        results = measure(pipe, clf, a.heldout, a.synonyms, a.swap, a.batch_size, **call)
        passed, worst = judge(results)
        rows.append({"guidance_scale": scale, "results": results, "worst_value": worst, "passed": passed})
        print(f"CFG {scale:g}: " + ", ".join(f"{f} {r['accuracy'][f]:.3f}" for f in ("object", "color", "style",
              "background") for r in [results["heldout"]]) + "; worst: "
              + ", ".join(f"{w['value']} {w['rate']:.2f}" for w in worst.values()), flush=True)
    report = {
        "model": _display(model_dir),
        "sampler": {"scheduler": type(pipe.scheduler).__name__, "steps": a.steps,
                    "guidance_rescale": a.guidance_rescale,
                    "timestep_spacing": pipe.scheduler.config.get("timestep_spacing")},
        "bar": BAR, "per_value_bar": PER_VALUE_BAR, "sweep": rows,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__},
    }
    atomic_write_json(a.out, report, indent=2)
    print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", type=int, default=512, help="held-out images")
    p.add_argument("--synonyms", type=int, default=256, help="synonym-only images")
    p.add_argument("--swap", type=int, default=128, help="background-swap pairs (2 images each, same seed)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=REFERENCE_GUIDANCE_SCALE,
                   help="CFG scale (default: the model's, diffkit.zoo.REFERENCE_GUIDANCE_SCALE)")
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="rescaled CFG (Lin et al. 2024, eq. 16; diffusers' guidance_rescale): 0 = plain CFG")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="8 + 8 images, no grid: checks the script")
    p.add_argument("--model", type=Path, default=None,
                   help="a candidate pipeline folder (e.g. runs/v5/pipeline) instead of the shipped weights; with it "
                   "the default --out is benchmarks/results/reference_model_candidate.json and no grid is drawn")
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/reference_model.json")
    p.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "reference_grid.png")
    p.add_argument("--no-grid", action="store_true", help="do not redraw the sample grid (sampler sweeps)")
    p.add_argument("--guidance-sweep", type=float, nargs="+", default=None, metavar="SCALE",
                   help="measure the bar at each CFG scale instead (no grid); default --out: "
                   "benchmarks/results/reference_model_guidance_sweep.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    a.out = a.out or ROOT / "benchmarks" / "results" / (
        "reference_model_guidance_sweep.json" if a.guidance_sweep else
        "reference_model_candidate.json" if a.model else "reference_model.json")
    if a.smoke:
        a.heldout, a.synonyms, a.swap, a.steps = 8, 8, 4, 5
        a.out = a.out.with_name("reference_model_guidance_sweep_smoke.json" if a.guidance_sweep
                                else "reference_model_smoke.json")

    t = time.perf_counter()
    model_dir = a.model or reference_path()
    if a.model:
        import diffkit

        pipe = diffkit.DiffusionPipeline.from_pretrained(a.model, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
    else:
        pipe = load_reference_pipeline()
    load_seconds = time.perf_counter() - t
    clf = load_reference_classifier()
    call = dict(num_inference_steps=a.steps, guidance_scale=a.guidance_scale)
    if a.guidance_rescale:
        call["guidance_rescale"] = a.guidance_rescale

    if a.guidance_sweep:
        return guidance_sweep(pipe, clf, a, model_dir)
    t = time.perf_counter()
    results = measure(pipe, clf, a.heldout, a.synonyms, a.swap, a.batch_size, **call)
    gen_seconds = time.perf_counter() - t
    per_image = _time_generation(pipe, a.steps, a.guidance_scale)
    if not a.smoke and not a.model and not a.no_grid:
        sample_grid(pipe, a.grid, a.steps, a.guidance_scale)

    training = json.loads((model_dir / "training.json").read_text())
    passed, worst = judge(results)
    report = {
        "model": _display(model_dir),
        "sampler": {"scheduler": type(pipe.scheduler).__name__, "steps": a.steps, "guidance_scale": a.guidance_scale,
                    "guidance_rescale": a.guidance_rescale,
                    "timestep_spacing": pipe.scheduler.config.get("timestep_spacing"),
                    "rescale_betas_zero_snr": pipe.scheduler.config.get("rescale_betas_zero_snr", False)},
        "results": results,
        "bar": BAR,
        "per_value_bar": PER_VALUE_BAR,
        "worst_value": worst,
        "passed": passed,
        "load_seconds": round(load_seconds, 3),
        "weights_mb": round(sum(f.stat().st_size for f in model_dir.rglob("*.safetensors")) / 2**20, 1),
        "seconds_per_image_batch1": round(per_image, 3),
        "generation_seconds_total": round(gen_seconds, 1),
        "training": {
            "device": training.get("device"),
            "vae_seconds": training.get("vae", {}).get("train_seconds"),
            "unet_seconds": training.get("unet_seconds"),
            "unet_cpu_seconds": training.get("unet_cpu_seconds"),
            "unet_steps": training.get("steps"),
            "batch": training.get("batch"),
            "images": training.get("images"),
            "ema_decay": training.get("ema_decay"),
            "rotation": training.get("rotation"),
            "center_range": training.get("center_range"),
            "min_snr_gamma": training.get("min_snr_gamma"),
            "zero_terminal_snr": training.get("zero_terminal_snr", False),
            "offset_noise": training.get("offset_noise", 0.0),
            "threads": training.get("threads"),
        },
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }
    atomic_write_json(a.out, report, indent=2)
    print(f"{'set':<10} {'n':>5} " + " ".join(f"{f:>8}" for f in ("object", "color", "style", "background")))
    for name, r in results.items():
        acc = r["accuracy"]
        cells = [f"{acc[f]:>8.3f}" if f in acc else f"{'-':>8}" for f in ("object", "color", "style", "background")]
        print(f"{name:<10} {r['n_images']:>5} " + " ".join(cells))
    for f, rows in results["heldout"]["per_value"].items():
        print(f"heldout {f} by value: " + ", ".join(f"{k} {v['rate']:.2f}" for k, v in rows.items()))
    sw = results["swap"]
    print(f"background swap ({sw['pairs']} pairs, same seed): both as asked {sw['both_as_asked']['rate']:.3f}, "
          f"same background drawn {sw['same_background_drawn']['rate']:.3f}")
    print(f"load {load_seconds:.2f} s, {per_image:.2f} s/image (batch 1, {a.steps} steps); wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
