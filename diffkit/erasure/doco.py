"""DoCo — Unlearning Concepts in Diffusion Model via Concept Domain Correction (Wu et al., 2024).

Concept-domain correction aligns the *output domain* of the sensitive concept c with that of an anchor
concept a by adversarial training, which generalises erasure to prompts outside the unlearn set
(synonyms, paraphrases):

* A PatchGAN discriminator D sees 4-channel predicted clean latents
  x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)   (v-prediction: sqrt(abar_t) x_t - sqrt(1 - abar_t) v).
  "Real": the frozen model's x0_hat for the anchor prompt on the anchor's trajectory; "fake": the
  trained model's x0_hat for the concept prompt on the concept's trajectory (both x_t drawn by the
  original model's DDIM sampler, ESD-style, stopped at the same step so they share t).
* Alternating updates every step, as in the reference code: first one discriminator step
  (BCE, real -> 1, fake (detached) -> 0), then the generator step on
  L_G = adversarial_weight x BCE(D(x0_hat_fake), 1) + anchor_weight x || eps_theta(x_t, c) - sg[target] ||^2,
  target = eps_orig(x_t, a) (``target: anchor``, the paper's anchor loss) or ESD's
  eps_orig(x_t, a) - eta (eps_orig(x_t, c) - eps_orig(x_t, "")) (``target: esd``).
* Warm-up: for the first ``discriminator_warmup`` steps D trains alone (the generator's unlearning
  loss is multiplied by 0). The reference warms up for 1000 steps; the default here is a quarter of the
  job's steps so short CPU jobs still train the generator.
* Concept-preserving gradient (``preserve_gradient``, on by default for this method): the generator's
  gradient is corrected against the prior-preservation gradient (diffusion loss on the original model's
  images of the retain prompts, or of the anchor when none are given; weight ``prior_weight``, reference
  1.0) by :mod:`diffkit.erasure.surgery`, per cross-attention key/value tensor (the default trained
  tensors, preset ``esd-x-strict``). With ``preserve_gradient: false`` the two losses are summed.

Discriminator details: PatchGAN (pix2pix) with 4x4 stride-2 convolutions, GroupNorm instead of BatchNorm
(so its output does not depend on how the batch is split over processes), and as many downsampling
layers as the latent side allows (``discriminator_layers``, at most log2(side) - 1). Its gradients are
all-reduced explicitly over processes; its weights, Adam state and the step counter are checkpointed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..noise import to_denoised, training_level
from .esd import esd_target
from .method import ErasureMethod, register_method
from .surgery import PriorPreservation, all_reduce_mean, backward_reduced, embed_unwrapped

TARGETS = ("anchor", "esd")


class PatchDiscriminator(torch.nn.Module):
    """PatchGAN on (B, C, h, w) latents -> (B, 1, h', w') real/fake logits, one per patch."""

    def __init__(self, in_channels: int = 4, channels: int = 64, layers: int = 3, side: int | None = None):
        super().__init__()
        if side is not None:
            layers = max(1, min(layers, int(math.log2(side)) - 1))
        self.layers = layers
        mods: list[torch.nn.Module] = [torch.nn.Conv2d(in_channels, channels, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers):
            out = channels * min(2 ** i, 8)
            mods += [torch.nn.Conv2d(width, out, 4, 2, 1, bias=False), torch.nn.GroupNorm(1, out),
                     torch.nn.LeakyReLU(0.2)]
            width = out
        out = channels * min(2 ** layers, 8)
        mods += [torch.nn.Conv2d(width, out, 3, 1, 1, bias=False), torch.nn.GroupNorm(1, out), torch.nn.LeakyReLU(0.2),
                 torch.nn.Conv2d(out, 1, 3, 1, 1)]
        self.net = torch.nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def predicted_x0(x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor, alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon") -> torch.Tensor:
    """x0_hat from the model output: (x_t - sqrt(1-abar) eps)/sqrt(abar), or sqrt(abar) x_t - sqrt(1-abar) v."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction)")
    return to_denoised(pred, x_t, training_level(alphas_cumprod, t.to(x_t.device)), prediction_type)


def _check(name, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"options.{name} must be {allowed}, got {value!r}")


@register_method
class DoCo(ErasureMethod):
    """Concept-domain correction (adversarial, PatchGAN on x0_hat) + anchor loss + concept-preserving gradient."""

    name = "doco"
    defaults = {"parameters": "esd-x-strict", "lr": 5e-5, "batch_size": 4, "preserve_gradient": True}
    option_defaults = {"discriminator_lr": 5e-4, "discriminator_warmup": None, "adversarial_weight": 1.0,
                       "anchor_weight": 1.0, "prior_weight": 1.0, "target": "anchor", "discriminator_channels": 64,
                       "discriminator_layers": 3}

    @classmethod
    def validate(cls, config) -> None:
        super().validate(config)
        o = {**cls.option_defaults, **config.options}
        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)
        _check("discriminator_lr", o["discriminator_lr"], num(o["discriminator_lr"]) and o["discriminator_lr"] > 0,
               "> 0")
        w = o["discriminator_warmup"]
        _check("discriminator_warmup", w, w is None or (whole(w) and w >= 0), "an integer >= 0 (or null)")
        for key in ("adversarial_weight", "anchor_weight", "prior_weight"):
            _check(key, o[key], num(o[key]) and o[key] >= 0, ">= 0")
        _check("target", o["target"], o["target"] in TARGETS, f"one of {TARGETS}")
        c = o["discriminator_channels"]
        _check("discriminator_channels", c, whole(c) and c >= 1, "an integer >= 1")
        n = o["discriminator_layers"]
        _check("discriminator_layers", n, whole(n) and 1 <= n <= 6, "an integer in [1, 6]")
        if o["adversarial_weight"] == 0 and o["anchor_weight"] == 0:
            raise ValueError("method 'doco' needs options.adversarial_weight or options.anchor_weight > 0 "
                             "(both are 0: nothing would be unlearned)")

    def __init__(self, config):
        super().__init__(config)
        w = self.options["discriminator_warmup"]
        self.warmup = config.steps // 4 if w is None else w
        self.steps_done = 0
        self.prior = PriorPreservation(config)
        self.history: list[tuple[float, float]] = []  # (D loss, D accuracy) per step

    @property
    def preservation_weight(self) -> float:
        return float(self.options["prior_weight"])

    def prepare(self, ctx, params):
        o = self.options
        # The discriminator's initial weights come from the job's prepare RNG (same on every process).
        seed = int(torch.randint(0, 2**62, (1,), generator=ctx.prepare_rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminator = PatchDiscriminator(ctx.latent_shape[0], o["discriminator_channels"],
                                                    o["discriminator_layers"], side=ctx.latent_shape[-1])
        self.discriminator.to(ctx.device).requires_grad_(False)
        self.d_params = list(self.discriminator.parameters())
        self.d_opt = torch.optim.Adam(self.d_params, lr=o["discriminator_lr"], betas=(0.5, 0.999))
        self.alphas_cumprod = ctx.scheduler.alphas_cumprod
        self.prior.prepare(ctx)
        return params

    def x0(self, ctx, x_t, t, pred):
        return predicted_x0(x_t, t, pred, self.alphas_cumprod, ctx.prediction_type)

    def discriminator_step(self, ctx, real: torch.Tensor, fake: torch.Tensor) -> tuple[float, float]:
        """One BCE step of D (real -> 1, fake -> 0) with gradients averaged over processes; (loss, accuracy)."""
        self.discriminator.requires_grad_(True)
        try:
            logits_r, logits_f = self.discriminator(real), self.discriminator(fake)
            loss = (F.binary_cross_entropy_with_logits(logits_r, torch.ones_like(logits_r))
                    + F.binary_cross_entropy_with_logits(logits_f, torch.zeros_like(logits_f)))
            self.d_opt.zero_grad(set_to_none=False)
            loss.backward()
            all_reduce_mean(ctx, [p.grad for p in self.d_params])
            self.d_opt.step()
        finally:
            self.discriminator.requires_grad_(False)
        acc = float(((logits_r > 0).float().mean() + (logits_f < 0).float().mean()) / 2)
        return float(loss.detach()), acc

    def loss(self, ctx):
        cfg, o = self.config, self.options
        n = cfg.batch_size
        which = ctx.local(ctx.randint(n, len(cfg.concept)))
        stop = ctx.local(ctx.randint(n, cfg.sample_steps))
        noise_c, noise_a = ctx.local(ctx.randn(n)), ctx.local(ctx.randn(n))
        prompts = [cfg.concept[i] for i in which.tolist()]
        b = len(prompts)
        # Concept and anchor trajectories in one sampling run; the same stop gives both the same t.
        x, tt = ctx.sample(prompts + [cfg.anchor] * b, torch.cat([stop, stop]), torch.cat([noise_c, noise_a]))
        x_c, x_a = x[:b], x[b:]
        t = tt[:b]
        with torch.no_grad():
            conds = prompts + [""] * b + [cfg.anchor] * b + [cfg.anchor] * b
            preds = ctx.predict(torch.cat([x_c, x_c, x_c, x_a]), t.repeat(4), ctx.embed(conds, original=True),
                                original=True).chunk(4)
            pred_c, pred_u, pred_a, pred_real = preds
            target = pred_a if o["target"] == "anchor" else esd_target(pred_c, pred_u, pred_a, cfg.eta)
            real = self.x0(ctx, x_a, t, pred_real)
        pred = ctx.predict(x_c, t, embed_unwrapped(ctx, prompts), wrapped=False)
        fake = self.x0(ctx, x_c, t, pred)
        d_loss, d_acc = self.discriminator_step(ctx, real, fake.detach())
        self.history.append((d_loss, d_acc))
        logits = self.discriminator(fake)
        adversarial = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
        anchor = F.mse_loss(pred, target)
        warm = self.steps_done < self.warmup
        self.steps_done += 1
        unlearn = o["adversarial_weight"] * adversarial + o["anchor_weight"] * anchor
        if warm:
            unlearn = unlearn * 0.0  # the discriminator trains alone; the generator gets no unlearning gradient
        logs = {"d_loss": d_loss, "d_accuracy": d_acc, "adversarial_loss": float(adversarial.detach()),
                "anchor_loss": float(anchor.detach()), "warmup": warm}
        if cfg.preserve_gradient or o["prior_weight"] == 0:  # surgery.PreserveGradient adds the prior's gradient
            return unlearn, logs
        prior = self.preservation_loss(ctx)
        logs["prior_loss"] = float(prior.detach())
        return unlearn + o["prior_weight"] * prior, logs

    def preservation_loss(self, ctx) -> torch.Tensor:
        return self.prior.loss(ctx)

    def backward(self, ctx, loss):
        backward_reduced(ctx, loss)  # forward passes bypass DDP: explicit all-reduce

    # --- checkpoint state and summary -----------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {"steps_done": torch.tensor([self.steps_done], dtype=torch.int64)}
        for name, p in self.discriminator.named_parameters():
            state[f"discriminator/{name}"] = p.detach()
        for i, entry in self.d_opt.state_dict()["state"].items():
            for key, value in entry.items():
                state[f"discriminator_adam/{i}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        return state

    def load_extra_state(self, tensors) -> None:
        self.steps_done = int(tensors["steps_done"][0])
        with torch.no_grad():
            for name, p in self.discriminator.named_parameters():
                p.copy_(tensors[f"discriminator/{name}"].to(p.device))
        sd = self.d_opt.state_dict()
        state = {}
        for i, p in enumerate(self.d_params):
            prefix = f"discriminator_adam/{i}/"
            entry = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if entry:
                state[i] = {k: (v if k == "step" else v.to(p.device)) for k, v in entry.items()}
        self.d_opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

    def summary(self) -> dict:
        tail = self.history[-10:]
        return {"discriminator_warmup": self.warmup, "discriminator_layers": self.discriminator.layers,
                "discriminator_weights": sum(p.numel() for p in self.d_params),
                "discriminator_loss_last": sum(a for a, _ in tail) / len(tail) if tail else None,
                "discriminator_accuracy_last": sum(b for _, b in tail) / len(tail) if tail else None}
