"""``diffkit eval``: measure a pipeline with the oracle; optionally an erasure of one concept.

    diffkit eval [--model PATH] [--n 256] [--out results.json]                      concept accuracy
    diffkit eval --concept red [--factor color] [--erased DIR] [--n 64] [--out ...]  erasure report

Without ``--erased``, ``--concept`` reports the unmodified model (the erasure baseline).
"""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

from diffkit.cli import CLIError
from diffkit.cli_validation import Choice, Device, Dtype, Float, Int, OutputFile, Seed, Steps, Text, check_seed_range

WORDS = ("canonical", "eval_only")
FACTORS = ("object", "color", "style")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="measure a pipeline with the oracle: concept accuracy, or an erasure's UA / IRA / CRA / KID",
        description="Generate shapes-world prompts with a pipeline and read them with the oracle classifier. "
        "Writes a JSON report. With --concept: the UnlearnCanvas metrics of erasing that concept "
        "(with --erased, of the erasure artifact in DIR; without, the unmodified baseline).",
    )
    p.add_argument("--model", default=None, type=Text(),
                   help="pipeline folder or zoo:sd15 (default: the shipped reference model)")
    p.add_argument("--erased", default=None, type=Text(), metavar="DIR",
                   help="erasure artifact to load with pipe.load_erasure (its erasure.json must name --concept)")
    p.add_argument("--concept", default=None, type=Text(),
                   help="erased concept, a canonical word (red, star, striped ...)")
    p.add_argument("--factor", default=None, type=Choice(FACTORS),
                   help="factor of --concept: object, color or style (checked)")
    p.add_argument("--n", type=Int(1), default=256,
                   help="images: in total for accuracy; per group (forget, synonyms, retain) with --concept")
    p.add_argument("--seeds-per-prompt", type=Int(1), default=4, help="images per prompt, seeds seed..seed+k-1")
    p.add_argument("--words", default="canonical", type=Choice(WORDS),
                   help="prompt words for accuracy: canonical or eval_only")
    p.add_argument("--heldout", action="store_true", help="accuracy on held-out (object, color, style) triples only")
    p.add_argument("--classifier", default=None, type=Text(), metavar="DIR",
                   help="oracle folder (default: the shipped one)")
    p.add_argument("--steps", type=Steps(), default=25, help="denoising steps, 1 to 1000 (default 25)")
    p.add_argument("--guidance-scale", type=Float(0), default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--batch-size", type=Int(1), default=16, help="images per pipeline call (default 16)")
    p.add_argument("--seed", type=Seed(), default=0,
                   help="first seed, and the seed of the prompt draw, in [0, 2**63) (default 0)")
    p.add_argument("--device", default="cpu", type=Device(), help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", default="float32", type=Dtype(), help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--out", default=None, type=OutputFile(),
                   help="JSON report path, in an existing folder (default: print only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading)")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    for name in ("n", "seeds_per_prompt", "steps", "batch_size"):
        v = getattr(args, name)
        if v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    if args.seed < 0:
        raise CLIError(f"--seed must be >= 0, got {args.seed}")
    check_seed_range(args.seed, args.seeds_per_prompt)
    if args.guidance_scale < 0:
        raise CLIError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.words not in WORDS:
        raise CLIError(f"--words must be one of {', '.join(WORDS)}, got {args.words!r}")
    if args.erased is not None and args.concept is None:
        raise CLIError("--erased needs --concept (and optionally --factor) naming the erased concept")
    if args.factor is not None and args.concept is None:
        raise CLIError("--factor needs --concept")
    if args.erased is not None and not Path(args.erased).is_dir():
        raise CLIError(f"erasure artifact {args.erased!r} is not a directory")
    if args.concept is not None:
        from diffkit.zoo.shapes import EVAL_ONLY, factor_of

        try:
            factor = factor_of(args.concept)
        except ValueError as e:
            raise CLIError(f"--concept: {e}") from None
        if args.factor is not None and args.factor != factor:
            raise CLIError(f"--factor {args.factor!r} does not match --concept {args.concept!r}, which is a {factor}")
        if args.concept not in EVAL_ONLY:
            raise CLIError(f"--concept {args.concept!r} is a {factor}; only objects, colors and styles can be erased")
        args.factor = factor
    if args.erased is not None:
        _check_artifact_concept(args.erased, args.concept)
    if args.out is not None:
        if Path(args.out).is_dir():
            raise CLIError(f"--out must be a file path, but {args.out!r} is a folder")
        parent = Path(args.out).resolve().parent
        if not parent.is_dir():
            raise CLIError(f"--out folder {str(parent)!r} does not exist")


def _check_artifact_concept(path: str, concept: str) -> None:
    """Refuse ``--erased`` when its sidecar says it erased something else than ``--concept``.

    The check passes when ``concept`` is one of the artifact's concepts or a word of one (``red`` for an
    artifact of ``"red star"``). An unreadable sidecar is left to the loading, which reports it.
    """
    import re

    from diffkit.erasure.artifact import read_sidecar

    try:
        side = read_sidecar(path)
    except (OSError, ValueError):
        return
    erased = side.get("concept")
    erased = [erased] if isinstance(erased, str) else [c for c in (erased or []) if isinstance(c, str)]
    if not erased:
        return
    want = concept.strip().lower()
    for c in erased:
        words = re.findall(r"[\w-]+", c.lower())
        if c.strip().lower() == want or want in words:
            return
    raise CLIError(f"--concept {concept!r} does not match the erasure artifact {path!r}, which erased "
                   f"{erased} (its erasure.json); pass the concept it erased")


def _load_classifier(path: str | None, device: str):
    from diffkit.zoo.classifier import load_classifier, load_reference_classifier

    try:
        return load_classifier(path, device) if path else load_reference_classifier(device)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from None


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    return x


def write_json_atomic(path: str | Path, data: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.resolve().parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(_json_safe(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def run(args) -> int:
    _check_args(args)
    import diffusers
    import torch

    from diffkit.cli import default_model, file_errors, first_line, load_pipeline, parse_device, parse_dtype
    from diffkit.cli_validation import check_steps_for

    from .concepts import erasure_report, evaluate_concepts, shapes_erasure_prompts, shapes_prompt_specs

    device = parse_device(args.device)
    # an explicit dtype: a folder saved in half precision would otherwise load half-precision weights
    dtype = parse_dtype(args.dtype)
    classifier = _load_classifier(args.classifier, device)
    model = args.model or default_model()
    pipe = load_pipeline(model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    check_steps_for(pipe, args.steps)
    call = dict(num_inference_steps=args.steps, guidance_scale=args.guidance_scale)
    seeds = list(range(args.seed, args.seed + args.seeds_per_prompt))
    progress = not args.quiet
    t0 = time.perf_counter()
    report: dict = dict(model=model, steps=args.steps, guidance_scale=args.guidance_scale, device=device,
                        dtype=str(dtype).replace("torch.", ""))
    if args.concept is None:
        n_prompts = max(1, args.n // len(seeds))
        specs = shapes_prompt_specs(n_prompts, seed=args.seed, heldout_only=args.heldout, words=args.words)
        res = evaluate_concepts(pipe, classifier, specs, seeds=seeds, batch_size=args.batch_size, progress=progress,
                                **call)
        report.update(kind="accuracy", words=args.words, heldout=args.heldout, **res.to_json())
        lines = [f"{f:<11} {a:6.1%}" for f, a in res.accuracy.items()]
        lines.append(f"saturation  {res.mean_saturation:.4f}   ({res.n_images} images)")
    else:
        erased = pipe
        if args.erased is not None:
            erased = load_pipeline(model, device, dtype)
            erased.set_progress_bar_config(disable=True)
            if not hasattr(erased, "load_erasure") or not callable(erased.load_erasure):
                raise CLIError(f"this pipeline ({type(erased).__name__}) has no load_erasure: the erasure feature "
                               "of diffkit is not available yet, so --erased cannot be applied")
            try:
                erased.load_erasure(args.erased)
            except file_errors() as e:
                raise CLIError(f"could not load erasure {args.erased!r}: {first_line(e)}") from None
        n_prompts = max(1, args.n // len(seeds))
        groups = shapes_erasure_prompts(args.concept, n=n_prompts, seed=args.seed)
        rep = erasure_report(pipe, erased, classifier, args.factor, args.concept, groups["forget"],
                             groups["synonyms"], groups["retain"], seeds=seeds, batch_size=args.batch_size,
                             progress=progress, **call)
        report.update(kind="erasure", erased=args.erased, **rep)
        o = rep["original"]
        lines = [f"{'metric':<12} {'erased' if args.erased else 'model':>8} {'original':>9}"]
        for key in ("ua", "ua_synonyms", "ira", "cra", "cra_forget"):
            if key in rep:
                lines.append(f"{key:<12} {rep[key]:8.1%} {o[key]:9.1%}")
        lines.append(f"{'kid':<12} {rep['kid']:8.5f}")
    report.update(seconds=round(time.perf_counter() - t0, 1),
                  versions=dict(python=platform.python_version(), torch=torch.__version__,
                                diffusers=diffusers.__version__))
    print("\n".join(lines))
    if args.out is not None:
        write_json_atomic(args.out, report)
        print(f"wrote {args.out}")
    return 0
