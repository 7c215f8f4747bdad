"""EcoDiff mask learning: hard-concrete masks trained end to end on the final latent of the trajectory.

Objective (per prompt p with seed s_p; z_T^mask and z_T^orig the final latents of the masked and the
original model from the same initial noise):

    L = MSE(z_T^mask, z_T^orig) + beta * R(lambda)
    R = mean over modules of ||lambda||_1 / n        ("l1", EcoDiff's)
      or mean over modules of sum_i P(m_i > 0) / n    ("l0", expected L0, Louizos eq. 12)

Gradients come from time-step gradient checkpointing (``trajectory.reverse_walk``): one step's
activations at a time. The mask noise of denoising step i is drawn from a generator seeded by
(seed, prompt, optimizer step, i), so a step's recomputation sees the mask its forward pass saw.

Runs under accelerate: each process takes its share of every global batch of prompts; the logit
gradients are averaged across processes before the AdamW step. Mixed precision (``bf16``
recommended; ``fp16`` has no loss scaling here) autocasts the U-Net; logits, masks' gradients and the
scheduler arithmetic stay float32. Logits and optimizer state are
checkpointed (safetensors + JSON, atomic) and a run restarted with the same directory resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..artifacts import CheckpointStore
from ..lifecycle import Touch, features_of
from .hard_concrete import HardConcrete
from .masking import MaskAttachment
from .spec import BaseModelMismatch, check_base, module_fingerprint
from .trajectory import Conditioning, Sampler, capture_conditioning, reverse_walk, run_trajectory, seed_for
from .units import KINDS, Unit, find_units

PENALTIES = ("l1", "l0")
MIXED_PRECISION = ("no", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MaskLearningConfig:
    """Hyper-parameters; defaults follow EcoDiff's SDXL recipe (beta 0.5, AdamW lr 0.1, 4 epochs)."""

    kinds: tuple[str, ...] = KINDS
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    epochs: int = 4
    batch_size: int = 1
    lr: float = 0.1
    beta: float = 0.5
    penalty: str = "l1"
    seed: int = 0
    height: int | None = None
    width: int | None = None
    eta: float = 0.0
    checkpointing: bool = True
    mixed_precision: str = "no"
    checkpoint_every: int = 10
    hard_concrete: HardConcrete = field(default_factory=HardConcrete)

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        for name in ("num_inference_steps", "epochs", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if self.penalty not in PENALTIES:
            raise ValueError(f"penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}")

    def to_json(self) -> dict:
        d = asdict(self)
        d["kinds"] = list(self.kinds)
        return d


class MaskLogits(torch.nn.Module):
    """One learnable logit per unit, one tensor per module, ordered as ``units``; keyed by module name."""

    def __init__(self, units: list[Unit], init: float = 3.0, device=None):
        super().__init__()
        self.units = list(units)
        self.logits = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.full((u.size,), float(init), device=device)) for u in self.units]
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {u.name: p for u, p in zip(self.units, self.logits)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for u, p in zip(self.units, self.logits):
            if u.name not in tensors or tensors[u.name].shape != p.shape:
                raise ValueError(f"checkpoint logits do not match this U-Net's units (module {u.name})")
            with torch.no_grad():
                p.copy_(tensors[u.name])

    def sample_masks(self, hc: HardConcrete, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Relaxed masks with fresh noise from ``generator`` (drawn in unit order: reproducible)."""
        out = {}
        for u, p in zip(self.units, self.logits):
            noise = torch.rand(u.size, generator=generator).to(p.device)
            out[u.name] = hc.sample(p, noise)
        return out

    def penalty(self, kind: str, hc: HardConcrete) -> torch.Tensor:
        if kind == "l1":
            terms = [p.abs().sum() / p.numel() for p in self.logits]
        else:
            terms = [hc.expected_l0(p).sum() / p.numel() for p in self.logits]
        return torch.stack(terms).mean()


def masked_step_fn(sampler: Sampler, attachment: MaskAttachment, logits: MaskLogits, hc: HardConcrete,
                   cond: Conditioning, prompt_seed: int, opt_step: int):
    """``step(z, i)`` of the masked model; the mask noise is seeded by (prompt, optimizer step, i)."""

    def step(z, i):
        gen = torch.Generator("cpu").manual_seed(seed_for(prompt_seed, opt_step, i))
        attachment.state.masks = logits.sample_masks(hc, gen)
        try:
            return sampler.step(z, i, cond, prompt_seed)
        finally:
            attachment.state.masks = {}

    return step


def plain_step_fn(sampler: Sampler, cond: Conditioning, prompt_seed: int):
    return lambda z, i: sampler.step(z, i, cond, prompt_seed)


def logit_gradients(step_fn, z0, target, params, num_steps: int, checkpointing: bool = True):
    """(MSE of the final latent vs ``target``, d MSE / d params) by the reverse walk or plain backprop."""
    if checkpointing:
        latents = run_trajectory(step_fn, z0, num_steps)
        final = latents[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            mse = F.mse_loss(final.float(), target.float())
            (g,) = torch.autograd.grad(mse, final)
        return mse.detach(), reverse_walk(step_fn, latents, g, params)
    with torch.enable_grad():
        z = z0
        for i in range(num_steps):
            z = step_fn(z, i)
        mse = F.mse_loss(z.float(), target.float())
        grads = torch.autograd.grad(mse, params, allow_unused=True)
    return mse.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


@dataclass
class MaskLearningResult:
    logits: dict[str, torch.Tensor]
    units: list[Unit]
    history: list[dict]
    config: MaskLearningConfig
    steps_done: int
    num_processes: int = 1


#: Mask-learning checkpoints: ``masks-<step>.safetensors`` (logits + AdamW state) and the pointer
#: ``masks.json`` (step, history, config, prompts digest, U-Net fingerprint), via the artifact kernel's
#: :class:`~diffkit.artifacts.CheckpointStore`: one pointer switch, so a kill never leaves mixed state.
CKPT_STEM = "masks"
CKPT_STATE = CKPT_STEM + ".json"


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(prompts)).encode()).hexdigest()


def save_checkpoint(directory: Path, logits: MaskLogits, opt, step: int, history, config, prompts,
                    unet_fingerprint: dict | None = None) -> None:
    tensors = {f"logits/{k}": v for k, v in logits.as_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"optim/{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    CheckpointStore(directory, CKPT_STEM).save(step, tensors, {
        "history": history, "config": config.to_json(), "prompts_sha256": prompts_digest(prompts),
        "num_prompts": len(prompts), "unet_fingerprint": unet_fingerprint})


def units_fingerprint(unet, units: list[Unit]) -> dict:
    """The kernel fingerprint of every parameter of the units' modules (what the masks apply to)."""
    return module_fingerprint(unet, [u.name for u in units])


def load_checkpoint(directory: Path, logits: MaskLogits, opt, config: MaskLearningConfig, prompts,
                    unet=None) -> tuple[int, list]:
    found = CheckpointStore(directory, CKPT_STEM).load()
    if found is None:
        raise ValueError(f"no mask-learning checkpoint in {directory}")
    state, flat = found
    # Masks learned on one U-Net mean nothing on another: refuse rather than resume them.
    if unet is not None:
        recorded = state.get("unet_fingerprint")
        if recorded is None or "architecture" in recorded:
            raise ValueError(f"checkpoint in {directory} does not record which U-Net it was made for; remove it "
                             f"(or use another checkpoint directory) to learn the masks anew")
        try:
            check_base(recorded, unet)
        except BaseModelMismatch as e:
            what = "architecture" if "architecture" in str(e) else "weights"
            raise ValueError(f"checkpoint in {directory} was made for a U-Net with other {what}; remove it or use "
                             f"another checkpoint directory") from None
    if state.get("prompts_sha256") != prompts_digest(prompts):
        raise ValueError(f"checkpoint in {directory} was made with other prompts ({state.get('num_prompts')} "
                         f"prompts); use another checkpoint directory or the same prompts")
    saved = {k: v for k, v in state["config"].items() if k not in ("epochs", "checkpoint_every")}
    mine = {k: v for k, v in config.to_json().items() if k not in ("epochs", "checkpoint_every")}
    if saved != mine:
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        raise ValueError(f"checkpoint in {directory} was made with other settings ({', '.join(diff)}); "
                         f"use another checkpoint directory or the same settings")
    logits.load({k[len("logits/"):]: v for k, v in flat.items() if k.startswith("logits/")})
    sd = opt.state_dict()
    st: dict = {}
    for key, v in flat.items():
        if key.startswith("optim/"):
            i, name = key[len("optim/"):].split(".", 1)
            st.setdefault(int(i), {})[name] = v
    sd["state"] = st
    opt.load_state_dict(sd)
    return int(state["step"]), list(state["history"])


def learn_masks(pipe, prompts: list[str], config: MaskLearningConfig | None = None, *,
                checkpoint_dir=None, accelerator=None, progress: bool = True,
                stop_after: int | None = None) -> MaskLearningResult:
    """Learn EcoDiff masks for ``pipe``'s U-Net on ``prompts``; resume from ``checkpoint_dir`` if present.

    ``stop_after``: return after that many optimizer steps of this call (a controlled interruption).
    """
    from accelerate import Accelerator

    config = config or MaskLearningConfig()
    if not prompts:
        raise ValueError("prompts must not be empty")
    if accelerator is None:
        # No mixed_precision argument: accelerate's state is a per-process singleton that refuses a
        # second, different value; autocast is applied below from the config (or `accelerate launch`'s).
        accelerator = Accelerator(cpu=pipe.unet.device.type == "cpu" and not torch.cuda.is_available())
    device = accelerator.device
    precision = config.mixed_precision if config.mixed_precision != "no" else str(accelerator.mixed_precision)
    if precision in AUTOCAST_DTYPES:
        autocast = functools.partial(torch.autocast, device_type=device.type, dtype=AUTOCAST_DTYPES[precision])
    else:
        autocast = nullcontext
    pipe.to(device)
    unet = pipe.unet
    fs = features_of(pipe)
    fs.refuse(("pruning",), "mask learning", "learn masks on the unpruned model (pipe.unload_pruning())")
    with fs.suspended(Touch.UNET_FORWARD, "mask learning"):
        registry = getattr(unet, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            raise ValueError(
                f"the U-Net has active hooks ({', '.join(registry.hooks)}), which would change the trajectory; "
                f"remove them before mask learning"
            )
        return _learn(pipe, unet, prompts, config, accelerator, device, autocast, checkpoint_dir, progress,
                      stop_after)


def _learn(pipe, unet, prompts, config, accelerator, device, autocast, checkpoint_dir, progress, stop_after):
    unet.requires_grad_(False)
    unet.eval()
    hc = config.hard_concrete
    units = find_units(unet, config.kinds)
    if not units:
        raise ValueError(f"this U-Net has no prunable units of kinds {config.kinds}")
    logits = MaskLogits(units, hc.init, device=device)
    params = list(logits.logits)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    sampler = Sampler(unet, pipe.scheduler, config.num_inference_steps, config.guidance_scale, device,
                      eta=config.eta, autocast=autocast)

    n, world, rank = len(prompts), accelerator.num_processes, accelerator.process_index
    global_batch = config.batch_size * world
    steps_per_epoch = math.ceil(n / global_batch)
    total = steps_per_epoch * config.epochs
    step, history = 0, []
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    unet_fp = units_fingerprint(unet, units) if ckpt is not None else None
    if ckpt is not None and CheckpointStore(ckpt, CKPT_STEM).exists():
        step, history = load_checkpoint(ckpt, logits, opt, config, prompts, unet=unet)

    conds: dict[int, Conditioning] = {}
    targets: dict[int, torch.Tensor] = {}

    def prepare(j: int):
        if j not in conds:
            with torch.no_grad():
                conds[j] = capture_conditioning(pipe, prompts[j], config.guidance_scale, config.height, config.width)
                z0 = sampler.initial_latent(conds[j].latent_shape, seed_for(config.seed, j))
                targets[j] = run_trajectory(plain_step_fn(sampler, conds[j], j), z0, sampler.num_steps)[-1]
        return conds[j], targets[j]

    stop_at = total if stop_after is None else min(total, step + stop_after)
    bar = tqdm(total=total, initial=step, desc="mask learning", disable=not (progress and accelerator.is_main_process))
    with MaskAttachment(unet, units) as attachment:
        while step < stop_at:
            epoch, within = divmod(step, steps_per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(config.seed, epoch)))
            batch = [perm[(within * global_batch + k) % n].item() for k in range(global_batch)]
            local = batch[rank::world]
            grads = [torch.zeros_like(p) for p in params]
            mse_sum = torch.zeros((), device=device)
            for j in local:
                cond, target = prepare(j)
                z0 = sampler.initial_latent(cond.latent_shape, seed_for(config.seed, j))
                fn = masked_step_fn(sampler, attachment, logits, hc, cond, seed_for(config.seed, j), step)
                mse, g = logit_gradients(fn, z0, target, params, sampler.num_steps, config.checkpointing)
                mse_sum += mse.float()
                for acc, gi in zip(grads, g):
                    acc += gi.float() / len(local)
            flat = torch.cat([g.reshape(-1) for g in grads] + [mse_sum.reshape(1) / len(local)])
            if world > 1:
                flat = accelerator.reduce(flat, reduction="mean")
            with torch.enable_grad():
                reg = logits.penalty(config.penalty, hc)
                reg_grads = torch.autograd.grad(config.beta * reg, params)
            reg = reg.detach()
            offset = 0
            for p, rg in zip(params, reg_grads):
                p.grad = flat[offset: offset + p.numel()].view_as(p) + rg
                offset += p.numel()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            mse_val = float(flat[-1])
            reg_val = float(reg)
            history.append({"step": step, "mse": mse_val, "penalty": reg_val, "loss": mse_val + config.beta * reg_val})
            bar.update(1)
            bar.set_postfix(mse=f"{mse_val:.3g}", reg=f"{float(reg):.3g}")
            if ckpt is not None and (step % config.checkpoint_every == 0 or step == stop_at):
                if accelerator.is_main_process:
                    save_checkpoint(ckpt, logits, opt, step, history, config, prompts, unet_fp)
                accelerator.wait_for_everyone()
    bar.close()
    out = {k: v.detach().float().cpu().clone() for k, v in logits.as_dict().items()}
    return MaskLearningResult(out, units, history, config, step, world)
