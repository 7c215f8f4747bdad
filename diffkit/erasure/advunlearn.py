"""AdvUnlearn — Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion
Models (Zhang, Chen, Jia, Zhang, Fan, Liu, Liu; NeurIPS 2024).

Bi-level adversarial training (paper eq. 5):

    min_theta  l_u(theta, c + delta*) + gamma l_r(theta, C_retain),
    delta* = argmin_delta  || eps_theta(x_t, c + delta, t) - eps_orig(x_t, c, t) ||^2

* **Inner attack** (lower level): a soft prefix delta of ``prefix_tokens`` word embeddings (reference:
  1 token) placed after the start token, optimised so that the model being unlearned reproduces the
  *original* model's concept prediction at x_t. ``attack: adam`` is the reference's PGD (30 Adam steps,
  lr 1e-3); ``attack: sign`` is the paper's fast variant (``attack_steps`` gradient-sign steps, default
  1). The prefix persists across steps (the reference's ``attack_init: latest``), starting from
  random vocabulary tokens; it is part of the checkpoint. The attack reuses
  :func:`diffkit.erasure.attack.optimize_prefix` (gradients w.r.t. the prefix only).
* **Upper level**: ESD's loss on the adversarial prompt,
  l_u = || eps_theta(x_t, c + delta*, t) - [eps_orig(x_t, a, t) - eta (eps_orig(x_t, c, t) - eps_orig(x_t, t))] ||^2,
  plus gamma (reference 0.3) x the utility-retaining loss on ``retain_batch`` (reference 5) retain prompts,
  l_r = || eps_theta(x_r, c_r, t) - eps_orig(x_r, c_r, t) ||^2, x_r sampled by the original model from c_r.
* The first ``warmup_steps`` (reference: 200 of 1000; default: 20% of the job) run without the attack.
* What trains: the **text encoder** (preset ``text-encoder``: all transformer layers and the final layer
  norm, embeddings frozen), the paper's recommended choice, so the artifact is a plug-and-play text
  encoder for any pipeline sharing that encoder. On SDXL both text encoders train (less what SDXL never
  reads, see ``diffkit.erasure.selection``) and the prefix is one token in both word-embedding spaces.

One (x_t, t) drawn per outer step serves both the attack and the outer loss (the reference draws a fresh
x_t for each of its 30 attack steps; one draw is 30x cheaper to sample and keeps the attack aimed at the
sample it is trained on). Forward passes bypass DDP; gradients — the model's and the attack prefix's —
are averaged over processes explicitly, so the prefix is the same on every process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attack import UPDATES, optimize_prefix, random_prefix
from .esd import esd_batch
from .method import ErasureMethod, MethodConfig, check_option, is_number, is_whole, register_method
from .surgery import all_reduce_mean, backward_reduced, embed_unwrapped

ATTACK_INITS = ("latest", "random")


class _MeanGradAcrossProcesses(torch.autograd.Function):
    """Identity forward; the backward averages the gradient over processes (a shared attack prefix)."""

    @staticmethod
    def forward(ctx, x, training_ctx):
        ctx.training_ctx = training_ctx
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        all_reduce_mean(ctx.training_ctx, [grad])
        return grad, None


@dataclass(frozen=True)
class AdvUnlearnConfig(MethodConfig):
    """AdvUnlearn's options (``options:`` keys; ``eta`` is the job's top-level ESD strength).

    gamma: weight of the utility-retaining loss (reference 0.3); retain_batch: retain prompts per step
    (reference 5); attack: ``adam`` (the reference's 30-step PGD) or ``sign`` (the fast variant);
    attack_steps: inner steps (None: 30 for adam, 1 for sign); attack_lr (reference 1e-3);
    prefix_tokens: soft tokens of the adversarial prefix (reference 1); attack_init: ``latest`` (the
    reference: the prefix persists across steps) or ``random``; warmup_steps: outer steps without the
    attack (None: 20% of the job, the reference's 200 of 1000).
    """

    job_fields = ("eta",)

    eta: float = 1.0
    gamma: float = 0.3
    retain_batch: int = 5
    attack: str = "adam"
    attack_steps: int | None = None
    attack_lr: float = 1e-3
    prefix_tokens: int = 1
    attack_init: str = "latest"
    warmup_steps: int | None = None

    def __post_init__(self):
        check_option("gamma", self.gamma, is_number(self.gamma) and self.gamma >= 0, ">= 0")
        r = self.retain_batch
        check_option("retain_batch", r, is_whole(r) and r >= 1, "an integer >= 1")
        check_option("attack", self.attack, self.attack in UPDATES, f"one of {UPDATES}")
        steps = self.attack_steps
        check_option("attack_steps", steps, steps is None or (is_whole(steps) and steps >= 1),
                     "an integer >= 1 (or null)")
        check_option("attack_lr", self.attack_lr, is_number(self.attack_lr) and self.attack_lr > 0, "> 0")
        k = self.prefix_tokens
        check_option("prefix_tokens", k, is_whole(k) and 1 <= k <= 16, "an integer in [1, 16]")
        check_option("attack_init", self.attack_init, self.attack_init in ATTACK_INITS, f"one of {ATTACK_INITS}")
        w = self.warmup_steps
        check_option("warmup_steps", w, w is None or (is_whole(w) and w >= 0), "an integer >= 0 (or null)")


@register_method
class AdvUnlearn(ErasureMethod):
    """AdvUnlearn on the text encoder: ESD on adversarial prompts + gamma x utility-retaining loss."""

    name = "advunlearn"
    config_class = AdvUnlearnConfig
    defaults = {"parameters": "text-encoder", "lr": 1e-5, "batch_size": 1}
    supports_sdxl = True  # the preset covers both SDXL text encoders; the prefix lives in both embedding spaces

    @classmethod
    def validate(cls, config) -> None:
        if config.method_config.gamma > 0 and not config.retain_prompts:
            raise ValueError("method 'advunlearn' needs retain_prompts for its utility-retaining loss when "
                             "options.gamma > 0; give retain prompts or set options.gamma: 0")

    def __init__(self, config):
        super().__init__(config)
        c = self.cfg
        self.attack_steps = c.attack_steps or (30 if c.attack == "adam" else 1)
        self.warmup_steps = round(0.2 * config.steps) if c.warmup_steps is None else c.warmup_steps
        self.prefix: torch.Tensor | None = None
        self.steps_done = 0
        self.attack_curves: list[tuple[float, float]] = []

    @property
    def preservation_weight(self) -> float:
        return float(self.cfg.gamma)

    # --- the inner attack -------------------------------------------------------------------------
    def attack(self, ctx, prompts: list[str], x_t, t, concept_target) -> tuple[torch.Tensor, list[float]]:
        """delta* = argmin || eps_theta(x_t, c + delta, t) - eps_orig(x_t, c, t) ||^2 from the current init."""
        c = self.cfg
        if self.prefix is None or c.attack_init == "random":
            init = random_prefix(ctx.prompts, c.prefix_tokens, ctx.rng)
        else:
            init = self.prefix.to(ctx.device)

        def embed(prefix):
            shared = _MeanGradAcrossProcesses.apply(prefix, ctx) if ctx.num_processes > 1 else prefix
            with ctx.accelerator.autocast():
                return ctx.prompts.encode(prompts, shared).float()

        def loss_fn(embeds, i):
            return F.mse_loss(ctx.predict(x_t, t, embeds, wrapped=False), concept_target)

        prefix, curve = optimize_prefix(embed, loss_fn, init, steps=self.attack_steps, lr=c.attack_lr,
                                        update=c.attack)
        return prefix, curve

    # --- losses -----------------------------------------------------------------------------------
    def loss(self, ctx):
        cfg = self.config
        prompts, x_t, t, pred_c, target = esd_batch(ctx, cfg, self.cfg.eta)
        logs = {}
        prefix = None
        if self.steps_done >= self.warmup_steps:
            prefix, curve = self.attack(ctx, prompts, x_t, t, pred_c)
            self.prefix = prefix
            self.attack_curves.append((curve[0], curve[-1]))
            logs.update(attack_loss_first=curve[0], attack_loss_last=curve[-1])
        self.steps_done += 1
        pred = ctx.predict(x_t, t, embed_unwrapped(ctx, prompts, prefix), wrapped=False)
        erase_loss = F.mse_loss(pred, target)
        logs["esd_loss"] = float(erase_loss.detach())
        gamma = self.cfg.gamma
        if cfg.preserve_gradient or gamma == 0:  # surgery (surgery.PreserveGradient) handles l_r itself
            return erase_loss, logs
        retain = self.preservation_loss(ctx)
        logs["retain_loss"] = float(retain.detach())
        return erase_loss + gamma * retain, logs

    def preservation_loss(self, ctx) -> torch.Tensor:
        """The utility-retaining loss l_r on ``retain_batch`` retain prompts (reference: ``retain_train='reg'``)."""
        cfg = self.config
        r = self.cfg.retain_batch
        idx = ctx.local(ctx.randint(r, len(cfg.retain_prompts)))
        stop = ctx.local(ctx.randint(r, cfg.sample_steps))
        noise = ctx.local(ctx.randn(r))
        prompts = [cfg.retain_prompts[i] for i in idx.tolist()]
        x_r, t_r = ctx.sample(prompts, stop, noise)
        target = ctx.predict(x_r, t_r, ctx.embed(prompts, original=True), original=True)
        pred = ctx.predict(x_r, t_r, embed_unwrapped(ctx, prompts), wrapped=False)
        return F.mse_loss(pred, target)

    def backward(self, ctx, loss):
        backward_reduced(ctx, loss)  # forward passes bypass DDP: explicit all-reduce

    # --- checkpoint state and summary -----------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"steps_done": torch.tensor([self.steps_done], dtype=torch.int64)}
        if self.prefix is not None:
            state["adversarial_prefix"] = self.prefix.detach().cpu()
        return state

    def load_extra_state(self, tensors) -> None:
        if "steps_done" in tensors:
            self.steps_done = int(tensors["steps_done"][0])
        if "adversarial_prefix" in tensors:
            self.prefix = tensors["adversarial_prefix"].float()

    def summary(self) -> dict:
        c = self.attack_curves
        return {"attack": self.cfg.attack, "attack_steps": self.attack_steps, "warmup_steps": self.warmup_steps,
                "attacked_steps": len(c),
                "attack_loss_first_mean": sum(a for a, _ in c) / len(c) if c else None,
                "attack_loss_last_mean": sum(b for _, b in c) / len(c) if c else None}
