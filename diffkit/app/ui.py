"""The Gradio page: three tabs wired to :mod:`diffkit.app.logic` through :class:`Handlers`.

:class:`Handlers` turns widget values into results or a friendly message and never raises, so a request
can never show a stack trace; its methods are plain functions, tested without a browser. ``build_demo``
only lays out widgets and connects them.

Files: the page takes exactly one file from clients, the Edit tab's image, and only one that Gradio's
upload endpoint stored in its upload folder (:func:`foreign_file`, checked for every input of every event
before Gradio reads any file). Images pass between tabs as server-side session state, never as a path the
client sends back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import logic
from .settings import (
    DEEPCACHE_SCHEDULES,
    DEFAULT_ERASE_SAMPLE_STEPS,
    DEFAULT_ERASE_STEPS,
    GUIDANCE_METHODS,
    MAX_ERASE_STEPS,
    MAX_STEPS,
    NONE_CHOICE,
    PREFERRED_ERASE_METHOD,
    SCHEDULERS,
    InputError,
    check_int,
    guider_scales,
    list_artifacts,
    suggest_erase_prompts,
    validate_edit,
    validate_erase,
    validate_generate,
)

log = logging.getLogger("diffkit.app")

#: The Generate tab's inputs, in the order the Gradio event passes them (= validate_generate's keywords).
GENERATE_FIELDS = ("prompt", "negative_prompt", "seed", "steps", "scheduler", "method", "cfg_scale", "apg_scale",
                   "apg_eta", "apg_norm_threshold", "apg_momentum", "cfgpp_scale", "deepcache", "deepcache_interval",
                   "deepcache_branch", "deepcache_schedule", "pruning", "erasure", "guider",
                   "guider_scale", "lora")

#: Display height of images in pixels (64x64 model outputs are shown enlarged, pixelated).
IMAGE_HEIGHT = 256

#: Compare mode may time each side up to this many times (alternating) and keep the fastest run.
MAX_TIMING_RUNS = 5

EXAMPLE_PROMPTS = ("a red solid star on a white background", "a blue striped circle on a black background",
                   "a green dotted heart on a gray background")

CSS = """
.pixelated img { image-rendering: pixelated; width: 100%; height: 100%; object-fit: contain; }
#generate-status, #edit-status, #erase-status { min-height: 2.5em; }
"""


def warning_text(message: str) -> str:
    return f"⚠️ {message}"


def failure_text(exc: BaseException) -> str:
    return (f"❌ Something went wrong: {type(exc).__name__}: {logic.first_line(exc)} "
            f"(the server log has the details).")


def friendly(exc: BaseException) -> str:
    """The status line for an exception: the message itself for input errors, a one-line summary otherwise."""
    if isinstance(exc, InputError):
        return warning_text(str(exc))
    log.exception("request failed", exc_info=exc)
    return failure_text(exc)


#: The message a request gets when it names a file the demo did not receive through its upload endpoint.
FOREIGN_FILE_MESSAGE = "This demo only accepts files uploaded through its page."


def upload_folder() -> Path:
    """Gradio's upload (and cache) folder, where ``/gradio_api/upload`` stores what clients send."""
    from gradio.utils import get_upload_folder

    return Path(get_upload_folder())


def foreign_file(value, root: Path | None = None) -> str | None:
    """The first file reference in ``value`` (an event's raw input, any nesting) that is not a file inside
    the upload folder ``root``: a URL, or a path elsewhere (symlinks resolved); None when there is none.

    Any dict with a string ``"path"`` counts as a file reference, with or without Gradio's ``meta`` marker,
    so no Gradio version's way of recognising files can slip past it.
    """
    from gradio.utils import is_in_or_equal

    root = upload_folder() if root is None else root
    if isinstance(value, dict):
        path = value.get("path")
        if isinstance(path, str):
            if "://" in path or path.startswith("data:") or not is_in_or_equal(path, root):
                return path
        for item in value.values():
            found = foreign_file(item, root)
            if found is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for item in value:
            found = foreign_file(item, root)
            if found is not None:
                return found
    return None


class Handlers:
    """The page's event handlers over one shared :class:`~diffkit.app.logic.DemoModel`.

    Each returns the outputs' new values; errors become a status message (never an exception).
    """

    def __init__(self, model: logic.DemoModel, pruning_dir=None, erasure_dir=None, lora_dir=None):
        self.model = model
        self.pruning_dir = pruning_dir
        self.erasure_dir = erasure_dir
        self.lora_dir = lora_dir

    # Generate ---------------------------------------------------------------------------------------
    def generate(self, compare: bool, repeats, *values):
        """-> (baseline image or None, configured image or None, status markdown).

        ``values`` are the Generate tab's fields in :data:`GENERATE_FIELDS` order.
        """
        try:
            settings = validate_generate(**dict(zip(GENERATE_FIELDS, values, strict=True)),
                                         pruning_root=self.pruning_dir, erasure_root=self.erasure_dir,
                                         lora_root=self.lora_dir)
            if compare:
                result = logic.compare(self.model, settings, check_int(repeats, "Timing runs", 1, MAX_TIMING_RUNS))
                return result.baseline.image, result.configured.image, logic.format_comparison(result)
            one = logic.generate(self.model, settings)
            return None, one.image, logic.format_generation(one)
        except Exception as e:  # noqa: BLE001 - the page shows every failure as a message
            return None, None, friendly(e)

    def artifact_choices(self) -> tuple[list[str], list[str]]:
        """Dropdown choices for (pruning specs, erasure artifacts), each starting with the no-artifact entry."""
        return ([NONE_CHOICE, *list_artifacts(self.pruning_dir)], [NONE_CHOICE, *list_artifacts(self.erasure_dir)])

    def lora_choices(self) -> list[str]:
        """Dropdown choices for the LoRA: the no-LoRA entry, then the folder names under ``lora_dir``."""
        return [NONE_CHOICE, *list_artifacts(self.lora_dir)]

    # Edit -------------------------------------------------------------------------------------------
    def edit(self, image, source_prompt, target_prompt, scale, steps):
        """-> (original, reconstruction, edit, status markdown)."""
        try:
            settings = validate_edit(image, source_prompt, target_prompt, scale, steps)
            result = logic.edit(self.model, image, settings)
            return result.original, result.reconstruction, result.edited, logic.format_edit(result)
        except Exception as e:  # noqa: BLE001
            return None, None, None, friendly(e)

    # Erase ------------------------------------------------------------------------------------------
    def erase(self, concept, method, forget_prompt, retain_prompt, steps, lr, sample_steps, seed, progress=None):
        """-> (before forget, after forget, before retain, after retain, status markdown).

        ``progress(fraction, text)`` is told the job's phases (see :func:`logic.erase_concept`)."""
        try:
            settings = validate_erase(concept, method, forget_prompt, retain_prompt, steps, lr, sample_steps, seed,
                                      methods=logic.erasure_methods())
            if not self.erasure_dir:
                raise InputError("No erasure folder is configured; start the app with --erasure-dir DIR.")
            r = logic.erase_concept(self.model, settings, self.erasure_dir, progress=progress)
            return r.before_forget, r.after_forget, r.before_retain, r.after_retain, logic.format_erase(r)
        except Exception as e:  # noqa: BLE001
            return None, None, None, None, friendly(e)


def banner(model: logic.DemoModel) -> str:
    lines = [f"**Model:** `{model.name}` on `{model.device}`"]
    if model.note:
        lines.append(f"⚠️ {model.note}")
    missing = {k: v for k, v in logic.feature_report(model.pipe).items() if v}
    if missing:
        lines.append("Not available in this installation: " + "; ".join(missing.values()))
    return "\n\n".join(lines)


def uploads_only_blocks():
    """``gr.Blocks`` that refuses, before Gradio moves or reads any file, every event whose inputs name a
    file outside the upload folder (:func:`foreign_file`): the request fails with
    :data:`FOREIGN_FILE_MESSAGE`, nothing is copied into Gradio's cache, so nothing becomes servable."""
    import gradio as gr

    class UploadsOnlyBlocks(gr.Blocks):
        async def preprocess_data(self, block_fn, inputs, state, explicit_call=False):
            if not explicit_call:  # explicit calls are the server's own Python calls, not a client's
                for value in inputs:
                    path = foreign_file(value)
                    if path is not None:
                        log.warning("refused a request naming the file %r (not an upload)", path)
                        raise gr.Error(FOREIGN_FILE_MESSAGE, print_exception=False)
            return await super().preprocess_data(block_fn, inputs, state, explicit_call)

    return UploadsOnlyBlocks


def launch_options(*private) -> dict:
    """``launch()``'s file-access settings: no extra folder is served (``allowed_paths=[]``; Gradio's
    ``GRADIO_ALLOWED_PATHS`` is ignored, see :func:`diffkit.app.main.prepare`); the package and the
    ``private`` folders (model, artifact folders) are blocked, as are ``GRADIO_BLOCKED_PATHS``. A folder
    that holds the upload folder is not blocked (that would block uploads). What remains servable is
    Gradio's upload/cache folder: the uploads the page received and the images it produced."""
    from gradio.utils import is_in_or_equal

    candidates = [Path(logic.__file__).resolve().parents[1], *(Path(p).resolve() for p in private if p)]
    extra = os.environ.get("GRADIO_BLOCKED_PATHS", "")
    candidates += [Path(p.strip()).resolve() for p in extra.split(",") if p.strip()]
    uploads = upload_folder()
    blocked = []
    for path in candidates:
        if not is_in_or_equal(uploads, path) and str(path) not in blocked:
            blocked.append(str(path))
    return dict(allowed_paths=[], blocked_paths=blocked)


def build_demo(handlers: Handlers):
    """The Blocks page (call ``.queue()`` and ``.launch()`` on it; see :mod:`diffkit.app.main`)."""
    import gradio as gr

    model = handlers.model
    pruning_choices, erasure_choices = handlers.artifact_choices()
    methods = logic.erasure_methods()
    default_method = PREFERRED_ERASE_METHOD if PREFERRED_ERASE_METHOD in methods else (methods or [None])[0]

    def output_image(label, **kw):
        # PNG, not Gradio's default WebP: the page shows (and downloads) the exact pixels that were measured.
        return gr.Image(label=label, type="pil", format="png", interactive=False, height=IMAGE_HEIGHT,
                        elem_classes="pixelated", **kw)

    with uploads_only_blocks()(title="diffkit demo") as demo:
        last_image = gr.State(None)  # the session's last configured image, kept on the server
        gr.Markdown("# diffkit demo\nFaster (DeepCache, pruning), better guided (APG, CFG++) and safer "
                    "(concept erasure) diffusers pipelines, side by side.")
        gr.Markdown(banner(model), elem_id="banner")

        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLE_PROMPTS[0], elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative-prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                        steps = gr.Number(label=f"Steps (1-{MAX_STEPS})", value=25, precision=0, elem_id="steps")
                        scheduler = gr.Dropdown(list(SCHEDULERS), value="DDIM", label="Scheduler",
                                                elem_id="scheduler")
                    method = gr.Radio(list(GUIDANCE_METHODS), value="CFG", label="Guidance", elem_id="method")
                    with gr.Group(visible=True) as cfg_box:
                        cfg_scale = gr.Number(label="CFG scale (also the baseline's in compare mode)", value=7.5)
                    with gr.Group(visible=False) as apg_box:
                        with gr.Row():
                            apg_scale = gr.Number(label="APG scale w", value=15.0)
                            apg_eta = gr.Number(label="eta (parallel weight, 0-1)", value=0.0)
                        with gr.Row():
                            apg_norm = gr.Number(label="norm threshold r (0 = off)", value=15.0)
                            apg_momentum = gr.Number(label="momentum beta (-1, 1)", value=-0.5)
                    with gr.Group(visible=False) as cfgpp_box:
                        cfgpp_scale = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="CFG++ lambda (0-1)")
                    guiders = guider_scales()
                    first = next(iter(guiders), None)
                    with gr.Group(visible=False) as guider_box, gr.Row():
                        guider = gr.Dropdown(list(guiders), value=first, label="Diffusers guider", elem_id="guider")
                        guider_scale = gr.Number(label=guider_scale_label(guiders, first),
                                                 value=guiders[first][1] if first else None, elem_id="guider-scale")
                    deepcache = gr.Checkbox(label="DeepCache", value=False, elem_id="deepcache")
                    with gr.Group(visible=False) as deepcache_box, gr.Row():
                        dc_interval = gr.Number(label="interval N", value=3, precision=0)
                        dc_branch = gr.Number(label="branch", value=0, precision=0)
                        dc_schedule = gr.Radio(list(DEEPCACHE_SCHEDULES), value="uniform", label="schedule")
                    with gr.Row():
                        pruning = gr.Dropdown(pruning_choices, value=NONE_CHOICE, elem_id="pruning",
                                              label=f"Pruning spec (folders in {handlers.pruning_dir})")
                        erasure = gr.Dropdown(erasure_choices, value=NONE_CHOICE, elem_id="erasure",
                                              label=f"Erasure artifact (folders in {handlers.erasure_dir})")
                        lora = gr.Dropdown(handlers.lora_choices(), value=NONE_CHOICE, elem_id="lora",
                                           label=f"LoRA (folders in {handlers.lora_dir})")
                    refresh = gr.Button("Refresh artifact lists", size="sm")
                    compare = gr.Checkbox(label="Compare with the baseline (plain CFG, no cache, no pruning, "
                                                "no erasure, no LoRA), same seed", value=True, elem_id="compare")
                    repeats = gr.Number(label=f"Timing runs per side (1-{MAX_TIMING_RUNS}; alternated, fastest kept)",
                                        value=1, precision=0, elem_id="repeats")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                    gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt])
                with gr.Column(scale=1):
                    status = gr.Markdown(elem_id="generate-status")
                    with gr.Row():
                        baseline_image = output_image("Baseline", elem_id="baseline-image")
                        configured_image = output_image("Configured", elem_id="configured-image")

        with gr.Tab("Edit"):
            gr.Markdown("CFG++ DDIM inversion of the image under the source prompt, then sampling from the "
                        "inverted noise with the source prompt (reconstruction) and with the target prompt (edit).")
            with gr.Row():
                with gr.Column(scale=1):
                    edit_image = gr.Image(label="Image", type="pil", height=IMAGE_HEIGHT, elem_id="edit-image",
                                          elem_classes="pixelated")
                    use_last = gr.Button("Use the last configured image from Generate", size="sm")
                    source = gr.Textbox(label="Source prompt (what the image shows)", elem_id="source-prompt")
                    target = gr.Textbox(label="Target prompt (what it should become)", elem_id="target-prompt")
                    with gr.Row():
                        edit_scale = gr.Slider(0.0, 1.0, value=0.6, step=0.05, label="CFG++ lambda")
                        edit_steps = gr.Number(label=f"Steps (1-{MAX_STEPS})", value=50, precision=0,
                                               elem_id="edit-steps")
                    edit_run = gr.Button("Invert and edit", variant="primary", elem_id="edit")
                with gr.Column(scale=1):
                    edit_status = gr.Markdown(elem_id="edit-status")
                    with gr.Row():
                        original = output_image("Original", elem_id="original-image")
                        reconstruction = output_image("Reconstruction", elem_id="reconstruction-image")
                        edited = output_image("Edit", elem_id="edited-image")

        with gr.Tab("Erase"):
            gr.Markdown("A short erasure of one concept on the loaded model (the artifact is written to the "
                        "erasure folder and listed in the Generate tab; the model itself is restored afterwards).")
            concepts = concept_choices()
            first = suggest_erase_prompts(concepts[0]) if concepts else ("", "")
            with gr.Row():
                with gr.Column(scale=1):
                    with gr.Row():
                        concept = gr.Dropdown(concepts, value=concepts[0] if concepts else None,
                                              allow_custom_value=True, label="Concept", elem_id="concept")
                        erase_method = gr.Dropdown(methods, value=default_method, label="Method",
                                                   elem_id="erase-method")
                    forget = gr.Textbox(label="Forget prompt", value=first[0], elem_id="forget-prompt")
                    retain = gr.Textbox(label="Retain prompt", value=first[1], elem_id="retain-prompt")
                    with gr.Row():
                        erase_steps = gr.Number(label=f"Training steps (1-{MAX_ERASE_STEPS})",
                                                value=DEFAULT_ERASE_STEPS, precision=0, elem_id="erase-steps")
                        erase_lr = gr.Textbox(label="Learning rate (empty: the demo's default for the method)",
                                              value="",
                                              placeholder="e.g. 1e-4", elem_id="erase-lr")
                    with gr.Row():
                        sample_steps = gr.Number(label="Sampling steps", value=DEFAULT_ERASE_SAMPLE_STEPS, precision=0,
                                                 elem_id="sample-steps")
                        erase_seed = gr.Number(label="Seed", value=0, precision=0)
                    erase_run = gr.Button("Erase", variant="primary", elem_id="erase")
                with gr.Column(scale=1):
                    erase_status = gr.Markdown(elem_id="erase-status")
                    with gr.Row():
                        before_forget = output_image("Forget prompt, before", elem_id="before-forget-image")
                        after_forget = output_image("Forget prompt, after", elem_id="after-forget-image")
                    with gr.Row():
                        before_retain = output_image("Retain prompt, before", elem_id="before-retain-image")
                        after_retain = output_image("Retain prompt, after", elem_id="after-retain-image")

        # --- wiring -----------------------------------------------------------------------------------
        # Events that only change the page are "private": no API endpoint, not listed (docs/app.md lists
        # the public ones). Privacy is not the file guard: uploads_only_blocks() checks every event.
        internal = dict(queue=False, api_visibility="private")
        method.change(lambda m: [gr.update(visible=m == x) for x in GUIDANCE_METHODS], method,
                      [cfg_box, apg_box, cfgpp_box, guider_box], **internal)
        # A guider's main scale differs in meaning and default (PAG 3, MAMBO 10): show and reset both.
        guider.change(lambda name: gr.update(label=guider_scale_label(guiders, name),
                                             value=guiders[name][1] if name in guiders else None),
                      guider, guider_scale, **internal)
        deepcache.change(lambda on: gr.update(visible=bool(on)), deepcache, deepcache_box, **internal)

        def refresh_lists():
            p, e = handlers.artifact_choices()
            return gr.update(choices=p), gr.update(choices=e)

        refresh.click(lambda: (*refresh_lists(), gr.update(choices=handlers.lora_choices())), None,
                      [pruning, erasure, lora], **internal)
        inputs = [compare, repeats, prompt, negative, seed, steps, scheduler, method, cfg_scale, apg_scale, apg_eta,
                  apg_norm, apg_momentum, cfgpp_scale, deepcache, dc_interval, dc_branch, dc_schedule, pruning, erasure,
                  guider, guider_scale, lora]  # newer fields last: older API clients' positions still hold
        # One queue for every event that uses the model: requests wait their turn; the model's lock keeps two
        # running ones from configuring the shared pipeline at the same time.
        def generate(last, *values):
            baseline, configured, text = handlers.generate(*values)
            return baseline, configured, text, configured if configured is not None else last

        gen_event = dict(fn=generate, inputs=[last_image, *inputs],
                         outputs=[baseline_image, configured_image, status, last_image],
                         concurrency_limit=2, concurrency_id="pipeline", api_name="generate")
        run.click(**gen_event)
        prompt.submit(**{**gen_event, "api_visibility": "private"})  # the same endpoint as the button

        # "Use the last image" copies the server-side state; the client sends no file for it.
        use_last.click(lambda im: im, last_image, edit_image, **internal)
        edit_run.click(handlers.edit, [edit_image, source, target, edit_scale, edit_steps],
                       [original, reconstruction, edited, edit_status], concurrency_limit=2,
                       concurrency_id="pipeline", api_name="edit")

        concept.change(lambda c: suggest_erase_prompts(c), concept, [forget, retain], **internal)

        def run_erase(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - Gradio's idiom
            progress(0, desc="erasing")
            out = handlers.erase(*values, progress=lambda fraction, text: progress(fraction, desc=text))
            return (*out, *refresh_lists())

        # Training has its own queue (one job at a time) and works on a private copy of the model, so the
        # "pipeline" queue keeps serving generations while it runs.
        erase_run.click(run_erase, [concept, erase_method, forget, retain, erase_steps, erase_lr, sample_steps,
                                    erase_seed],
                        [before_forget, after_forget, before_retain, after_retain, erase_status, pruning, erasure],
                        concurrency_limit=1, concurrency_id="training", api_name="erase")
    return demo


def guider_scale_label(guiders: dict, name) -> str:
    """The scale box's label: what the chosen guider's main scale sets (e.g. PAG's perturbed_guidance_scale)."""
    return f"scale: {guiders[name][0]} (0-50)" if name in guiders else "scale"


def concept_choices() -> list[str]:
    """Concepts the Erase tab offers: the reference model's objects, colors and styles."""
    try:
        from diffkit.zoo.shapes import COLORS, OBJECTS, STYLES
    except ImportError:
        return []
    return [*COLORS, *OBJECTS, *STYLES]
