"""The ``diffkit`` command: generate, and the subcommands the feature packages register.

Each feature package may provide ``<package>/cli.py`` with ``register(subparsers)``; it adds its
parser and sets ``func=run`` where ``run(args) -> int``. Every option that takes a value has a
validator of :mod:`diffkit.cli_validation` as its ``type``, so bad values are refused at parse time,
before any model loads. A parse error, a ``CLIError`` (or ``ValueError``) raised by a command, and an
unreadable safetensors file all become a one-line ``diffkit: error: ...`` message and exit status 2.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from diffkit import __version__
from diffkit.cli_validation import (
    DTYPES,
    Choice,
    CLIError,
    Device,
    DiffkitArgumentParser,
    Dtype,
    Float,
    Int,
    OutputDir,
    Seed,
    Steps,
    Text,
    UsageError,
    check_seed_range,
    check_steps_for,
    parse_device,
)

#: Feature packages that add subcommands (imported lazily; a missing one is simply absent).
SUBCOMMAND_MODULES = ("diffkit.evaluation.cli", "diffkit.erasure.cli", "diffkit.pruning.cli", "diffkit.bench_cli")



#: --guidance-scale's default per --guidance kind: CFG's w, APG's w (its dataclass default, the paper's
#: SD setting) and CFG++'s lambda (the paper's value for SD); then diffusers' guiders by name, the scale
#: setting each one's main scale argument (diffkit.guidance.diffusers_guiders.GUIDERS).
GUIDANCE_SCALE_DEFAULTS = {"cfg": 7.5, "apg": 15.0, "cfgpp": 0.6,
                           "pag": 3.0, "seg": 3.0, "skip-layer": 2.8, "cfg-zero-star": 7.5, "tcfg": 7.5,
                           "fdg": 10.0, "mambo": 10.0, "apg-mix": 10.0, "autoguidance": 7.5}
#: What --guidance-scale sets for each diffusers guider (shown in --help).
DIFFUSERS_GUIDANCE_HELP = {
    "pag": "PerturbedAttentionGuidance's perturbed_guidance_scale (CFG 7.5 too, PAG at every step)",
    "seg": "SmoothedEnergyGuidance's seg_guidance_scale",
    "skip-layer": "SkipLayerGuidance's skip_layer_guidance_scale",
    "cfg-zero-star": "ClassifierFreeZeroStarGuidance's guidance_scale",
    "tcfg": "TangentialClassifierFreeGuidance's guidance_scale",
    "fdg": "FrequencyDecoupledGuidance's high-frequency scale (low: half of it; needs kornia)",
    "mambo": "MagnitudeAwareGuidance's guidance_scale",
    "apg-mix": "AdaptiveProjectedMixGuidance's adaptive_projected_guidance_scale",
    "autoguidance": "AutoGuidance's guidance_scale (the weak model: the mid-block transformer skipped)",
}


def file_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this file is missing, unreadable or corrupt": OSError, ValueError,
    KeyError and safetensors' SafetensorError (a truncated or garbled ``.safetensors``)."""
    errors: tuple[type[BaseException], ...] = (OSError, ValueError, KeyError)
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency of diffusers
        return errors
    return (*errors, SafetensorError)


def first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return (text.strip().splitlines() or [type(e).__name__])[0]


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
    half_on_cpu = dtype == torch.float16 and str(device).split(":")[0] == "cpu"
    if half_on_cpu:
        _warn_once("--dtype float16 on cpu: PyTorch's CPU kernels are slow (some missing) in half precision; "
                   "float32 is the CPU's dtype")
    with _diffusers_warnings_silenced(half_on_cpu):
        if model.startswith("zoo:"):
            try:
                pipe = diffkit.to_diffkit(build_tiny_pipeline(model[4:]))
            except (KeyError, ValueError) as e:
                raise CLIError(f"could not build model {model!r}: {first_line(e)}") from None
            if dtype is not None and dtype != torch.float32:
                pipe = pipe.to(dtype=dtype)
        else:
            if not Path(model).exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
                raise CLIError(f"model path {model!r} does not exist")
            # An explicit dtype for every component: transformers 5 otherwise keeps each text encoder's
            # saved dtype while diffusers loads the rest in float32. (No second cast afterwards: it
            # would also cast the modules a model keeps in float32.)
            try:
                pipe = diffkit.DiffusionPipeline.from_pretrained(model, dtype=dtype or torch.float32)
            except file_errors() as e:
                raise CLIError(f"could not load model {model!r}: {first_line(e)}") from None
        return pipe.to(device)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """One ``diffkit: warning: ...`` line per message and process."""
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"diffkit: warning: {message}", file=sys.stderr)


@contextlib.contextmanager
def _diffusers_warnings_silenced(silence: bool = True):
    """diffusers' warnings off (errors still show), e.g. its float16-on-cpu notice, printed once per ``.to``."""
    if not silence:
        yield
        return
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(level)


@contextlib.contextmanager
def progress_bars_disabled(disable: bool = True):
    """With ``disable``: no progress bars of diffusers (pipeline loading), transformers (weight loading) or
    huggingface_hub (downloads); the previous state comes back afterwards."""
    if not disable:
        yield
        return
    restore = []
    with contextlib.suppress(ImportError):
        from diffusers.utils import logging as dlogging

        if dlogging.is_progress_bar_enabled():
            dlogging.disable_progress_bar()
            restore.append(dlogging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as tlogging

        if tlogging.is_progress_bar_enabled():
            tlogging.disable_progress_bar()
            restore.append(tlogging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            restore.append(enable_progress_bars)
    try:
        yield
    finally:
        for undo in restore:
            undo()


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise CLIError(f"cannot read prompts file {args.prompts_file!r}: not UTF-8 text "
                           f"(byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except OSError as e:
            raise CLIError(f"cannot read prompts file {args.prompts_file!r}: {e.strerror or e}") from None
        prompts += [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise CLIError(f"prompt {i + 1} is blank; every prompt needs some text")
    if not prompts:
        raise CLIError("no prompts: give PROMPT arguments or --prompts-file")
    return prompts


def resolve_guidance_scale(method: str, scale: float | None) -> float:
    """``--guidance-scale``, or the default of the ``--guidance`` kind; CFG++'s lambda must be in [0, 1]."""
    if scale is None:
        return GUIDANCE_SCALE_DEFAULTS[method]
    if method == "cfgpp" and not 0.0 <= scale <= 1.0:
        raise CLIError(f"--guidance-scale must be in [0, 1] with --guidance cfgpp (CFG++'s lambda), got {scale}")
    return scale


def build_guidance(method: str, scale: float):
    """The guidance object of ``--guidance`` (None: the pipeline's own CFG with ``guidance_scale``)."""
    if method == "cfg":
        return None
    if method in DIFFUSERS_GUIDANCE_HELP:
        from diffkit.guidance.diffusers_guiders import make_guider

        try:
            return make_guider(method, scale)
        except (ImportError, ValueError) as e:
            raise CLIError(f"--guidance {method}: {e}") from None
    from diffkit.guidance import APG, CFGPlusPlus

    try:
        return APG(scale) if method == "apg" else CFGPlusPlus(scale)
    except ValueError as e:
        raise CLIError(f"--guidance {method}: {e}") from None


def attach_features(pipe, args) -> dict:
    """Apply --deepcache, --pruning, --erasure, --lora to ``pipe``; returns what was attached (for the JSON lines)."""
    features = {}
    for key, path, verb, what in (("pruning", args.pruning, "load_pruning", "pruning spec"),
                                  ("erasure", args.erasure, "load_erasure", "erasure artifact"),
                                  ("lora", getattr(args, "lora", None), "load_lora_weights", "LoRA")):
        if path:
            try:
                getattr(pipe, verb)(path)
            except (*file_errors(), ImportError) as e:
                raise CLIError(f"cannot load {what} {path!r}: {first_line(e)}") from None
            features[key] = path
    if args.deepcache:
        try:
            pipe.enable_deepcache(interval=args.deepcache, branch=args.deepcache_branch)
        except ValueError as e:
            raise CLIError(f"--deepcache: {e}") from None
        features["deepcache"] = dict(interval=args.deepcache, branch=args.deepcache_branch)
    return features


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file in its folder and a rename: never half-written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_png_atomic(image, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_image_log(out: Path) -> dict[str, dict]:
    """The records of ``out/images.jsonl`` whose PNG is still there, by file name (unreadable lines dropped)."""
    records: dict[str, dict] = {}
    try:
        lines = (out / "images.jsonl").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        name = record.get("file") if isinstance(record, dict) else None
        if isinstance(name, str) and "/" not in name and (out / name).is_file():
            records[name] = record
    return records


def _write_image_log(out: Path, records: dict[str, dict]) -> None:
    _write_text_atomic(out / "images.jsonl", "".join(json.dumps(r) + "\n" for r in records.values()))


def cmd_generate(args) -> int:
    import torch
    from tqdm.auto import tqdm

    # Values were checked when parsed (diffkit.cli_validation); what depends on several of them, here,
    # still before the model loads.
    if args.deepcache_branch and not args.deepcache:
        raise CLIError("--deepcache-branch needs --deepcache N (DeepCache is off)")
    scale = resolve_guidance_scale(args.guidance, args.guidance_scale)
    guidance = build_guidance(args.guidance, scale)
    prompts = read_prompts(args)
    check_seed_range(args.seed, len(prompts))
    device = parse_device(args.device)
    dtype = parse_dtype(args.dtype)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out must be a folder, but {args.out!r} is a file")
    pipe = load_pipeline(args.model, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    check_steps_for(pipe, args.steps)
    features = attach_features(pipe, args)
    call = dict(guidance_scale=scale) if guidance is None else dict(guidance=guidance)
    names = [f"{i:05d}_seed{args.seed + i}.png" for i in range(len(prompts))]
    # images.jsonl describes the PNGs next to it: records of files this run overwrites, or that are gone,
    # are dropped before the first image is replaced; each new image's record is added once it is written.
    records = read_image_log(out) if out.is_dir() else {}
    stale = [n for n in names if n in records]
    for name in stale:
        del records[name]
    if stale or (out / "images.jsonl").exists():
        _write_image_log(out, records)
    log_path = out / "images.jsonl"
    for i, prompt in enumerate(tqdm(prompts, desc="generate", unit="img", disable=args.quiet)):
        seed = args.seed + i
        gen = torch.Generator(device="cpu").manual_seed(seed)
        t0 = time.perf_counter()
        try:
            image = pipe(prompt, num_inference_steps=args.steps, generator=gen, **call).images[0]
        except ValueError as e:  # e.g. CFG++ with a scheduler it has no step rule for
            raise CLIError(str(e)) from None
        elapsed = time.perf_counter() - t0
        name = names[i]
        try:
            out.mkdir(parents=True, exist_ok=True)
            _save_png_atomic(image, out / name)
        except OSError as e:
            raise CLIError(f"cannot write {str(out / name)!r}: {e.strerror or e}") from None
        records.pop(name, None)
        records[name] = dict(file=name, prompt=prompt, seed=seed, steps=args.steps, guidance=args.guidance,
                             guidance_scale=scale, **features, model=args.model or default_model(),
                             device=device, dtype=str(dtype).replace("torch.", ""), seconds=round(elapsed, 4))
        _write_image_log(out, records)
    if not args.quiet:
        print(f"wrote {len(prompts)} image(s) and {log_path}")
    return 0


def build_parser() -> DiffkitArgumentParser:
    parser = DiffkitArgumentParser(
        prog="diffkit",
        description="diffkit: faster, better-guided and safer diffusers pipelines "
        "(DeepCache, pruning, APG / CFG++, concept erasure).",
    )
    parser.add_argument("--version", action="version", version=f"diffkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    g = sub.add_parser("generate", help="generate images to PNG files with a JSON line each",
                       description="Generate one image per prompt; writes PNGs and images.jsonl to --out.")
    g.add_argument("prompt", nargs="*", type=Text(), help="prompt(s); one image each")
    g.add_argument("--model", default=None, type=Text(),
                   help="pipeline folder, hub id, or zoo:sd15|sd2|sdxl (default: the shipped reference model)")
    g.add_argument("--prompts-file", default=None, type=Text(),
                   help="UTF-8 text file, one prompt per line (# comments skipped)")
    g.add_argument("--seed", type=Seed(), default=0,
                   help="seed of the first image; image i uses seed+i, all in [0, 2**63) (default 0)")
    g.add_argument("--steps", type=Steps(), default=25, help="denoising steps, 1 to 1000 (default 25)")
    g.add_argument("--guidance-scale", type=Float(0), default=None,
                   help="guidance scale: CFG's and APG's w, CFG++'s lambda in [0, 1], a diffusers guider's main "
                   "scale (see --guidance) (default: "
                   + ", ".join(f"{v:g} for {k}" for k, v in GUIDANCE_SCALE_DEFAULTS.items()) + ")")
    g.add_argument("--guidance", type=Choice(tuple(GUIDANCE_SCALE_DEFAULTS)), default="cfg",
                   help="cfg (default), apg (eta 0, r 15, momentum -0.5), cfgpp (CFG++: DDIM, Euler, Euler a, "
                   "DPM++ 2M), or a diffusers guider, where --guidance-scale sets: "
                   + "; ".join(f"{k}: {v}" for k, v in DIFFUSERS_GUIDANCE_HELP.items()))
    g.add_argument("--deepcache", type=Int(0, note="0: off"), default=0, metavar="N",
                   help="DeepCache: a full U-Net step every N steps (0: off, the default)")
    g.add_argument("--deepcache-branch", type=Int(0), default=0, help="DeepCache's cache branch (default 0)")
    g.add_argument("--pruning", default=None, type=Text(), metavar="DIR",
                   help="load a pruning spec folder (diffkit prune)")
    g.add_argument("--erasure", default=None, type=Text(), metavar="PATH",
                   help="load an erasure artifact (diffkit erase)")
    g.add_argument("--lora", default=None, type=Text(), metavar="DIR",
                   help="load a LoRA (a folder with diffusers' pytorch_lora_weights.safetensors, or a hub id) with "
                        "pipe.load_lora_weights, unfused, above the erasure; needs peft")
    g.add_argument("--out", default="outputs", type=OutputDir(),
                   help="output folder (default ./outputs); images.jsonl there describes its PNGs")
    g.add_argument("--device", default="cpu", type=Device(), help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--dtype", default="float32", type=Dtype(), help="float32, float16 or bfloat16 (default float32)")
    g.add_argument("--quiet", action="store_true", help="no progress bars (also none of model loading) or summary")
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
    try:
        args = parser.parse_args(argv)
    except (UsageError, CLIError) as e:
        print(f"diffkit: error: {e}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        with progress_bars_disabled(bool(getattr(args, "quiet", False))):
            return int(args.func(args) or 0)
    except (CLIError, ValueError) as e:
        print(f"diffkit: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
