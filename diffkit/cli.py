"""The ``diffkit`` command: generate, and the subcommands the feature packages register.

Each feature package may provide ``<package>/cli.py`` with ``register(subparsers)``; it adds its
parser and sets ``func=run`` where ``run(args) -> int``. A ``CLIError`` (or ``ValueError``) raised by a
command becomes a one-line ``diffkit: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

#: Feature packages that add subcommands (imported lazily; a missing one is simply absent).
SUBCOMMAND_MODULES = ("diffkit.evaluation.cli", "diffkit.erasure.cli", "diffkit.pruning.cli", "diffkit.bench_cli")

DEVICES = ("cpu", "cuda", "mps")
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def parse_device(value: str) -> str:
    import torch

    base = value.split(":", 1)[0]
    if base not in DEVICES:
        raise CLIError(f"unknown device {value!r}; use one of {', '.join(DEVICES)} (optionally cuda:N)")
    if base == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {value!r} requested but CUDA is not available on this machine")
    if base == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"device {value!r} requested but MPS is not available on this machine")
    return value


def parse_dtype(value: str):
    import torch

    if value not in DTYPES:
        raise CLIError(f"unknown dtype {value!r}; use one of {', '.join(sorted(DTYPES))}")
    return getattr(torch, DTYPES[value])


def default_model() -> str:
    """The shipped reference model when present, else a tiny zoo pipeline built on the fly."""
    try:
        from diffkit.zoo import reference

        return str(reference.reference_path())
    except (ImportError, AttributeError, FileNotFoundError):
        return "zoo:sd15"


def load_pipeline(model: str | None, device: str = "cpu", dtype=None):
    """Load ``model`` (a path, a hub id, or ``zoo:<family>``) as a diffkit pipeline."""
    import torch

    import diffkit
    from diffkit.zoo import build_tiny_pipeline

    model = model or default_model()
    if model.startswith("zoo:"):
        pipe = diffkit.to_diffkit(build_tiny_pipeline(model[4:]))
    else:
        if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
            raise CLIError(f"model path {model!r} does not exist")
        # An explicit dtype for every component: transformers 5 otherwise keeps each text encoder's
        # saved dtype while diffusers loads the rest in float32.
        try:
            pipe = diffkit.DiffusionPipeline.from_pretrained(model, dtype=dtype or torch.float32)
        except (OSError, ValueError) as e:
            raise CLIError(f"could not load model {model!r}: {str(e).splitlines()[0]}") from None
    if dtype is not None and dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"cannot read prompts file {args.prompts_file!r}: {e.strerror or e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise CLIError("no prompts: give PROMPT arguments or --prompts-file")
    return prompts


def build_guidance(method: str, scale: float):
    """The guidance object of ``--guidance`` (None: the pipeline's own CFG with ``guidance_scale``)."""
    if method == "cfg":
        return None
    from diffkit.guidance import APG, CFGPlusPlus

    try:
        return APG(scale) if method == "apg" else CFGPlusPlus(scale)
    except ValueError as e:
        raise CLIError(f"--guidance {method}: {e}") from None


def attach_features(pipe, args) -> dict:
    """Apply --deepcache / --pruning / --erasure to ``pipe``; returns what was attached (for the JSON lines)."""
    features = {}
    for key, path, load, what in (("pruning", args.pruning, pipe.load_pruning, "pruning spec"),
                                  ("erasure", args.erasure, pipe.load_erasure, "erasure artifact")):
        if path:
            try:
                load(path)
            except (OSError, ValueError) as e:
                raise CLIError(f"cannot load {what} {path!r}: {e}") from None
            features[key] = path
    if args.deepcache:
        try:
            pipe.enable_deepcache(interval=args.deepcache, branch=args.deepcache_branch)
        except ValueError as e:
            raise CLIError(f"--deepcache: {e}") from None
        features["deepcache"] = dict(interval=args.deepcache, branch=args.deepcache_branch)
    return features


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    if args.steps <= 0:
        raise CLIError(f"--steps must be a positive integer, got {args.steps}")
    if args.guidance_scale < 0:
        raise CLIError(f"--guidance-scale must be >= 0, got {args.guidance_scale}")
    if args.deepcache < 0:
        raise CLIError(f"--deepcache must be >= 0 (0: off), got {args.deepcache}")
    if args.deepcache_branch and not args.deepcache:
        raise CLIError("--deepcache-branch needs --deepcache N (DeepCache is off)")
    guidance = build_guidance(args.guidance, args.guidance_scale)
    prompts = read_prompts(args)
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    pipe = load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    features = attach_features(pipe, args)
    call = dict(guidance_scale=args.guidance_scale) if guidance is None else dict(guidance=guidance)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "images.jsonl"
    with open(log_path, "a", encoding="utf-8") as log:
        for i, prompt in enumerate(tqdm(prompts, desc="generate", unit="img", disable=args.quiet)):
            seed = args.seed + i
            gen = torch.Generator(device="cpu").manual_seed(seed)
            t0 = time.perf_counter()
            try:
                image = pipe(prompt, num_inference_steps=args.steps, generator=gen, **call).images[0]
            except ValueError as e:  # e.g. CFG++ with a scheduler it has no step rule for
                raise CLIError(str(e)) from None
            elapsed = time.perf_counter() - t0
            name = f"{i:05d}_seed{seed}.png"
            tmp = out / (name + ".tmp")
            image.save(tmp, format="PNG")
            tmp.replace(out / name)
            record = dict(file=name, prompt=prompt, seed=seed, steps=args.steps, guidance=args.guidance,
                          guidance_scale=args.guidance_scale, **features, model=args.model or default_model(),
                          device=device, dtype=str(dtype).replace("torch.", ""), seconds=round(elapsed, 4))
            log.write(json.dumps(record) + "\n")
            log.flush()
    if not args.quiet:
        print(f"wrote {len(prompts)} image(s) and {log_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffkit",
        description="diffkit: faster, better-guided and safer diffusers pipelines "
        "(DeepCache, pruning, APG / CFG++, concept erasure).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser("generate", help="generate images to PNG files with a JSON line each",
                       description="Generate one image per prompt; writes PNGs and images.jsonl to --out.")
    g.add_argument("prompt", nargs="*", help="prompt(s); one image each")
    g.add_argument("--model", default=None,
                   help="pipeline folder, hub id, or zoo:sd15|sd2|sdxl (default: the shipped reference model)")
    g.add_argument("--prompts-file", default=None, help="text file, one prompt per line (# comments skipped)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (default 0)")
    g.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    g.add_argument("--guidance-scale", type=float, default=7.5,
                   help="guidance scale: CFG's and APG's w, CFG++'s lambda in [0, 1] (default 7.5)")
    g.add_argument("--guidance", choices=("cfg", "apg", "cfgpp"), default="cfg",
                   help="cfg (default), apg (eta 0, r 15, momentum -0.5) or cfgpp (CFG++: DDIM, Euler, Euler a, "
                   "DPM++ 2M)")
    g.add_argument("--deepcache", type=int, default=0, metavar="N",
                   help="DeepCache: a full U-Net step every N steps (0: off, the default)")
    g.add_argument("--deepcache-branch", type=int, default=0, help="DeepCache's cache branch (default 0)")
    g.add_argument("--pruning", default=None, metavar="DIR", help="load a pruning spec folder (diffkit prune)")
    g.add_argument("--erasure", default=None, metavar="PATH", help="load an erasure artifact (diffkit erase)")
    g.add_argument("--out", default="outputs", help="output folder (default ./outputs)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    g.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    g.set_defaults(func=cmd_generate)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.register(sub)
    return parser


def _quiet_libraries() -> None:
    # A command line's output is its own: keep transformers' import-time notices (e.g. about the
    # optional torchvision) out of it. Errors still show.
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError) as e:
        print(f"diffkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
