"""Shared benchmark helpers: environment record, timing, atomic JSON, table printing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import diffusers
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    # The CPU kernels' instruction set: runs on CPUs with other kernels round differently in the last bits, which
    # chaotic training (DoCo's adversarial game, SalUn's saliency threshold) turns into other weights.
    return dict(device=device, cuda=torch.version.cuda, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, cpu_threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), date=time.strftime("%Y-%m-%d %H:%M:%S"))


def sd15_for_timing(ap, smoke: bool):
    """(pipeline, device, dtype, size) of the GPU timing benchmarks: the full-size SD1.5 architecture (random
    weights) in fp16 at 512 px on CUDA, or with ``smoke`` the tiny SD1.5 on CPU in float32 at 64 px (a logic
    check). No GPU without ``smoke`` is a usage error of ``ap``."""
    from diffkit.zoo import build_full_pipeline, build_tiny_pipeline

    if smoke:
        device, dtype, size = "cpu", torch.float32, 64
        base = build_tiny_pipeline("sd15")
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA GPU (use --smoke for the CPU logic check)")
        device, dtype, size = "cuda", torch.float16, 512
        base = build_full_pipeline("sd15", device=device, dtype=dtype)
    base.set_progress_bar_config(disable=True)
    return base, device, dtype, size


def reference_models(smoke: bool, device: str):
    """(diffkit pipeline, oracle) of the quality benchmarks: the shipped reference model, or with ``smoke``
    the tiny random SD1.5 (a logic check: the oracle's verdict on its images means nothing)."""
    import diffkit
    from diffkit.zoo import build_tiny_pipeline, load_reference_classifier, load_reference_pipeline

    try:
        oracle = load_reference_classifier(device)
        pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15")).to(device) if smoke else load_reference_pipeline(device)
    except FileNotFoundError as e:
        raise SystemExit(f"reference model missing: {e}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe, oracle


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(fns: dict, device, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, alternating them so drift hits all equally."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for r in range(repeats):
        order = list(fns.items()) if r % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            times[name].append(timed(fn, device))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def write_json(name: str, payload: dict) -> Path:
    """Atomically, through the artifact kernel (mode 0644; NaN kept as JSON's NaN for failed figures)."""
    from diffkit.artifacts import atomic_write_bytes

    RESULTS.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(RESULTS / name, (json.dumps(payload, indent=2) + "\n").encode())


def print_table(rows: list[dict]) -> None:
    """Every column any row has, in first-seen order; "—" where a row lacks it (a row reused from a run that
    measured more, beside this run's)."""
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cell = {c: [_fmt(r[c]) if c in r else "—" for r in rows] for c in cols}
    widths = {c: max(len(c), *(len(v) for v in cell[c])) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for i in range(len(rows)):
        print("  ".join(cell[c][i].ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# -- per-image outcomes, intervals and paired comparisons of the quality benchmarks (issue 16) -------------

#: Recorded in each quality JSON that carries per-image outcomes (report.py renders files without it as stale).
STATS = dict(confidence=0.95, rates="Wilson score interval", means="percentile bootstrap, 2000 resamples, whole "
             "prompts resampled", differences="paired bootstrap of the per-image differences, whole prompts "
             "resampled", psnr_cap_db=100.0)


def capped_psnr(values) -> list[float]:
    """Per-image PSNR in dB with identical pairs (+inf) counted at ``STATS["psnr_cap_db"]``, so means and
    intervals stay finite."""
    return [min(float(v), STATS["psnr_cap_db"]) for v in values]


def mean_with_interval(values, groups) -> dict:
    """The mean of per-image ``values`` with its 95% bootstrap interval (``groups``: prompt of each image)."""
    from diffkit.evaluation import bootstrap_interval

    return dict(mean=float(np.mean(values)), ci95=list(bootstrap_interval(values, groups=groups)), n=len(values))


def oracle_outcomes(result, groups) -> dict:
    """What the oracle read, image by image, from a :class:`diffkit.evaluation.ConceptResult`:

    * ``outcomes``: per factor, 1 / 0 for each image (None where its prompt does not name the factor);
    * ``rates``: per factor, k of n with the Wilson interval (``Rate.to_json``);
    * ``per_image_accuracy``: each image's share of its named factors read right, and ``mean_accuracy`` with
      its bootstrap interval over prompts (``mean_accuracy_ci95``; the factors of one image are not
      independent, so the mean is not given a Wilson interval of pooled readings).
    """
    from diffkit.evaluation import rate

    outcomes = {f: [None if e is None else int(p == e) for p, e in zip(result.predicted[f], expected)]
                for f, expected in result.expected.items()}
    outcomes = {f: hits for f, hits in outcomes.items() if any(h is not None for h in hits)}
    rates = {f: rate([h for h in hits if h is not None]).to_json() for f, hits in outcomes.items()}
    per_image = []
    for i in range(len(result.prompts)):
        scored = [hits[i] for hits in outcomes.values() if hits[i] is not None]
        if not scored:
            raise ValueError(f"image {i} ({result.prompts[i]!r}) names no factor the oracle reads")
        per_image.append(sum(scored) / len(scored))
    mean = mean_with_interval(per_image, groups)
    return dict(outcomes=outcomes, rates=rates, per_image_accuracy=per_image, mean_accuracy=mean["mean"],
                mean_accuracy_ci95=mean["ci95"])


def judged_difference(a, b, groups, target: float, direction: str, strict: bool = False) -> dict:
    """``mean(a) - mean(b)`` over the same images with its paired bootstrap interval (whole prompts resampled)
    and the verdict against ``target`` (``direction`` ">=" or "<="). ``strict``: the difference must be
    strictly beyond the target ("less saturated", "higher PSNR"), so an interval ending on it is not met."""
    from diffkit.evaluation import paired_difference, verdict

    d = paired_difference(a, b, groups=groups)
    v = verdict(d.low, d.high, target, direction)
    if strict and v == "met" and (d.low if direction == ">=" else d.high) == target:
        v = "missed" if d.low == d.high else "not resolved at this n"
    return {**d.to_json(), "target": f"{direction} {target:g}", "verdict": v}


def versus_baseline(res, prompts, base: dict | None = None, base_images=None, margin: float = 0.0) -> dict:
    """A quality row from an ``evaluate_concepts`` result (one image per prompt in ``prompts``): its per-image
    outcomes and intervals (:func:`oracle_outcomes`; ``accuracy``: the factors' rates alone); with ``base``
    (the baseline's row) and ``base_images`` also the per-image PSNR against the baseline's images with its
    interval, and the paired change in mean accuracy judged against ``-margin`` (``accuracy_diff``)."""
    from diffkit.evaluation import psnr

    o = oracle_outcomes(res, prompts)
    row = dict(n=res.n_images, accuracy={f: r["rate"] for f, r in o["rates"].items()}, **o)
    if base is None:
        return dict(row, psnr_db=float("inf"), delta_points=0.0)
    values = capped_psnr(psnr(base_images, res.images))
    return dict(row, psnr_db=float(np.mean(values)), psnr_db_ci95=mean_with_interval(values, prompts)["ci95"],
                per_image_psnr_db=values, delta_points=100 * (o["mean_accuracy"] - base["mean_accuracy"]),
                accuracy_diff=judged_difference(o["per_image_accuracy"], base["per_image_accuracy"], prompts,
                                                -margin, ">="))
