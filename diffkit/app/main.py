"""``python app.py``: load a model, build the page, serve it on the loopback interface by default.

With no ``--model`` the demo runs on the shipped reference model; when that is not installed it falls
back to the tiny random-weight ``zoo:sd15`` pipeline and says so in the page's banner.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..cli import CLIError, load_pipeline, parse_device, parse_dtype

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
FALLBACK_MODEL = "zoo:sd15"
FALLBACK_NOTE = ("The shipped reference model is not installed, so the demo runs on the tiny random-weight "
                 f"`{FALLBACK_MODEL}` pipeline: images are noise, but every feature and timing works.")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="app.py", description="diffkit's Gradio demo: generate with every feature "
                                "toggleable and compared to a baseline, edit by CFG++ inversion, erase a concept.")
    p.add_argument("--model", default=None,
                   help="pipeline folder, hub id or zoo:sd15|sd2|sdxl (default: the shipped reference model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32, float16 or bfloat16 (default float32)")
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"interface to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0 exposes it)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    p.add_argument("--pruning-dir", default="outputs/pruning",
                   help="folder whose subfolders are pruning specs (default outputs/pruning)")
    p.add_argument("--erasure-dir", default="outputs/erasure",
                   help="folder whose subfolders are erasure artifacts; the Erase tab writes here "
                        "(default outputs/erasure)")
    p.add_argument("--lora-dir", default="outputs/lora",
                   help="folder whose subfolders are LoRAs (diffusers' pytorch_lora_weights.safetensors; "
                        "default outputs/lora)")
    p.add_argument("--no-warmup", action="store_true", help="skip the one-step warm-up call at start")
    return p


def reference_model_path():
    """The shipped reference model's folder (``diffkit.zoo.reference_path()``), or None when it is not installed."""
    try:
        from diffkit.zoo import reference_path

        return reference_path()
    except (ImportError, FileNotFoundError):
        return None


def load_model(model: str | None, device: str = "cpu", dtype=None):
    """A :class:`~diffkit.app.logic.DemoModel` for ``model`` (None: reference model, else the tiny fallback)."""
    import torch

    from .logic import DemoModel

    # Always a dtype: without one, transformers keeps a checkpoint's stored dtype (the reference model's text
    # encoder is saved in float16), which would mix dtypes inside the pipeline.
    dtype = dtype or torch.float32
    if model:
        return DemoModel(load_pipeline(model, device, dtype), model)
    path = reference_model_path()
    if path is not None:
        return DemoModel(load_pipeline(str(path), device, dtype), "reference model (diffkit.zoo)")
    return DemoModel(load_pipeline(FALLBACK_MODEL, device, dtype), FALLBACK_MODEL, note=FALLBACK_NOTE)


def prepare(argv=None):
    """Parse ``argv``, load the model and build the page; returns ``(demo, launch_kwargs)``."""
    # Gradio reads these at import: no usage analytics leave the machine.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise CLIError(f"--port must be in [0, 65535], got {args.port}")
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)

    from .ui import CSS, Handlers, build_demo, launch_options

    model = load_model(args.model, device, dtype)
    if not args.no_warmup:
        model.warm_up()
    demo = build_demo(Handlers(model, args.pruning_dir, args.erasure_dir, args.lora_dir))
    demo.queue(default_concurrency_limit=2)
    # launch() reads GRADIO_ALLOWED_PATHS whenever allowed_paths is empty; the demo serves no extra folder.
    if os.environ.pop("GRADIO_ALLOWED_PATHS", None):
        print("app.py: ignoring GRADIO_ALLOWED_PATHS: the demo serves only its uploads and outputs",
              file=sys.stderr)
    model_dir = args.model if args.model and os.path.isdir(args.model) else reference_model_path()
    launch = dict(server_name=args.host, server_port=args.port, share=args.share, css=CSS,
                  **launch_options(model_dir, args.pruning_dir, args.erasure_dir, args.lora_dir))
    return demo, launch


def main(argv=None) -> int:
    try:
        demo, launch = prepare(argv)
    except (CLIError, ValueError) as e:
        print(f"app.py: error: {e}", file=sys.stderr)
        return 2
    demo.launch(**launch)
    return 0
