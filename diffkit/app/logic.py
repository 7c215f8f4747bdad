"""What one demo request does, as plain functions of a :class:`DemoModel` and validated settings.

The Gradio layer (:mod:`diffkit.app.ui`) only wires widgets to these functions, so everything here is
unit-tested without a browser.

Concurrency: the pipeline is shared by every user of the page, and several features work by changing it
for the duration of a call (the scheduler, DeepCache's hooks, an erasure's patched tensors). Each request
therefore configures, runs and restores the pipeline while holding the model's lock; per-request values
live only in the function's locals and its return value, so two users get their own results. Whatever
fails inside a request (a corrupt artifact included), the ``finally`` blocks restore the pipeline and the
``with`` releases the lock, so the next request finds the model as it was.

Long jobs never hold that lock for their duration: pruning rebuilds the U-Net physically and cannot be
undone, so a pruned pipeline is a separate copy (cached) whose spec is loaded outside the lock; an erasure
job trains on a private copy of the trainable components (:meth:`DemoModel.private_copy`), taken under the
lock in milliseconds, so other users' generations run while it trains.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .settings import (
    DEMO_ERASE_LR,
    DIFFUSERS_GUIDER,
    SCHEDULERS,
    EditSettings,
    EraseSettings,
    GenerateSettings,
    GuidanceSettings,
    InputError,
)


class FeatureUnavailable(InputError):
    """A diffkit feature the request needs is not part of this installation (yet)."""


def unavailable(feature: str, detail: str) -> FeatureUnavailable:
    return FeatureUnavailable(f"{feature} is not available in this diffkit installation ({detail}).")


def optional_attr(module: str, name: str, feature: str):
    """``module.name``, or :class:`FeatureUnavailable` naming ``feature`` when it does not exist."""
    try:
        value = getattr(importlib.import_module(module), name, None)
    except ImportError:
        value = None
    if value is None:
        raise unavailable(feature, f"{module}.{name} is missing")
    return value


def pipeline_method(pipe, name: str, feature: str):
    method = getattr(pipe, name, None)
    if not callable(method):
        raise unavailable(feature, f"the pipeline has no {name}()")
    return method


def feature_report(pipe) -> dict[str, str | None]:
    """Feature -> None when available, else the reason it is not (shown in the page's banner)."""
    checks = {
        "APG": lambda: optional_attr("diffkit.guidance", "APG", "APG guidance"),
        "CFG++": lambda: optional_attr("diffkit.guidance", "CFGPlusPlus", "CFG++ guidance"),
        "Diffusers guiders": lambda: optional_attr("diffkit.guidance.diffusers_guiders", "make_guider",
                                                   "Diffusers guiders"),
        "DeepCache": lambda: pipeline_method(pipe, "enable_deepcache", "DeepCache"),
        "Pruning": lambda: pipeline_method(pipe, "load_pruning", "Pruning"),
        "Erasure artifacts": lambda: pipeline_method(pipe, "load_erasure", "Erasure"),
        "LoRA": lambda: lora_backend(pipe),
        "Inversion (Edit tab)": lambda: pipeline_method(pipe, "invert", "Inversion"),
        "Erasure training (Erase tab)": lambda: erasure_trainer(),
    }
    report = {}
    for name, check in checks.items():
        try:
            check()
            report[name] = None
        except FeatureUnavailable as e:
            report[name] = str(e)
    return report


# ---------------------------------------------------------------------------------------------------
# Numbers shown in the page
# ---------------------------------------------------------------------------------------------------


def speedup(baseline_seconds: float, configured_seconds: float) -> float:
    """How many times faster the configured pipeline ran: ``baseline / configured``."""
    if not (baseline_seconds > 0 and configured_seconds > 0):
        raise ValueError(f"wall times must be positive, got {baseline_seconds!r} and {configured_seconds!r}")
    return baseline_seconds / configured_seconds


def psnr_db(image_a, image_b) -> float:
    """PSNR in dB between two images of the same size, with diffkit's evaluation metric (peak 1 after /255)."""
    from diffkit.evaluation.psnr import mean_psnr

    return mean_psnr([image_a.convert("RGB")], [image_b.convert("RGB")])


def format_psnr(value: float) -> str:
    return "identical (inf dB)" if math.isinf(value) else f"{value:.2f} dB"


# ---------------------------------------------------------------------------------------------------
# The shared model
# ---------------------------------------------------------------------------------------------------


class DemoModel:
    """The loaded pipeline, the lock every request holds while using it, and its pruned copies."""

    def __init__(self, pipe, name: str, note: str = "", max_pruned: int = 1):
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.name = name
        self.note = note
        self.lock = threading.RLock()
        #: One training job (Erase tab) at a time: it holds a private copy of the trainable components.
        self.job_lock = threading.Lock()
        self.scheduler_config = dict(pipe.scheduler.config)
        self.max_pruned = max_pruned
        self._pruned: OrderedDict[str, object] = OrderedDict()

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * int(self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def _pipeline_with(self, replaced: dict):
        """A new pipeline object of the same class over the base pipeline's components, ``replaced`` swapped in."""
        components = {**self.pipe.components, **replaced}
        if "requires_safety_checker" in inspect.signature(type(self.pipe).__init__).parameters:
            # Keep the loaded pipeline's choice (else diffusers warns about a None safety checker again).
            components["requires_safety_checker"] = bool(self.pipe.config.get("requires_safety_checker", False))
        copy_ = type(self.pipe)(**components)
        copy_.set_progress_bar_config(disable=True)
        return copy_

    def private_copy(self):
        """A pipeline whose trainable components (U-Net, text encoders) and scheduler are copies of the base
        model's, for a job that changes them for a long time (erasure training); VAE and tokenizers are shared
        (read-only). Takes the lock only for the copy, so no request's temporary changes are copied."""
        with self.lock:
            replaced = {name: copy.deepcopy(module) for name, module in self.pipe.components.items()
                        if name in ("unet", "text_encoder", "text_encoder_2") and module is not None}
            replaced["scheduler"] = type(self.pipe.scheduler).from_config(self.scheduler_config)
        return self._pipeline_with(replaced)

    def pipeline_for(self, pruning: str | None):
        """The base pipeline, or a copy whose U-Net carries the pruning spec ``pruning`` (cached).

        The U-Net is copied under the lock; the spec is loaded outside it, so other requests keep running.
        """
        if pruning is None:
            return self.pipe
        with self.lock:
            if pruning in self._pruned:
                self._pruned.move_to_end(pruning)
                return self._pruned[pruning]
            pipeline_method(self.pipe, "load_pruning", "Pruning")
            unet = copy.deepcopy(self.pipe.unet)
        pruned = self._pipeline_with({"unet": unet})
        try:
            pruned.load_pruning(pruning)
        except Exception as e:  # noqa: BLE001 - any failure of a spec is the spec's; the copy is dropped
            raise InputError(f"The pruning spec {pruning!r} could not be loaded: {first_line(e)}") from None
        with self.lock:
            self._pruned[pruning] = pruned
            while len(self._pruned) > self.max_pruned:
                self._pruned.popitem(last=False)
        return pruned

    def warm_up(self) -> None:
        """One short call, so that the first measured request does not pay one-time initialisation."""
        with self.lock:
            self.pipe("warm up", num_inference_steps=1, generator=torch.Generator().manual_seed(0))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def make_scheduler(label: str, base_config: dict):
    """A new scheduler of the page's kind ``label`` built from the model's own scheduler config."""
    import diffusers

    class_name, overrides = SCHEDULERS[label]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


def make_guidance(g: GuidanceSettings):
    """The guidance object of the chosen method; bad values -> InputError with the library's own message."""
    from diffkit.guidance import CFG

    try:
        if g.method == "APG":
            apg = optional_attr("diffkit.guidance", "APG", "APG guidance")
            return apg(scale=g.apg_scale, eta=g.apg_eta, norm_threshold=g.apg_norm_threshold, momentum=g.apg_momentum)
        if g.method == "CFG++":
            return optional_attr("diffkit.guidance", "CFGPlusPlus", "CFG++ guidance")(scale=g.cfgpp_scale)
        if g.method == DIFFUSERS_GUIDER:
            make_guider = optional_attr("diffkit.guidance.diffusers_guiders", "make_guider", "Diffusers guiders")
            return make_guider(g.guider, g.guider_scale)
        return CFG(g.cfg_scale)
    except FeatureUnavailable:
        raise
    except ImportError as e:  # a guider's own dependency (FDG: kornia); the message names the pip extra
        raise unavailable(f"The {g.guider} guider", first_line(e)) from None
    except ValueError as e:
        raise InputError(f"{g.method}: {first_line(e)}") from None


def check_scheduler_supports(guidance_method: str, scheduler) -> None:
    """CFG++ needs a step rule for the scheduler; surface the registry's message (it lists the supported ones)."""
    if guidance_method != "CFG++":
        return
    step_rule_for = optional_attr("diffkit.guidance.steps", "step_rule_for", "CFG++ guidance")
    label = next((k for k, (cls, _) in SCHEDULERS.items() if cls == type(scheduler).__name__), type(scheduler).__name__)
    try:
        step_rule_for(scheduler, "CFG++")
    except ValueError as e:
        raise InputError(f"CFG++ cannot run with the {label} scheduler. {first_line(e)}") from None


@contextlib.contextmanager
def configured(model: DemoModel, pipe, settings: GenerateSettings):
    """Apply the request's scheduler, erasure artifact, LoRA and DeepCache to ``pipe``; undo all of it on exit.

    The LoRA goes on above the erasure (the order of diffkit.lifecycle: weights, then adapters) and is loaded
    unfused, so unloading it is exact.

    Call with ``model.lock`` held: these are changes to a shared object.
    """
    with contextlib.ExitStack() as undo:
        previous = pipe.scheduler
        undo.callback(setattr, pipe, "scheduler", previous)
        pipe.scheduler = make_scheduler(settings.scheduler, model.scheduler_config)
        check_scheduler_supports(settings.guidance.method, pipe.scheduler)
        if settings.erasure:
            before = len(getattr(pipe, "loaded_erasures", []))
            load_erasure_safely(pipe, settings.erasure)
            undo.callback(_unload_erasures, pipe, before)
        if settings.lora:
            load_lora_safely(pipe, settings.lora)
            undo.callback(pipe.unload_lora_weights)
        if settings.deepcache.enabled:
            enable = pipeline_method(pipe, "enable_deepcache", "DeepCache")
            d = settings.deepcache
            try:
                enable(interval=d.interval, branch=d.branch, schedule=d.schedule)
            except ValueError as e:
                raise InputError(f"DeepCache: {first_line(e)}") from None
            undo.callback(pipe.disable_deepcache)
        yield pipe


def _unload_erasures(pipe, keep: int) -> None:
    # unload_erasure() removes every loaded erasure; the demo never keeps one across requests (keep == 0).
    if len(getattr(pipe, "loaded_erasures", [])) > keep:
        pipe.unload_erasure()


def load_erasure_safely(pipe, path: str) -> None:
    """``pipe.load_erasure(path)``, with any failure as an InputError saying what was wrong.

    The library's load is all-or-nothing (diffkit.lifecycle): on a failure nothing was changed, so the
    shared pipeline keeps serving everyone exactly as before.
    """
    load = pipeline_method(pipe, "load_erasure", "Erasure")
    try:
        load(path)
    except Exception as e:  # noqa: BLE001 - unreadable, corrupt or made for another model
        raise InputError(f"The erasure artifact {path!r} could not be loaded: {first_line(e)}") from None


#: The adapter name the demo loads a request's LoRA under.
DEMO_ADAPTER = "demo"


def lora_backend(pipe):
    """``pipe.load_lora_weights``, or FeatureUnavailable when the pipeline or peft lacks it."""
    load = pipeline_method(pipe, "load_lora_weights", "LoRA")
    try:
        from diffkit.lora import require_peft
    except ImportError:
        raise unavailable("LoRA", "diffkit.lora is missing") from None
    try:
        require_peft()
    except ImportError as e:
        raise unavailable("LoRA", first_line(e)) from None
    return load


def load_lora_safely(pipe, path: str) -> None:
    """``pipe.load_lora_weights(path)`` (unfused), with any failure as an InputError saying what was wrong.

    diffkit checks a LoRA against the pipeline before loading (all-or-nothing), so on a failure the shared
    pipeline is exactly as before."""
    load = lora_backend(pipe)
    try:
        load(path, adapter_name=DEMO_ADAPTER)
    except Exception as e:  # noqa: BLE001 - unreadable, for another base model, refused with pruning
        raise InputError(f"The LoRA {path!r} could not be loaded: {first_line(e)}") from None


# ---------------------------------------------------------------------------------------------------
# Generate tab
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generation:
    image: object  # PIL.Image
    seconds: float
    settings: GenerateSettings


@dataclass(frozen=True)
class Comparison:
    baseline: Generation
    configured: Generation
    speedup: float
    psnr: float


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate(model: DemoModel, settings: GenerateSettings) -> Generation:
    """One image for ``settings`` (seeded on the CPU, so every device draws the same noise) and its wall time."""
    make_guidance(settings.guidance)  # refuse bad guidance values before building anything
    pipe = model.pipeline_for(settings.pruning)  # builds a pruned copy outside the lock
    with model.lock:
        return render(model, pipe, settings)


def render(model: DemoModel, pipe, settings: GenerateSettings) -> Generation:
    """:func:`generate` on ``pipe``: hold ``model.lock`` when ``pipe`` is shared; a private copy needs none."""
    guidance = make_guidance(settings.guidance)
    with configured(model, pipe, settings):
        generator = torch.Generator().manual_seed(settings.seed)
        _sync(model.device)
        start = time.perf_counter()
        try:
            out = pipe(settings.prompt, negative_prompt=settings.negative_prompt or None,
                       num_inference_steps=settings.steps, guidance=guidance, generator=generator)
        except ValueError as e:  # the library's messages for settings that do not fit together
            raise InputError(f"These settings cannot run together: {first_line(e)}") from None
        _sync(model.device)
        seconds = time.perf_counter() - start
    return Generation(out.images[0], seconds, settings)


def compare(model: DemoModel, settings: GenerateSettings, repeats: int = 1) -> Comparison:
    """The baseline (plain CFG, no cache, no pruning, no erasure, no LoRA) and the configured pipeline, same seed.

    With ``repeats`` > 1 the two are run alternately that many times and each keeps its fastest wall time
    (the runs are deterministic, so the images do not change); alternating spreads machine noise over both.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    baseline_settings = settings.baseline()
    runs = [(generate(model, baseline_settings), generate(model, settings)) for _ in range(repeats)]
    baseline = min((b for b, _ in runs), key=lambda g: g.seconds)
    result = min((c for _, c in runs), key=lambda g: g.seconds)
    return Comparison(baseline, result, speedup(baseline.seconds, result.seconds),
                      psnr_db(baseline.image, result.image))


def format_generation(g: Generation) -> str:
    return f"**{g.seconds:.2f} s** — {g.settings.describe()}"


def format_comparison(c: Comparison) -> str:
    return (f"Baseline: **{c.baseline.seconds:.2f} s** · Configured: **{c.configured.seconds:.2f} s** · "
            f"Speedup: **{c.speedup:.2f}x** · PSNR vs baseline: **{format_psnr(c.psnr)}**\n\n"
            f"Baseline: {c.baseline.settings.describe()}  \nConfigured: {c.configured.settings.describe()}")


# ---------------------------------------------------------------------------------------------------
# Edit tab
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditResult:
    original: object
    reconstruction: object
    edited: object
    reconstruction_psnr: float
    seconds: float


def fit_image(image, size: int):
    """Center-crop ``image`` to a square and resize it to ``size`` pixels (the model's resolution), RGB."""
    from PIL import Image

    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)


def edit(model: DemoModel, image, settings: EditSettings) -> EditResult:
    """CFG++ DDIM inversion of ``image`` under the source prompt, then sampling from the inverted latent
    with the source prompt (reconstruction) and with the target prompt (the edit)."""
    guidance = make_guidance(GuidanceSettings(method="CFG++", cfgpp_scale=settings.scale))
    original = fit_image(image, model.resolution)
    with model.lock:
        pipe = model.pipe
        invert = pipeline_method(pipe, "invert", "Inversion")
        ddim = GenerateSettings(prompt=settings.source_prompt, steps=settings.steps, scheduler="DDIM",
                                guidance=GuidanceSettings(method="CFG++", cfgpp_scale=settings.scale))
        with configured(model, pipe, ddim):
            start = time.perf_counter()
            try:
                latents = invert(original, settings.source_prompt, guidance=guidance,
                                 num_inference_steps=settings.steps)
                images = [pipe(prompt, latents=latents.clone(), guidance=guidance,
                               num_inference_steps=settings.steps).images[0]
                          for prompt in (settings.source_prompt, settings.target_prompt)]
            except ValueError as e:
                raise InputError(f"The edit cannot run with these settings: {first_line(e)}") from None
            seconds = time.perf_counter() - start
    return EditResult(original, images[0], images[1], psnr_db(original, images[0]), seconds)


def format_edit(r: EditResult) -> str:
    return (f"Inversion + 2 generations: **{r.seconds:.2f} s** · "
            f"reconstruction PSNR: **{format_psnr(r.reconstruction_psnr)}**")


# ---------------------------------------------------------------------------------------------------
# Erase tab
# ---------------------------------------------------------------------------------------------------


def erasure_trainer():
    """The erasure engine's entry point ``erase(pipe, config, out)`` (FeatureUnavailable while it is missing)."""
    return optional_attr("diffkit.erasure", "erase", "Erasure training")


def erasure_methods() -> list[str]:
    """The erasure methods registered with the engine (ESD, SalUn, and any added later)."""
    try:
        from diffkit.erasure import METHODS
        from diffkit.erasure.method import get_method

        get_method("esd")  # imports the built-in methods, which register themselves
    except ImportError:
        return []
    return sorted(METHODS)


@dataclass(frozen=True)
class EraseResult:
    before_forget: object
    after_forget: object
    before_retain: object
    after_retain: object
    artifact: str
    status: str
    seconds: float
    retain_psnr: float


def erasure_config(s: EraseSettings):
    """The engine's job for the Erase tab.

    The concept is trained as the word and as the forget prompt (ESD's x_t are sampled from these), so the
    forget prompt itself loses the concept within a demo's few dozen steps; the retain prompt is the job's
    retain set. An empty learning rate takes the demo's default for the method (:data:`DEMO_ERASE_LR`),
    else the method's own.
    """
    from diffkit.erasure import ErasureConfig

    concept = (s.concept,) if s.forget_prompt == s.concept else (s.concept, s.forget_prompt)
    lr = s.lr if s.lr is not None else DEMO_ERASE_LR.get(s.method)
    try:
        return ErasureConfig(method=s.method, concept=concept, retain_prompts=(s.retain_prompt,), steps=s.steps,
                             lr=lr, seed=s.seed, sample_steps=s.sample_steps, checkpoint_every=s.steps)
    except ValueError as e:
        raise InputError(f"Erasure job: {first_line(e)}") from None


def artifact_name(s: EraseSettings) -> str:
    """Folder name of the artifact: method, concept and the job's hash (same job -> same folder, reused)."""
    slug = "".join(c if c.isalnum() else "-" for c in s.concept.lower()).strip("-") or "concept"
    return f"{s.method}-{slug}-{erasure_config(s).config_hash()[:8]}"


def erase_concept(model: DemoModel, settings: EraseSettings, out_root, progress=None) -> EraseResult:
    """Train a short erasure, write its artifact under ``out_root`` and show its effect.

    The job trains on :meth:`DemoModel.private_copy`: the shared pipeline is never changed, and other users'
    generations only wait for the copy (milliseconds) and for the two "before" previews, which are ordinary
    requests. Before/after images use the same seed (DDIM, CFG 7.5). ``progress(fraction, text)``, when
    given, is called between the phases; the engine's own tqdm bar reports the training steps.
    """
    from pathlib import Path

    erase = erasure_trainer()
    config = erasure_config(settings)
    out = Path(out_root) / artifact_name(settings)
    previews = [GenerateSettings(prompt=p, seed=settings.seed, steps=settings.preview_steps, scheduler="DDIM")
                for p in (settings.forget_prompt, settings.retain_prompt)]
    report = progress or (lambda fraction, text: None)
    if not model.job_lock.acquire(blocking=False):
        raise InputError("Another erasure job is running on this server; try again when it has finished.")
    try:
        report(0.0, "before images")
        before = [generate(model, p).image for p in previews]
        work = model.private_copy()
        report(0.05, f"training {settings.method} for {settings.steps} steps")
        start = time.perf_counter()
        try:
            result = erase(work, config, out, progress=True)  # leaves the erasure loaded on the copy
        except ValueError as e:
            raise InputError(f"Erasure failed: {first_line(e)}") from None
        seconds = time.perf_counter() - start
        if not getattr(work, "loaded_erasures", None):  # an engine that returns a reused artifact unloaded
            load_erasure_safely(work, str(out))
        report(0.95, "after images")
        after = [render(model, work, p).image for p in previews]
    finally:
        model.job_lock.release()
    return EraseResult(before[0], after[0], before[1], after[1], str(out), result.status, seconds,
                       psnr_db(before[1], after[1]))


def format_erase(r: EraseResult) -> str:
    how = ("reused the artifact of an identical earlier job" if r.status == "skipped"
           else f"{r.status} in {r.seconds:.1f} s")
    return (f"Erasure {how}; artifact: `{r.artifact}` (now listed in the Generate tab). "
            f"Retain-prompt PSNR before vs after: **{format_psnr(r.retain_psnr)}**")
