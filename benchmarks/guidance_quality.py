"""Guidance quality on the reference model: saturation and oracle accuracy of CFG, APG and CFG++, and the
DDIM-inversion round trip (CFG++ vs CFG).

    OMP_NUM_THREADS=2 python benchmarks/guidance_quality.py                  # full: 256 images per setting
    python benchmarks/guidance_quality.py --n 8 --inversion-n 2 --steps 5 --inversion-steps 5 --model tiny  # smoke
    python benchmarks/guidance_quality.py --parts inversion     # only the inversion table (guidance_inversion.json)

Settings: CFG at scales 5/10/15/20, APG at the same scales (eta 0, momentum -0.5, norm threshold r), CFG++
at lambda 0.4/0.6/0.8/1.0; every setting draws the same prompts with the same seeds, DDIM sampler.
Saturation is ``diffkit.evaluation`` mean HSV saturation; accuracy is the oracle's per-factor accuracy on the
factors each prompt names. Inversion: >= 16 of the model's own images (50 DDIM steps), inverted and
reconstructed with CFG++ 0.6 and with CFG 7.5, PSNR of the decoded reconstruction against the image.

Statistics (issue 16): every row keeps its per-image outcomes (each factor read right or not, saturation,
inversion PSNR) with the prompts and seeds; each factor's accuracy has its n and Wilson interval, the mean
accuracy and saturation a bootstrap interval over prompts. The targets compare two settings on the same
prompts and seeds by the paired bootstrap interval of the difference (whole prompts resampled) and judge it:
APG 15 less saturated than CFG 15 (difference below 0) and at least as accurate (difference above -2 points,
the margin of ``guiders_quality.py``); CFG++ 0.6's inversion PSNR above CFG 7.5's (difference above 0).

APG's r: the paper's SDXL value is 15 for 4x128x128 latents; an update's norm grows like the square root of
the latent size, so the default here is 15 * sqrt(latent numel / (4*128*128)) (recorded in the JSON).

Writes benchmarks/results/guidance_quality.json (``--model tiny``: guidance_quality_smoke.json) and the image
grid docs/images/guidance_grid.png. Settings already measured with the same configuration are read back
from the partial file benchmarks/results/guidance_quality.partial.json (resume after an interruption).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    STATS,
    capped_psnr,
    environment,
    judged_difference,
    mean_with_interval,
    oracle_outcomes,
    print_table,
    write_json,
)

from diffkit.guidance import APG, CFG, CFGPlusPlus  # noqa: E402

GRID = Path(__file__).resolve().parents[1] / "docs" / "images" / "guidance_grid.png"
GRID_MAX_BYTES = 300_000
SDXL_LATENT_NUMEL = 4 * 128 * 128
SDXL_NORM_THRESHOLD = 15.0
#: "at least as accurate": the paired difference's interval above -2 points (as in guiders_quality.py)
ACCURACY_MARGIN = 0.02


def default_norm_threshold(latent_numel: int) -> float:
    """The paper's SDXL r = 15 carried to another latent size (norms scale with sqrt(numel))."""
    return SDXL_NORM_THRESHOLD * math.sqrt(latent_numel / SDXL_LATENT_NUMEL)


def settings(cfg_scales, lambdas, norm_threshold: float) -> list[tuple[str, object]]:
    out = [(f"cfg_{s:g}", CFG(s)) for s in cfg_scales]
    out += [(f"apg_{s:g}", APG(s, eta=0.0, norm_threshold=norm_threshold, momentum=-0.5)) for s in cfg_scales]
    out += [(f"cfgpp_{lam:g}", CFGPlusPlus(lam)) for lam in lambdas]
    return out


def load(model: str):
    """(pipeline, classifier or None) for ``reference`` or ``tiny``; raises SystemExit with the reason."""
    import diffusers

    if model == "reference":
        from diffkit.zoo import load_reference_classifier, load_reference_pipeline

        try:
            pipe, classifier = load_reference_pipeline(), load_reference_classifier()
        except FileNotFoundError as e:
            raise SystemExit(f"reference model or oracle missing ({e}); run with --model tiny for a smoke run") from e
    else:
        from diffkit.pipelines import to_diffkit
        from diffkit.zoo import build_tiny_pipeline, load_reference_classifier

        pipe = to_diffkit(build_tiny_pipeline("sd15", 0))
        try:  # the oracle, when present, exercises the accuracy path even on the smoke model
            classifier = load_reference_classifier()
        except FileNotFoundError:
            classifier = None
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, classifier


def prompt_specs(n: int, seed: int):
    from diffkit.evaluation import shapes_prompt_specs

    return shapes_prompt_specs(n, seed=seed)


def generate(pipe, prompts, seeds, batch_size, **kw) -> np.ndarray:
    from diffkit.evaluation import generate_images

    return generate_images(pipe, prompts, seeds, batch_size=batch_size, progress=True, **kw)


def quality_figures(saturation, result, prompts) -> dict:
    """A setting's figures from its per-image ``saturation`` and the oracle's reading (``ConceptResult`` or None,
    one image per prompt of ``prompts``): means with intervals and the per-image outcomes they came from."""
    sat = [float(x) for x in saturation]
    row = dict(n=len(sat), saturation=float(np.mean(sat)), saturation_ci95=mean_with_interval(sat, prompts)["ci95"],
               per_image_saturation=sat)
    if result is not None:
        o = oracle_outcomes(result, prompts)
        row.update({f"acc_{f}": r["rate"] for f, r in o["rates"].items()})
        row.update(accuracy=o["rates"], acc_mean=o["mean_accuracy"], acc_mean_ci95=o["mean_accuracy_ci95"],
                   per_image_accuracy=o["per_image_accuracy"], outcomes=o["outcomes"])
    return row


def quality_row(name, guidance, pipe, classifier, specs, steps, batch_size) -> tuple[dict, np.ndarray]:
    """One setting on every prompt spec (image i draws seed i): per-image saturation and oracle outcomes."""
    from diffkit.evaluation import classify_specs, image_saturation

    prompts, seeds = [s.prompt for s in specs], list(range(len(specs)))
    t0 = time.perf_counter()
    images = generate(pipe, prompts, seeds, batch_size, desc=name, num_inference_steps=steps, guidance=guidance)
    result = classify_specs(classifier, images, specs) if classifier is not None else None
    row = dict(setting=name, guidance=repr(guidance), **quality_figures(image_saturation(images), result, prompts),
               seconds=round(time.perf_counter() - t0, 1))
    return row, images


def inversion_row(source: str, method: str, psnr_db, prompts, seeds, steps: int) -> dict:
    """One method's round trip on one image set: per-image PSNR (identical pairs at the cap) with its mean's
    interval over prompts."""
    values = capped_psnr(psnr_db)
    return dict(images=source, method=method, n=len(values), steps=steps, psnr_mean=float(np.mean(values)),
                psnr_std=float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                psnr_ci95=mean_with_interval(values, prompts)["ci95"], per_image_psnr=values, prompts=prompts,
                seeds=seeds)


@torch.no_grad()
def inversion_rows(pipe, n: int, steps: int, batch_size: int, seed: int = 1) -> list[dict]:
    """PSNR of invert -> reconstruct, on the model's own images: a common set (CFG 3) and each method's own."""
    from diffkit.evaluation import psnr

    specs = prompt_specs(n, seed)
    prompts = [s.prompt for s in specs]
    methods = {"cfgpp_0.6": CFGPlusPlus(0.6), "cfg_7.5": CFG(7.5)}
    sources = {"common (CFG 3)": CFG(3.0), "own": None}
    seeds = [seed * 100_000 + i for i in range(n)]
    rows = []
    for source, source_guidance in sources.items():
        for name, guidance in methods.items():
            psnrs = []
            for start in range(0, n, batch_size):
                batch = prompts[start:start + batch_size]
                gens = [torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]]
                made = pipe(batch, guidance=source_guidance or guidance, num_inference_steps=steps, generator=gens,
                            output_type="pt").images
                z = pipe.invert(made, batch, guidance=guidance, num_inference_steps=steps)
                rec = pipe(batch, latents=z, guidance=guidance, num_inference_steps=steps, output_type="pt").images
                psnrs.append(psnr(rec, made, value_range=(0, 1)))
            rows.append(inversion_row(source, name, torch.cat(psnrs), prompts, seeds, steps))
    return rows


def save_grid(columns: dict[str, np.ndarray], path: Path, rows: int = 4) -> int:
    """Rows = prompts, columns = settings; a PNG written atomically; returns its size in bytes."""
    from PIL import Image, ImageDraw

    names = list(columns)
    h, w = columns[names[0]].shape[1:3]
    label_h = 12
    grid = Image.new("RGB", (w * len(names), h * rows + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for j, name in enumerate(names):
        draw.text((j * w + 2, 0), name, fill="black")
        for i in range(min(rows, len(columns[name]))):
            grid.paste(Image.fromarray(columns[name][i]), (j * w, label_h + i * h))
    buf = io.BytesIO()
    grid.save(buf, format="PNG", optimize=True)
    if buf.tell() > GRID_MAX_BYTES:  # noisy images compress badly: fall back to a 256-colour palette
        buf = io.BytesIO()
        grid.quantize(colors=256).save(buf, format="PNG", optimize=True)
    if buf.tell() > GRID_MAX_BYTES:
        raise RuntimeError(f"grid is {buf.tell()} bytes, more than {GRID_MAX_BYTES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return buf.tell()


def targets(rows: list[dict], inversion: list[dict], prompts: list[str]) -> dict:
    """The issue's targets, each a paired difference on the same prompts and seeds with its verdict: APG 15 less
    saturated than CFG 15 and at least as accurate (within ``ACCURACY_MARGIN``); CFG++ 0.6 inverting with a
    higher PSNR than CFG 7.5 (on each image set)."""
    by = {r["setting"]: r for r in rows}
    out = {}
    if "apg_15" in by and "cfg_15" in by:
        apg, cfg = by["apg_15"], by["cfg_15"]
        out["apg15_saturation_below_cfg15"] = dict(
            a="apg_15", b="cfg_15", measure="saturation", **judged_difference(
                apg["per_image_saturation"], cfg["per_image_saturation"], prompts, 0.0, "<=", strict=True))
        if "per_image_accuracy" in apg:
            out["apg15_accuracy_at_least_cfg15"] = dict(
                a="apg_15", b="cfg_15", measure="mean accuracy", **judged_difference(
                    apg["per_image_accuracy"], cfg["per_image_accuracy"], prompts, -ACCURACY_MARGIN, ">="))
    for source in sorted({r["images"] for r in inversion}):
        psnr = {r["method"]: r for r in inversion if r["images"] == source}
        a, b = psnr["cfgpp_0.6"], psnr["cfg_7.5"]
        out[f"cfgpp_psnr_above_cfg ({source})"] = dict(
            a="cfgpp_0.6", b="cfg_7.5", measure=f"inversion PSNR, dB ({source})", **judged_difference(
                a["per_image_psnr"], b["per_image_psnr"], a["prompts"], 0.0, ">=", strict=True))
    return out


def _fmt_ci(ci) -> str:
    return f"[{ci[0]:+.4g}, {ci[1]:+.4g}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("reference", "tiny"), default="reference")
    p.add_argument("--n", type=int, default=256, help="images per setting")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps for the quality settings")
    p.add_argument("--inversion-n", type=int, default=16)
    p.add_argument("--inversion-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--norm-threshold", type=float, default=None, help="APG r (default: SDXL's 15, size-scaled)")
    p.add_argument("--cfg-scales", type=float, nargs="+", default=[5, 10, 15, 20])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.4, 0.6, 0.8, 1.0])
    p.add_argument("--parts", nargs="+", choices=("quality", "inversion"), default=["quality", "inversion"])
    p.add_argument("--grid", type=Path, default=None, help="grid PNG (default: docs/images/guidance_grid.png; "
                   "smoke or --tag: benchmarks/results/guidance_grid<_smoke><TAG>.png)")
    p.add_argument("--tag", default="", help="suffix of the result (and partial, grid) file names, e.g. _r5 for a "
                   "side run that must not replace the main results")
    args = p.parse_args(argv)
    if args.grid is None:
        smoke = "" if args.model == "reference" else "_smoke"
        args.grid = GRID if not smoke and not args.tag else RESULTS / f"guidance_grid{smoke}{args.tag}.png"
    if args.n < 1 or args.inversion_n < 1:
        p.error("--n and --inversion-n must be >= 1")

    pipe, classifier = load(args.model)
    latent_numel = pipe.unet.config.in_channels * pipe.unet.config.sample_size**2
    r = default_norm_threshold(latent_numel) if args.norm_threshold is None else args.norm_threshold
    from diffkit.artifacts import model_digest as fingerprint  # a partial file of other weights is not resumed

    config = dict(model=args.model, n=args.n, steps=args.steps, norm_threshold=r, scheduler="DDIMScheduler",
                  inversion_n=args.inversion_n, inversion_steps=args.inversion_steps, weights=fingerprint(pipe.unet),
                  outcomes="per image")  # a partial file without per-image outcomes is not resumed
    suffix = ("" if args.model == "reference" else "_smoke") + args.tag
    partial_path = RESULTS / f"guidance_quality{suffix}.partial.json"
    partial = json.loads(partial_path.read_text()) if partial_path.is_file() else {}
    if partial.get("config") != config:
        partial = {"config": config, "rows": {}}

    specs = prompt_specs(args.n, seed=0)
    rows, grid_columns = [], {}
    for name, guidance in settings(args.cfg_scales, args.lambdas, r) if "quality" in args.parts else ():
        if name in partial["rows"]:  # measured before an interruption: only the grid's images are redrawn
            rows.append(partial["rows"][name])
            grid_columns[name] = generate(pipe, [s.prompt for s in specs[:4]], list(range(4)), args.batch_size,
                                          desc=name, num_inference_steps=args.steps, guidance=guidance)
            continue
        row, images = quality_row(name, guidance, pipe, classifier, specs, args.steps, args.batch_size)
        rows.append(row)
        grid_columns[name] = images[:4]
        partial["rows"][name] = row
        write_json(partial_path.name, partial)  # checkpoint after every setting
    print_table([{k: row.get(k, "") for k in ("setting", "n", "saturation", "acc_mean", "seconds")} for row in rows])

    inversion = []
    if "inversion" in args.parts:
        inversion = inversion_rows(pipe, args.inversion_n, args.inversion_steps, args.batch_size)
    print_table([{k: row[k] for k in ("images", "method", "n", "psnr_mean", "psnr_std")} for row in inversion])

    prompts = [s.prompt for s in specs]
    payload = dict(benchmark="guidance_quality", environment=environment(), config=config, stats=STATS,
                   accuracy_margin=ACCURACY_MARGIN, settings=dict(cfg_scales=args.cfg_scales, lambdas=args.lambdas,
                                                                  parts=args.parts, batch_size=args.batch_size),
                   items=dict(prompts=prompts, seeds=list(range(len(specs)))),
                   quality=rows, inversion=inversion, targets=targets(rows, inversion, prompts),
                   notes=None if classifier is not None else "no oracle: accuracy not measured")
    if grid_columns:
        payload["grid"] = dict(path=str(args.grid), bytes=save_grid(grid_columns, args.grid))
    for key, t in payload["targets"].items():
        print(f"target {key}: {t['difference']:+.4g} {_fmt_ci(t['ci95'])} -> {t['verdict']}")
    name = f"guidance_quality{suffix}.json" if len(args.parts) == 2 else f"guidance_{args.parts[0]}{suffix}.json"
    out = write_json(name, payload)
    if "quality" in args.parts:
        partial_path.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
