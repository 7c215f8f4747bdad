"""Shared benchmark helpers: environment record, timing, atomic JSON, table printing."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    import diffusers
    import transformers

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(device=device, cuda=torch.version.cuda, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, cpu_threads=torch.get_num_threads(),
                date=time.strftime("%Y-%m-%d %H:%M:%S"))


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
    if not rows:
        return
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(widths[c]) for c in cols))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
