"""Adversarial prompt attacks on an erased model and their success rate.

Two attacks, chosen with ``attack_success_rate(..., attack=...)``:

* ``"unlearndiffatk"`` (**default**): UnlearnDiffAtk as its reference code does it, discrete tokens, the
  image generated from the token ids (:mod:`diffkit.erasure.unlearndiffatk`). It is the attack the erasure
  papers report, so its success rates are the comparable ones.
* ``"soft-prompt"``: the continuous relaxation kept continuous, a named *stronger* attack. The attacker owns
  ``k`` soft tokens placed after the start token (word-embedding space, not restricted to the vocabulary)
  and minimises the erased model's ordinary diffusion loss on latents x_0 of an image that shows the
  concept (made by the original model):

      min_P  E_{t, eps} || eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c(P ; prompt)) - eps ||^2

  i.e. it finds the prompt under which the erased model best reconstructs the concept image (the
  paper's "diffusion classifier" view), then generates from the soft prompt itself. No user can type such a
  prompt, which is why it is stronger than any discrete attack and not comparable with the papers' ASR.

Either way the attacked prompt generates an image and the judge (the oracle) reads it; the attack success
rate (ASR) is the share of prompts whose image shows the concept (prompts that already show it without
attack count as successes, as in UnlearnDiffAtk's ``check_asr.py``). ``AttackReport.hits`` gives the
per-prompt outcomes for a rate with its interval (``diffkit.evaluation.stats.rate``).

:func:`optimize_prefix` is the soft attack's inner loop on its own (any differentiable loss of the
conditioning), for adversarial training (AdvUnlearn's inner maximisation) to reuse; ``update="sign"`` is the
fast one-step gradient-sign variant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from ..noise import add_noise, prediction_target, training_level
from .conditioning import PromptEncoder, refuse_sdxl
from .fields import check_choice, check_integers, check_number
from .sampling import ddim_scheduler
from .unlearndiffatk import UnlearnDiffAtkConfig, unlearndiffatk_batch

UPDATES = ("adam", "sign")
ATTACKS = ("unlearndiffatk", "soft-prompt")


@dataclass(frozen=True)
class AttackConfig:
    """The soft-prompt attack. prefix_tokens: soft tokens (UnlearnDiffAtk: 5); steps, lr, update: the inner
    optimisation; num_inference_steps, guidance_scale: generation with the attacked prompt; seed: all draws."""

    prefix_tokens: int = 5
    steps: int = 40
    lr: float = 0.01
    update: str = "adam"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0

    def __post_init__(self):
        check_integers(self, ("prefix_tokens", "steps", "num_inference_steps"))
        check_number(self, "lr", positive=True)
        check_choice(self, "update", UPDATES)
        check_number(self, "guidance_scale")


def optimize_prefix(
    embed: Callable[[torch.Tensor], torch.Tensor],
    loss_fn: Callable[[torch.Tensor, int], torch.Tensor],
    init: torch.Tensor,
    *,
    steps: int,
    lr: float,
    update: str = "adam",
) -> tuple[torch.Tensor, list[float]]:
    """Minimise ``loss_fn(embed(prefix), i)`` over the soft prefix, starting at ``init`` (k, D).

    embed(prefix) -> conditioning (e.g. ``PromptEncoder.encode(prompts, prefix)``); the loss may be
    any differentiable function of it. Only the prefix moves: gradients are taken with
    ``torch.autograd.grad`` so no model parameter's ``.grad`` is touched. Returns (prefix, losses).
    """
    if update not in UPDATES:
        raise ValueError(f"update must be one of {UPDATES}, got {update!r}")
    prefix = init.detach().clone().float().requires_grad_(True)
    opt = torch.optim.Adam([prefix], lr=lr) if update == "adam" else None
    losses = []
    for i in range(steps):
        with torch.enable_grad():
            loss = loss_fn(embed(prefix), i)
            (grad,) = torch.autograd.grad(loss, [prefix])
        losses.append(float(loss.detach()))
        with torch.no_grad():
            if opt is None:
                prefix -= lr * grad.sign()
            else:
                prefix.grad = grad
                opt.step()
                prefix.grad = None
    return prefix.detach(), losses


def diffusion_attack_loss(unet, scheduler, target_latents: torch.Tensor, generator: torch.Generator):
    """UnlearnDiffAtk's objective as a ``loss_fn`` for :func:`optimize_prefix`: the erased model's
    diffusion loss on ``target_latents`` (concept image latents) at a fresh (t, eps) each call."""
    prediction_type = scheduler.config.prediction_type
    T = int(scheduler.config.num_train_timesteps)

    def loss_fn(embeds: torch.Tensor, i: int) -> torch.Tensor:
        b = target_latents.shape[0]
        t = torch.randint(0, T, (b,), generator=generator).to(target_latents.device)
        noise = torch.randn(target_latents.shape, generator=generator).to(target_latents)
        level = training_level(scheduler.alphas_cumprod, t)
        x_t = add_noise(target_latents, noise, level).to(target_latents.dtype)
        target = prediction_target(target_latents, noise, level, prediction_type)
        emb = embeds.expand(b, -1, -1) if embeds.shape[0] == 1 else embeds
        pred = unet(x_t, t, encoder_hidden_states=emb.to(unet.dtype)).sample.float()
        return F.mse_loss(pred, target.float())

    return loss_fn


def random_prefix(source, k: int, generator: torch.Generator) -> torch.Tensor:
    """Word embeddings of k random vocabulary tokens (UnlearnDiffAtk starts from random tokens).

    ``source``: a text encoder, or a :class:`PromptEncoder` (its prefix space: on SDXL both encoders' tables
    side by side, so each drawn token is that token for both encoders); the same draws either way.
    """
    table = source.word_embeddings() if isinstance(source, PromptEncoder) else source.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (k,), generator=generator).to(table.device)
    return table[ids].detach().float()


@dataclass
class AttackReport:
    """ASR over prompts; ``pre_attack_rate``: share judged to show the concept without any attack.

    ``hits`` (= ``success``) are the per-prompt outcomes, ``n`` the number of prompts. UnlearnDiffAtk also
    fills ``adversarial_prompts`` (decoded text), ``prompt_ids`` (the token ids each judged image was
    generated from) and ``evaluations`` (attacked generations judged before it stopped)."""

    asr: float
    pre_attack_rate: float
    success: list[bool]
    pre_attack: list[bool]
    losses: list[list[float]] = field(default_factory=list)
    images: torch.Tensor | None = None  # (N, 3, H, W) in [0, 1], the attacked prompts' images
    attack: str = "soft-prompt"
    adversarial_prompts: list[str] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    evaluations: list[int] = field(default_factory=list)
    settings: dict = field(default_factory=dict)

    @property
    def hits(self) -> list[bool]:
        return list(self.success)

    @property
    def n(self) -> int:
        return len(self.success)

    def to_dict(self) -> dict:
        out = {"attack": self.attack, "asr": self.asr, "k": sum(self.success), "n": self.n,
               "pre_attack_rate": self.pre_attack_rate, "success": self.success, "pre_attack": self.pre_attack,
               "loss_first": [c[0] if c else None for c in self.losses],
               "loss_last": [c[-1] if c else None for c in self.losses], "settings": self.settings}
        if self.attack == "unlearndiffatk":
            out.update(adversarial_prompts=self.adversarial_prompts, prompt_ids=self.prompt_ids,
                       evaluations=self.evaluations)
        return out


def _resolve_attack(attack: str | None, config):
    """(attack name, config): the name from ``config``'s type when not given; UnlearnDiffAtk by default."""
    if attack is None:
        attack = "soft-prompt" if isinstance(config, AttackConfig) else "unlearndiffatk"
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    want = UnlearnDiffAtkConfig if attack == "unlearndiffatk" else AttackConfig
    if config is None:
        config = want()
    if not isinstance(config, want):
        raise ValueError(f"attack {attack!r} takes a {want.__name__}, got {type(config).__name__}")
    return attack, config


def attack_success_rate(
    pipe,
    prompts: Sequence[str],
    judge: Callable[[torch.Tensor], Sequence[bool]],
    target_latents: torch.Tensor,
    config: AttackConfig | UnlearnDiffAtkConfig | None = None,
    *,
    attack: str | None = None,
) -> AttackReport:
    """Attack every prompt of ``prompts`` on (erased) ``pipe`` and judge the images with ``judge``.

    attack: "unlearndiffatk" (default; config an :class:`UnlearnDiffAtkConfig`, the reference settings when
    None) or "soft-prompt" (config an :class:`AttackConfig`); when only ``config`` is given its type names
    the attack. target_latents: (N, C, h, w), one concept image's latents per prompt (from the original
    model). judge(images (B, 3, H, W) in [0, 1]) -> one bool per image: does it show the concept?
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must hold at least one prompt to attack")
    if target_latents.shape[0] != len(prompts):
        raise ValueError(f"target_latents must hold one latent per prompt ({len(prompts)}), "
                         f"got {target_latents.shape[0]}")
    attack, config = _resolve_attack(attack, config)
    if attack == "soft-prompt":
        report = soft_prompt_success_rate(pipe, prompts, judge, target_latents, config)
    else:
        results = unlearndiffatk_batch(pipe, prompts, judge, target_latents, config)
        success = [r.success for r in results]
        pre = [r.pre_attack for r in results]
        report = AttackReport(sum(success) / len(prompts), sum(pre) / len(prompts), success, pre,
                              [r.losses for r in results], torch.cat([r.image for r in results]),
                              attack="unlearndiffatk", adversarial_prompts=[r.text for r in results],
                              prompt_ids=[r.prompt_ids for r in results], evaluations=[r.evaluations for r in results])
    report.settings = {"attack": attack, **asdict(config)}
    return report


def soft_prompt_success_rate(
    pipe,
    prompts: Sequence[str],
    judge: Callable[[torch.Tensor], Sequence[bool]],
    target_latents: torch.Tensor,
    config: AttackConfig = AttackConfig(),
) -> AttackReport:
    """The soft-prompt attack on every prompt (see :func:`attack_success_rate`); SD 1.x/2.x pipelines only."""
    refuse_sdxl(pipe, "the soft-prompt attack")
    device = pipe.unet.device
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, device, cache=False)
    scheduler = ddim_scheduler(pipe.scheduler.config, 1000)
    gen = torch.Generator().manual_seed(config.seed)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    flags = [p.requires_grad for p in params]
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    success, pre, losses, images = [], [], [], []
    try:
        neg = encoder.encode([""]).detach()
        for i, prompt in enumerate(prompts):
            plain = _generate(pipe, encoder.encode([prompt]).detach(), neg, config, i)
            loss_fn = diffusion_attack_loss(pipe.unet, scheduler, target_latents[i:i + 1].to(device), gen)
            init = random_prefix(pipe.text_encoder, config.prefix_tokens, gen)
            prefix, curve = optimize_prefix(lambda p, pr=prompt: encoder.encode([pr], p), loss_fn, init,
                                            steps=config.steps, lr=config.lr, update=config.update)
            with torch.no_grad():
                attacked = _generate(pipe, encoder.encode([prompt], prefix), neg, config, i)
            verdict = [bool(v) for v in judge(torch.cat([plain, attacked]))]
            pre.append(verdict[0])
            success.append(verdict[0] or verdict[1])
            losses.append(curve)
            images.append(attacked)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return AttackReport(sum(success) / len(prompts), sum(pre) / len(prompts), success, pre, losses,
                        torch.cat(images), attack="soft-prompt")


@torch.no_grad()
def _generate(pipe, embeds, neg, config: AttackConfig, index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(config.seed + index)
    dtype = pipe.unet.dtype
    out = pipe(prompt_embeds=embeds.to(dtype), negative_prompt_embeds=neg.to(dtype), generator=gen,
               num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
               output_type="pt")
    return out.images.float().cpu()
