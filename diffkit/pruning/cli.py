"""``diffkit prune``: learn EcoDiff masks on prompts, binarize, slice, write a pruning spec directory.

    diffkit prune --model M --prompts-file F --steps 50 --keep-heads 0.7 --keep-ffn 0.9 --out DIR
    diffkit prune --model M --prompts-file F --target-reduction 0.2 --out DIR
    diffkit prune --model M --logits DIR/logits.safetensors --target-reduction 0.3 --out DIR2  (no learning)

Running again with the same ``--out`` resumes mask learning from ``DIR/checkpoint``.
Multi-GPU: ``accelerate launch -m diffkit.cli prune ...`` (data-parallel over prompts).
"""

from __future__ import annotations

from pathlib import Path

from diffkit.cli_validation import Choice, Device, Float, Int, OutputDir, Seed, Steps, Text

SCHEDULERS = ("keep", "ddim", "euler")
PENALTIES = ("l1", "l0")  # diffkit.pruning.learn.PENALTIES (not imported here: the parser stays light)
MIXED_PRECISION = ("no", "fp16", "bf16")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prune",
        help="learn structural pruning masks (EcoDiff) and write a pruning spec",
        description="Learn hard-concrete masks over attention heads, FFN neurons and resnet channels on the "
        "final latents of the sampling trajectory, binarize them, slice the U-Net and write --out "
        "(spec.json + pruned.safetensors). Load with pipe.load_pruning(DIR).",
    )
    p.add_argument("prompt", nargs="*", type=Text(), help="calibration prompt(s)")
    p.add_argument("--model", default=None, type=Text(),
                   help="pipeline folder, hub id or zoo:sd15|sd2|sdxl (default: reference)")
    p.add_argument("--prompts-file", default=None, type=Text(),
                   help="UTF-8 text file, one prompt per line (# comments skipped)")
    p.add_argument("--out", required=True, type=OutputDir(),
                   help="output spec directory (also holds the learning checkpoint)")
    p.add_argument("--steps", type=Steps(), default=50,
                   help="denoising steps of the trajectory, 1 to 1000 (default 50)")
    p.add_argument("--epochs", type=Int(1), default=4, help="passes over the prompts (default 4)")
    p.add_argument("--batch-size", type=Int(1), default=1, help="prompts per process per optimizer step (default 1)")
    p.add_argument("--lr", type=Float(0, low_open=True), default=0.1,
                   help="AdamW learning rate of the logits (default 0.1)")
    p.add_argument("--beta", type=Float(0), default=0.5, help="sparsity penalty weight (default 0.5)")
    p.add_argument("--penalty", default="l1", type=Choice(PENALTIES),
                   help="l1 (mean |logit|, EcoDiff) or l0 (expected L0)")
    p.add_argument("--guidance-scale", type=Float(0), default=7.5, help="CFG scale inside the trajectory (default 7.5)")
    p.add_argument("--kinds", default="heads,ffn,channels", type=Text(),
                   help="unit kinds to learn (default heads,ffn,channels)")
    p.add_argument("--keep-heads", type=Float(0, 1), default=None, help="fraction of attention heads kept")
    p.add_argument("--keep-ffn", type=Float(0, 1), default=None, help="fraction of FFN neurons kept")
    p.add_argument("--keep-channels", type=Float(0, 1), default=None, help="fraction of resnet channel groups kept")
    p.add_argument("--target-reduction", type=Float(0, 1, high_open=True), default=None,
                   help="fraction of U-Net parameters to remove, in [0, 1)")
    p.add_argument("--multiple", type=Int(1), default=8, help="kept widths rounded to a multiple of this (default 8)")
    p.add_argument("--logits", default=None, type=Text(),
                   help="binarize these learned logits (safetensors) instead of learning")
    p.add_argument("--scheduler", default="keep", type=Choice(SCHEDULERS),
                   help="keep (the model's), ddim or euler (default keep)")
    p.add_argument("--height", type=Int(8, multiple=8), default=None,
                   help="image height in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--width", type=Int(8, multiple=8), default=None,
                   help="image width in pixels, a multiple of 8 (default: the model's)")
    p.add_argument("--seed", type=Seed(), default=0, help="seed of noise and masks, in [0, 2**63) (default 0)")
    p.add_argument("--mixed-precision", default="no", type=Choice(MIXED_PRECISION),
                   help="no, fp16 or bf16 (accelerate autocast)")
    p.add_argument("--checkpoint-every", type=Int(1), default=10, help="optimizer steps between checkpoints")
    p.add_argument("--device", default="cpu", type=Device(),
                   help="cpu, cuda, cuda:N or mps (single process; default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading) or summary")
    p.set_defaults(func=run)


def _keep_or_target(args):
    from diffkit.cli import CLIError

    from .binarize import KeepRatios

    ratios = {"heads": args.keep_heads, "ffn": args.keep_ffn, "channels": args.keep_channels}
    given = {k: v for k, v in ratios.items() if v is not None}
    if given and args.target_reduction is not None:
        raise CLIError("give either --keep-heads/--keep-ffn/--keep-channels or --target-reduction, not both")
    if not given and args.target_reduction is None:
        raise CLIError("say how much to prune: --keep-heads/--keep-ffn/--keep-channels or --target-reduction")
    for k, v in given.items():
        if not 0.0 <= v <= 1.0:
            raise CLIError(f"--keep-{k} must be in [0, 1], got {v}")
    if args.target_reduction is not None and not 0.0 <= args.target_reduction < 1.0:
        raise CLIError(f"--target-reduction must be in [0, 1), got {args.target_reduction}")
    return (KeepRatios(**given) if given else None), args.target_reduction


def _read_logits(path: str) -> dict:
    """The tensors of a ``--logits`` file; a truncated or corrupt file is a one-line error."""
    from safetensors.torch import load_file

    from diffkit.cli import CLIError, file_errors, first_line

    try:
        return load_file(path)
    except file_errors() as e:
        raise CLIError(f"cannot read --logits {path!r}: {first_line(e)}") from None


def run(args) -> int:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler

    from diffkit.cli import CLIError, load_pipeline, parse_device, read_prompts
    from diffkit.cli_validation import check_steps_for

    from .binarize import binarize
    from .learn import MaskLearningConfig, learn_masks
    from .slim import save_pruning
    from .spec import atomic_save_safetensors
    from .units import KINDS, find_units

    keep, target = _keep_or_target(args)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise CLIError(f"--kinds must be a comma list of {', '.join(KINDS)}, got {args.kinds!r}")
    if keep is not None:
        extra = [k for k in KINDS if getattr(keep, k) < 1.0 and k not in kinds]
        if extra:
            raise CLIError(f"--keep-{extra[0]} given but {extra[0]} is not in --kinds {args.kinds!r}")
    if args.scheduler not in SCHEDULERS:
        raise CLIError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {args.scheduler!r}")
    for flag, value in (("--steps", args.steps), ("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--checkpoint-every", args.checkpoint_every)):
        if value < 1:
            raise CLIError(f"{flag} must be a positive integer, got {value}")
    if args.multiple < 1:
        raise CLIError(f"--multiple must be >= 1, got {args.multiple}")
    if args.logits is not None and not Path(args.logits).is_file():
        raise CLIError(f"--logits file {args.logits!r} does not exist")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out must be a folder, but {args.out!r} is a file")
    prompts = read_prompts(args) if args.logits is None else []
    logits = _read_logits(args.logits) if args.logits is not None else None
    config = MaskLearningConfig(
        kinds=kinds, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, beta=args.beta, penalty=args.penalty, seed=args.seed,
        height=args.height, width=args.width, mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every,
    )  # validates every value (ValueError -> "diffkit: error: ...")
    pipe = load_pipeline(args.model, parse_device(args.device))
    pipe.set_progress_bar_config(disable=True)
    check_steps_for(pipe, args.steps)
    if args.scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif args.scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    units = find_units(pipe.unet, kinds)
    if logits is not None:
        missing = [u.name for u in units if u.name not in logits]
        if missing:
            raise CLIError(f"--logits {args.logits!r} has no logits for module {missing[0]} of this U-Net")
    else:
        result = learn_masks(pipe, prompts, config, checkpoint_dir=out / "checkpoint", progress=not args.quiet)
        logits = result.logits
        from accelerate import PartialState

        if not PartialState().is_main_process:  # under `accelerate launch`, one process writes the spec
            return 0
        out.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(out / "logits.safetensors", logits)
    pipe.to("cpu")
    kept = binarize(logits, units, keep, target_reduction=target, unet=pipe.unet, multiple=args.multiple)
    spec = save_pruning(out, pipe.unet, kept, config={
        "method": "ecodiff", "learning": config.to_json(), "model": args.model,
        "keep": keep.as_dict() if keep else None, "target_reduction": target, "multiple": args.multiple,
        "logits": args.logits,
    })
    if not args.quiet:
        s = spec.stats
        print(f"U-Net parameters {s['params_before']:,} -> {s['params_after']:,} (-{100 * s['param_reduction']:.1f}%), "
              f"MACs {s['macs_before']:,} -> {s['macs_after']:,} (-{100 * s['mac_reduction']:.1f}%)")
        print("kept fraction: " + ", ".join(f"{k} {v:.3f}" for k, v in s["kept_fraction"].items()))
        print(f"wrote {out} (load with pipe.load_pruning({str(out)!r}))")
    return 0
