"""``diffkit erase``, ``diffkit erase-batch`` (also under ``accelerate launch -m diffkit.cli``), ``diffkit export``."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffkit.cli_validation import Dtype, Float, Int, OutputDir, Seed, Text

#: CLI flag (dest) -> ErasureConfig field, for flags that override the job file.
_FIELD_FLAGS = {
    "method": "method", "concept": "concept", "anchor": "anchor", "retain": "retain_prompts",
    "parameters": "parameters", "steps": "steps", "lr": "lr", "batch_size": "batch_size", "seed": "seed",
    "eta": "eta", "beta": "beta", "saliency_fraction": "saliency_fraction", "sample_steps": "sample_steps",
    "num_images": "num_images", "resolution": "resolution", "checkpoint_every": "checkpoint_every",
    "mixed_precision": "mixed_precision", "gradient_checkpointing": "gradient_checkpointing",
    "preserve_gradient": "preserve_gradient", "lora_rank": "lora_rank", "lora_alpha": "lora_alpha",
}


def register(subparsers) -> None:
    e = subparsers.add_parser(
        "erase", help="erase a concept (ESD, SalUn, AdvUnlearn or DoCo) and write an erasure artifact",
        description="Fine-tune away a concept and write an artifact (changed tensors + JSON sidecar) to --out. "
                    "Flags override the --config job file. Re-running resumes from the last checkpoint.")
    e.add_argument("--model", default=None, type=Text(),
                   help="pipeline folder, hub id or zoo:sd15 (default: reference model)")
    e.add_argument("--method", default=None, type=Text(), help="esd, salun, advunlearn or doco (default esd)")
    e.add_argument("--concept", action="append", default=None, type=Text(),
                   help="concept prompt/word to erase (repeatable)")
    e.add_argument("--anchor", default=None, type=Text(blank_ok=True),
                   help='what the concept maps to (default: the method\'s; "" (ESD\'s equation) for esd, advunlearn '
                        'and doco, the first retain prompt (a concrete substitute) for salun)')
    e.add_argument("--retain", action="append", default=None, type=Text(),
                   help="retain prompt (repeatable; SalUn needs some)")
    e.add_argument("--config", default=None, type=Text(), help="YAML job file with ErasureConfig fields")
    e.add_argument("--out", required=True, type=OutputDir(),
                   help="artifact folder (also holds the checkpoint while training)")
    e.add_argument("--parameters", default=None, type=Text(),
                   help="preset: esd-x, esd-x-strict, esd-u, esd-all, unet-all, text-encoder (regex lists: in the "
                        "job file)")
    e.add_argument("--steps", type=Int(1), default=None, help="optimisation steps (default 200)")
    e.add_argument("--lr", type=Float(0, low_open=True), default=None, help="Adam learning rate (default 1e-5)")
    e.add_argument("--batch-size", type=Int(1), default=None, help="global batch (default: esd 1, salun 8)")
    e.add_argument("--seed", type=Seed(), default=None, help="seed in [0, 2**63) (default 0)")
    e.add_argument("--eta", type=Float(0, low_open=True), default=None, help="ESD negative guidance (default 1)")
    e.add_argument("--beta", type=Float(0), default=None, help="SalUn retain-loss weight (default 0.5)")
    e.add_argument("--saliency-fraction", type=Float(0, 1, low_open=True), default=None,
                   help="SalUn salient share, in (0, 1] (default 0.5)")
    e.add_argument("--sample-steps", type=Int(1, 1000), default=None,
                   help="DDIM steps of the original model's sampling, 1 to 1000")
    e.add_argument("--num-images", type=Int(1), default=None, help="SalUn forget/retain images (default 8)")
    e.add_argument("--resolution", type=Int(8, multiple=8), default=None,
                   help="image side in pixels, a multiple of 8 (default: native)")
    e.add_argument("--checkpoint-every", type=Int(1), default=None, help="steps between checkpoints (default 50)")
    e.add_argument("--mixed-precision", default=None, type=Text(), help="no, fp16 or bf16 (default no)")
    e.add_argument("--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory")
    e.add_argument("--preserve-gradient", action=argparse.BooleanOptionalAction, default=None,
                   help="concept-preserving gradient surgery against retain prompts (default: on for doco only)")
    e.add_argument("--lora-rank", type=Int(1), default=None,
                   help="train a LoRA of this rank on the selected layers instead of the layers themselves; the "
                        "artifact is a diffusers LoRA file (pipe.load_lora_weights)")
    e.add_argument("--lora-alpha", type=Float(0, low_open=True), default=None,
                   help="LoRA alpha (the update is scaled by alpha / rank; default: the rank)")
    e.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading)")
    e.set_defaults(func=run)

    b = subparsers.add_parser(
        "erase-batch", help="run many erasure jobs (concepts x methods) from a YAML file",
        description="Run every job of a batch file; one artifact folder per job under --out. Finished jobs are "
                    "skipped, interrupted ones resume, failing ones are reported; a summary table ends the run.")
    b.add_argument("jobs", type=Text(), help="batch YAML file")
    b.add_argument("--out", required=True, type=OutputDir(), help="folder for the artifacts")
    b.add_argument("--model", default=None, type=Text(), help="overrides the batch file's model")
    b.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading)")
    b.set_defaults(func=run_batch_command)
    register_export(subparsers)


def build_config(args):
    from .config import ErasureConfig, read_yaml

    data = read_yaml(args.config) if args.config else {}
    overrides = {field: getattr(args, flag) for flag, field in _FIELD_FLAGS.items()}
    if args.lora_rank is not None or args.lora_alpha is not None:
        overrides["parametrization"] = "lora"
    return ErasureConfig.from_dict(data, **overrides)


def _load(model: str | None):
    from diffkit.cli import load_pipeline

    pipe = load_pipeline(model, "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(args) -> int:
    from .engine import erase, make_accelerator

    config = build_config(args)
    acc = make_accelerator(config.mixed_precision)
    pipe = _load(args.model)
    result = erase(pipe, config, Path(args.out), accelerator=acc, progress=not args.quiet)
    if acc.is_main_process:
        m = result.sidecar.get("metrics", {})
        note = f", resumed at step {result.resumed_from}" if result.resumed_from else ""
        print(f"{result.status}: {config.method} erasing {list(config.concept)} -> {result.path} "
              f"({m.get('steps')} steps, final loss {m.get('final_loss', float('nan')):.4g}{note})")
    return 0


def run_batch_command(args) -> int:
    from .batch import read_batch, run_batch, summary_table
    from .engine import make_accelerator

    model, jobs = read_batch(args.jobs)
    acc = make_accelerator(jobs[0].config.mixed_precision)
    pipe = _load(args.model or model)
    outcomes = run_batch(pipe, jobs, Path(args.out), accelerator=acc, progress=not args.quiet)
    if acc.is_main_process:
        print(summary_table(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def register_export(subparsers) -> None:
    x = subparsers.add_parser(
        "export", help="write a full-rank erasure artifact's patched unet/ and/or text_encoder/ in diffusers format",
        description="Load ARTIFACT onto the base model (its fingerprint is checked first) and write the components "
                    "it patches with save_pretrained to --out, loadable by UNet2DConditionModel.from_pretrained / "
                    "CLIPTextModel.from_pretrained without diffkit. The folder appears whole or not at all. Pruning "
                    "specs stay diffkit-only: their slimmed widths do not fit a diffusers config.")
    x.add_argument("artifact", type=Text(), help="erasure artifact folder (diffkit erase)")
    x.add_argument("--out", required=True, type=OutputDir(), help="new (or empty) folder to write")
    x.add_argument("--model", default=None, type=Text(),
                   help="the artifact's base model: pipeline folder, hub id or zoo:sd15 (default: reference model)")
    x.add_argument("--dtype", default="float32", type=Dtype(),
                   help="dtype the components are loaded and written in (default float32)")
    x.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading) or summary")
    x.set_defaults(func=run_export)


def run_export(args) -> int:
    from diffkit.cli import load_pipeline, parse_dtype

    from .export import check_exportable, export_erasure

    check_exportable(args.artifact, args.out)  # before the model loads: pruning specs, unreadable artifacts, --out
    pipe = load_pipeline(args.model, "cpu", parse_dtype(args.dtype))
    out = export_erasure(pipe, args.artifact, args.out)
    if not args.quiet:
        print(f"exported {', '.join(sorted(p.name for p in out.iterdir() if p.is_dir()))} of {args.artifact} -> {out}")
    return 0
