"""The one training loop every erasure method runs in.

The loop owns: the data every method draws (concept / anchor / retain prompts, latents sampled from
the original model), accelerate (device, mixed precision, data-parallel processes), gradient
checkpointing, the Adam optimiser, the progress bar with the loss, checkpoints and resume, and the
artifact. A method (``diffkit.erasure.method.ErasureMethod``) supplies its loss, and optionally a
narrower parameter set and a gradient transform.

Design choices:
* **Frozen original without a second model.** Only the trained tensors are duplicated: their original
  values are kept on the device and swapped into the parameters (pointer swap of ``.data``) for the
  frozen model's forward passes. ESD-x thus keeps ~3% of the U-Net twice, not the whole model; methods
  whose targets do not need the original (SalUn) keep no device copy at all. A CPU copy of the trained
  tensors' original values is kept for the fingerprint and for ``pipe.unload_erasure()``.
* **Same result for any number of processes.** Every random draw (prompt choice, timestep, noise) is
  made for the *global* batch from one CPU generator seeded by the job seed, identically on every
  process; each process takes its contiguous slice. DDP averages the per-process mean losses' gradients,
  which is the global-batch mean. The generator's state is part of each checkpoint.
* Modules are wrapped in ``DistributedDataParallel`` only when there are several processes (and never
  through ``accelerator.prepare``, which would patch the pipeline's modules' ``forward`` permanently);
  the optimiser goes through accelerate (gradient scaling for fp16).
"""

from __future__ import annotations

import contextlib
import platform
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..lifecycle import Touch, features_of
from ..noise import NoiseLevel, add_noise, prediction_target, training_level
from .artifact import base_fingerprint, is_complete, read_sidecar, write_artifact, write_lora_artifact
from .checkpoint import method_state, read_checkpoint, restore_checkpoint, save_checkpoint
from .conditioning import is_sdxl, prompt_encoder, unet_kwargs
from .config import ErasureConfig
from .lora_param import InjectedLora, LoraParametrization, target_modules
from .method import METHODS, get_method
from .sampling import ddim_scheduler, sample_until
from .selection import TEXT_ENCODERS, components_of, get_parameter, select_parameters

CHECKPOINT_DIR = "checkpoint"


def make_accelerator(mixed_precision: str = "no"):
    """An ``accelerate.Accelerator``; a process holds one mixed-precision setting (accelerate's rule)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state:
        current = AcceleratorState().mixed_precision
        if current != mixed_precision:
            raise ValueError(f"mixed_precision={mixed_precision!r} but this process already runs accelerate with "
                             f"mixed_precision={current!r}; one process holds one setting (use one per batch)")
    # accelerate only forms a CPU (gloo) process group when told to use the CPU; without a GPU, a launch
    # with several processes (accelerate launch / torchrun set WORLD_SIZE) is exactly that case.
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


class OriginalWeights:
    """Original values of the trained tensors, swapped into the parameters for frozen forward passes."""

    def __init__(self, params: dict[str, torch.nn.Parameter]):
        self.params = params
        self.values = {q: p.detach().clone() for q, p in params.items()}

    @contextlib.contextmanager
    def swapped(self):
        def swap():
            for q, p in self.params.items():
                p.data, self.values[q] = self.values[q], p.data

        swap()
        try:
            yield
        finally:
            swap()


class TrainingContext:
    """What a method's ``prepare`` and ``loss`` use: data draws, conditioning and the two models."""

    def __init__(self, pipe, config: ErasureConfig, accelerator):
        self.pipe = pipe
        self.config = config
        self.accelerator = accelerator
        self.device = accelerator.device
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index
        self.components = components_of(pipe)
        self.wrapped = dict(self.components)  # forward modules; DDP wrappers for trained ones
        self.trainable: dict[str, torch.nn.Parameter] = {}
        self.original: OriginalWeights | None = None
        self.pristine = True  # before training the parameters are the original model
        self.rng = torch.Generator().manual_seed(config.seed)
        self.prepare_rng = torch.Generator().manual_seed(config.seed + 1)
        self.scheduler = ddim_scheduler(pipe.scheduler.config, config.sample_steps)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        unet = pipe.unet
        side = unet.config.sample_size
        factor = getattr(pipe, "vae_scale_factor", 8)
        if config.resolution is not None:
            if config.resolution % factor:
                raise ValueError(f"resolution must be a multiple of the VAE factor {factor}, got {config.resolution}")
            side = config.resolution // factor
        side = side if isinstance(side, int) else side[0]
        self.latent_shape = (unet.config.in_channels, side, side)
        # SDXL's size conditioning is that of the images trained on (the pipeline's default size unless
        # ``resolution`` is set), as the pipeline conditions when it generates at that size.
        self.prompts = prompt_encoder(pipe, self.device, image_size=(side * factor, side * factor))
        self.text_components = tuple(c for c in TEXT_ENCODERS if c in self.components)

    # --- draws (global batch, shared generator) --------------------------------------------------------
    def local(self, x):
        """This process's contiguous slice of a global-batch tensor or list."""
        n = len(x) // self.num_processes
        return x[self.process_index * n:(self.process_index + 1) * n]

    def randint(self, n: int, high: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, high, (n,), generator=generator or self.rng)

    def randn(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=generator or self.rng).to(self.device)

    # --- models -------------------------------------------------------------------------------------
    def _trains(self, component: str) -> bool:
        return any(q.startswith(component + ".") for q in self.trainable)

    def trains_text_encoder(self) -> bool:
        """Whether any text encoder (SDXL: either of the two) has trained tensors: its conditioning then
        carries gradients and is never cached."""
        return any(self._trains(c) for c in self.text_components)

    @contextlib.contextmanager
    def _as_original(self):
        if self.pristine:
            yield
        elif self.original is None:
            raise RuntimeError(f"method {self.config.method!r} did not keep the original weights "
                               f"(needs_original=False) but asked for the original model")
        else:
            with self.original.swapped():
                yield

    def embed(self, prompts: list[str], *, original: bool = False, prefix: torch.Tensor | None = None):
        """(B, L, D) conditioning (SDXL: an ``XLConditioning``, see ``diffkit.erasure.conditioning``); with
        gradients only where a text encoder trains (or a prefix is given).

        The prompt cache only ever holds the *original* encoder's values: a frozen encoder's, or the
        original's (``original=True``); a training encoder is always re-run (its values change each step).
        """
        if original:
            with torch.no_grad(), self._as_original():
                return self.prompts.encode(prompts, prefix)
        if not self.trains_text_encoder() and prefix is None:
            with torch.no_grad():
                return self.prompts.encode(prompts)
        # DDP only for passes whose backward updates the trained weights (an attack's prefix gradient does not).
        ddp = torch.is_grad_enabled() and prefix is None
        encoders = tuple(self.wrapped[c] for c in self.text_components) if ddp else None
        with self.accelerator.autocast():
            return self.prompts.encode(prompts, prefix, encoders=encoders, cache=False).float()

    def predict(self, latents, timesteps, embeds, *, original: bool = False, wrapped: bool = True):
        """U-Net output in float32 for the conditioning ``embeds`` (from :meth:`embed`; SDXL's extra
        conditioning rides along, see ``diffkit.erasure.conditioning.unet_kwargs``). ``original``: the
        frozen model (no gradients). ``wrapped=False`` bypasses DDP: use it for every forward pass whose
        backward does not update the trained weights (no-grad predictions, an attack's inner loop); DDP
        expects one forward per ``backward``."""
        timesteps = timesteps.to(self.device)
        if original:
            with torch.no_grad(), self._as_original(), self.accelerator.autocast():
                return self.components["unet"](latents, timesteps, **unet_kwargs(embeds)).sample.float()
        module = self.wrapped["unet"] if wrapped and torch.is_grad_enabled() else self.components["unet"]
        with self.accelerator.autocast():
            return module(latents, timesteps, **unet_kwargs(embeds)).sample.float()

    def sample(self, prompts: list[str], stop: torch.Tensor, noise: torch.Tensor, guidance: float | None = None):
        """ESD's x_t: the original model's guided DDIM run from ``noise`` for ``stop[i]`` steps; (x_t, t)."""
        guidance = self.config.sample_guidance if guidance is None else guidance
        cond = self.embed(prompts, original=True)
        uncond = self.embed([""] * len(prompts), original=True)
        predict = lambda x, t, e: self.predict(x, t, e, original=True)
        return sample_until(predict, self.scheduler, noise, cond, uncond, stop, guidance)

    def generate(self, prompts: list[str], generator: torch.Generator) -> torch.Tensor:
        """Finished latents of the original model for ``prompts`` (in chunks of the batch size)."""
        out = []
        for i in range(0, len(prompts), self.config.batch_size):
            chunk = prompts[i:i + self.config.batch_size]
            noise = self.randn(len(chunk), generator)
            stop = torch.full((len(chunk),), len(self.scheduler.timesteps))
            out.append(self.sample(chunk, stop, noise)[0])
        return torch.cat(out)

    def level(self, t) -> NoiseLevel:
        """The training noise level of timesteps ``t`` (see :func:`diffkit.noise.training_level`)."""
        return training_level(self.scheduler.alphas_cumprod, t)

    def add_noise(self, x0, noise, t):
        """q(x_t | x_0) of the pipeline's training schedule."""
        return add_noise(x0, noise, self.level(t)).to(x0.dtype)

    def diffusion_target(self, x0, noise, t):
        """What the model predicts in the ordinary diffusion loss: eps, or v for v-prediction models."""
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported (epsilon, v_prediction)")
        return prediction_target(x0, noise, self.level(t), self.prediction_type).to(x0.dtype)


@dataclass
class ErasureResult:
    """The outcome of :func:`erase`: the artifact folder and its sidecar."""

    path: Path
    sidecar: dict
    status: str  # "trained", "resumed" or "skipped"
    resumed_from: int | None = None


def _check_pipeline(pipe, config: ErasureConfig) -> None:
    """Refuse a pipeline the engine cannot condition, and SDXL jobs whose method or feature does not run there."""
    needed = ("unet", "text_encoder", "tokenizer", "scheduler") + (("tokenizer_2",) if is_sdxl(pipe) else ())
    missing = [c for c in needed if getattr(pipe, c, None) is None]
    if missing:
        raise ValueError(f"erasure needs a pipeline with {', '.join(missing)}; {type(pipe).__name__} lacks them")
    extra = pipe.unet.config.get("addition_embed_type")
    if (extra, is_sdxl(pipe)) not in ((None, False), ("text_time", True)):
        raise ValueError(f"erasure supports SD 1.x/2.x and SDXL pipelines; {type(pipe).__name__} (text_encoder_2: "
                         f"{is_sdxl(pipe)}) has a U-Net with addition_embed_type={extra!r}, which is not supported")
    if is_sdxl(pipe):
        _check_sdxl_job(config)
    if not hasattr(pipe, "register_erasure"):
        raise ValueError(f"erasure needs a diffkit pipeline (diffkit.to_diffkit(pipe)); got {type(pipe).__name__}")
    if getattr(pipe, "loaded_erasures", None):
        raise ValueError("this pipeline has erasures loaded; call pipe.unload_erasure() before training a new one")


def _check_sdxl_job(config: ErasureConfig) -> None:
    """Refuse on SDXL what is written for one text encoder: methods without ``supports_sdxl``, LoRA jobs."""
    method = get_method(config.method)
    if not method.supports_sdxl:
        supported = sorted(name for name, cls in METHODS.items() if cls.supports_sdxl)
        raise ValueError(f"method {config.method!r} does not support SDXL pipelines (text_encoder_2) yet; on SDXL "
                         f"use one of {supported}")
    if config.parametrization == "lora":
        raise ValueError("parametrization 'lora' does not support SDXL pipelines yet (its diffusers LoRA file is "
                         "written for one text encoder); use parametrization 'full'")


def _checkpointing(module) -> bool:
    return bool(getattr(module, "is_gradient_checkpointing", False))


def _peak_memory(device) -> dict:
    if torch.device(device).type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_memory_kind": "cuda"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
    return {"peak_memory_bytes": int(rss), "peak_memory_kind": "process max RSS"}


def erase(pipe, config: ErasureConfig, out: str | Path, *, accelerator=None, progress: bool = True) -> ErasureResult:
    """Train ``config`` on ``pipe`` and write the artifact to ``out``; resume from ``out``'s checkpoint.

    On return the pipeline carries the erasure (registered, so ``pipe.unload_erasure()`` restores it).
    A finished artifact with the same config is not retrained but loaded ("skipped"); one with another
    config is an error. On error the pipeline's weights are restored.

    Features: the job trains the model itself, so forward-changing features (DeepCache) are detached
    for the job and re-attached afterwards (``FeatureSet.suspended``); a pruned U-Net is refused (train
    on the unpruned model: the artifact then loads onto the pruned one too).
    """
    fs = features_of(pipe) if hasattr(pipe, "features") else None
    if fs is None:
        return _erase(pipe, config, out, accelerator=accelerator, progress=progress)
    fs.refuse(("pruning",), "erase()", "train on the unpruned model (pipe.unload_pruning()); the artifact then "
              "loads onto the pruned pipeline as well")
    with fs.suspended(Touch.UNET_FORWARD, "erase()"):
        return _erase(pipe, config, out, accelerator=accelerator, progress=progress)


def _erase(pipe, config: ErasureConfig, out: str | Path, *, accelerator=None, progress: bool = True) -> ErasureResult:
    out = Path(out)
    if is_complete(out):
        side = read_sidecar(out)
        if side.get("config_hash") != config.config_hash():
            raise ValueError(f"{str(out)!r} already holds an erasure artifact with a different job config; "
                             f"choose another --out or remove it")
        pipe.load_erasure(out)  # also checks that the finished artifact belongs to this base model
        shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # left over by a kill after the artifact
        return ErasureResult(out, side, "skipped")
    _check_pipeline(pipe, config)
    acc = accelerator or make_accelerator(config.mixed_precision)
    if acc.mixed_precision != config.mixed_precision:
        raise ValueError(f"mixed_precision={config.mixed_precision!r} but the accelerator runs "
                         f"{acc.mixed_precision!r}")
    if config.batch_size % acc.num_processes:
        raise ValueError(f"batch_size must be a multiple of the number of processes ({acc.num_processes}), "
                         f"got {config.batch_size}")
    method = get_method(config.method)(config)
    if config.preserve_gradient and not method.own_preserve_gradient:
        from .surgery import PreserveGradient

        method = PreserveGradient(method)  # concept-preserving gradient surgery around any method
    pipe.to(acc.device)
    components = components_of(pipe)
    flags = {c: ([p.requires_grad for p in m.parameters()], m.training) for c, m in components.items()}
    for m in components.values():
        m.requires_grad_(False)
    originals_cpu: dict[str, torch.Tensor] = {}
    trained: dict[str, torch.nn.Parameter] = {}
    enabled_checkpointing: list = []
    lora: InjectedLora | None = None
    ok = False
    try:
        t0 = time.perf_counter()
        ctx = TrainingContext(pipe, config, acc)
        candidates = select_parameters(components, config.parameters)
        # The candidates are known before prepare: a text encoder among them is in the graph of ctx.embed
        # (SalUn's saliency pass ranks its gradients too). prepare narrows them; the weights are original.
        ctx.trainable = candidates
        trained = method.prepare(ctx, candidates)
        if not trained:
            raise ValueError(f"method {config.method!r} selected no tensor to train")
        if config.parametrization == "lora":
            # Train B A on the selected layers instead; the fingerprint is of the weights the LoRA adapts.
            modules = target_modules(components, trained, strict=not isinstance(config.parameters, str))
            base = {f"{m}.weight": get_parameter(components, f"{m}.weight") for m in modules}
            fingerprint = base_fingerprint(components, {q: p.detach().to("cpu", copy=True) for q, p in base.items()})
            seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(config.seed + 2)))
            lora = InjectedLora(components, modules, LoraParametrization(config.lora_rank, config.lora_alpha), seed)
            trained = lora.parameters()
            originals_cpu = {q: p.detach().to("cpu", copy=True) for q, p in trained.items()}
        else:
            originals_cpu = {q: p.detach().to("cpu", copy=True) for q, p in trained.items()}
            fingerprint = base_fingerprint(components, originals_cpu)
        ctx.trainable = trained
        ctx.original = OriginalWeights(trained) if method.needs_original else None
        ctx.pristine = False
        for p in trained.values():
            p.requires_grad_(True)
        for c, m in components.items():
            if ctx._trains(c) and config.gradient_checkpointing and not _checkpointing(m):
                (m.enable_gradient_checkpointing if c == "unet" else m.gradient_checkpointing_enable)()
                enabled_checkpointing.append((c, m))
        optimizer = torch.optim.Adam(list(trained.values()), lr=config.lr)
        info = {"config_hash": config.config_hash(), "method_digest": method.state_digest(),
                "base_fingerprint": fingerprint["fingerprint"]}
        start, losses, elapsed_before, resumed_from = 0, [], 0.0, None
        ck = read_checkpoint(out / CHECKPOINT_DIR)
        if ck is not None:
            ck_info, tensors = ck
            for key in ("config_hash", "method_digest", "base_fingerprint"):
                if ck_info.get(key) != info[key]:
                    raise ValueError(f"the checkpoint in {str(out / CHECKPOINT_DIR)!r} belongs to a different job "
                                     f"({key} differs); remove it to start over")
            restore_checkpoint(tensors, trained, optimizer, ctx.rng)
            method.load_extra_state(method_state(tensors))
            start = resumed_from = int(ck_info["step"])
            losses = list(ck_info.get("losses", []))
            elapsed_before = float(ck_info.get("elapsed_s", 0.0))
        if acc.num_processes > 1:
            for c, m in components.items():
                if ctx._trains(c):
                    ctx.wrapped[c] = torch.nn.parallel.DistributedDataParallel(m)
        opt = acc.prepare(optimizer)
        label = f"erase {config.method} {config.concept[0]!r}"
        bar = tqdm(total=config.steps, initial=start, desc=label, disable=not (progress and acc.is_main_process))
        t_loop = time.perf_counter()
        for step in range(start, config.steps):
            opt.zero_grad(set_to_none=True)
            loss, logs = method.loss(ctx)
            method.backward(ctx, loss)
            method.transform_gradients(ctx, trained)
            opt.step()
            value = float(acc.reduce(loss.detach().reshape(1), reduction="mean"))
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}")
            done = step + 1
            if done % config.checkpoint_every == 0 and done < config.steps:
                if acc.is_main_process:
                    elapsed = elapsed_before + time.perf_counter() - t0
                    save_checkpoint(out / CHECKPOINT_DIR, done, trained, optimizer, ctx.rng,
                                    {**info, "losses": losses, "elapsed_s": elapsed}, extra=method.extra_state())
                acc.wait_for_everyone()
        bar.close()
        loop_s = time.perf_counter() - t_loop
        wall = elapsed_before + time.perf_counter() - t0
        tail = losses[-max(1, min(10, len(losses))):]
        metrics = {
            "final_loss": sum(tail) / len(tail), "losses": losses, "steps": config.steps,
            "wall_time_s": wall, "loop_s_per_step": loop_s / max(config.steps - start, 1),
            "num_processes": acc.num_processes, "device": str(acc.device), "trained_tensors": len(trained),
            "trained_weights": sum(p.numel() for p in trained.values()), **_peak_memory(acc.device),
            **method.summary(),
        }
        sidecar = {
            "method": config.method, "concept": list(config.concept), "anchor": config.anchor,
            "retain_prompts": list(config.retain_prompts), "seed": config.seed, "base_model": fingerprint,
            "hyperparameters": config.to_dict(), "config_hash": config.config_hash(), "metrics": metrics,
            "resumed_from": resumed_from, "diffkit_version": __version__, "torch_version": torch.__version__,
        }
        if lora is not None:
            state = lora.state_dicts()
            _release(components, flags, enabled_checkpointing, lora)  # the modules are the pipeline's own again
            lora = None
            if acc.is_main_process:
                write_lora_artifact(out, state, LoraParametrization(config.lora_rank, config.lora_alpha), modules,
                                    sidecar)
                shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
            acc.wait_for_everyone()
            ok = True
            pipe.load_erasure(out)  # the merged W0 + (alpha / r) B A, exactly what loading the artifact gives
            return ErasureResult(out, read_sidecar(out), "resumed" if resumed_from is not None else "trained",
                                 resumed_from)
        if acc.is_main_process:
            write_artifact(out, {q: p.detach() for q, p in trained.items()}, sidecar, masks=method.artifact_masks())
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
        acc.wait_for_everyone()
        ok = True
        pipe.register_erasure(str(out), read_sidecar(out) if is_complete(out) else sidecar, originals_cpu)
        return ErasureResult(out, sidecar, "resumed" if resumed_from is not None else "trained", resumed_from)
    finally:
        if not ok and originals_cpu and lora is None:
            with torch.no_grad():
                for q, p in trained.items():
                    p.copy_(originals_cpu[q].to(device=p.device, dtype=p.dtype))
        _release(components, flags, enabled_checkpointing, lora)


def _release(components, flags, enabled_checkpointing: list, lora: InjectedLora | None) -> None:
    """Undo the job's changes to the modules (idempotent): a LoRA's layers, gradient flags, checkpointing."""
    if lora is not None:
        lora.remove()  # first: the flags below are per parameter of the pipeline's own modules
    for c, m in components.items():
        grads, training = flags[c]
        for p, g in zip(m.parameters(), grads):
            p.requires_grad_(g)
            p.grad = None
        m.train(training)
    for c, m in enabled_checkpointing:
        (m.disable_gradient_checkpointing if c == "unet" else m.gradient_checkpointing_disable)()
    enabled_checkpointing.clear()
