"""Concept-preserving gradient (Wu et al., "Unlearning Concepts in Diffusion Model via Concept Domain
Correction", AAAI 2025): gradient surgery between an unlearning gradient g_u and a preservation
gradient g_p. Two rules live here.

**The reference code's rule** (:func:`reference_correction`, DoCo's default; its ``adjust_gradient``):

1. both gradients are clipped to norm ``max_norm`` (1.0) over all trained tensors together, as
   ``torch.nn.utils.clip_grad_norm_`` does (scale min(1, max_norm / (||g|| + 1e-6)));
2. per parameter tensor, with unit vectors u = g_u / (||g_u|| + 1e-8), p = g_p / (||g_p|| + 1e-8) and
   cos = u . p: where cos < 0,   g_u  <-  g_u - lambda cos p   (lambda = 1);
3. only the adjusted g_u is applied; g_p itself is never added to the update.

The correction has the size lambda |cos| whatever ||g_u|| is, so it is *not* the exact projection: for
a clipped g_u smaller than 1 it overshoots past orthogonality towards g_p.

**The paper's text rule** (:func:`project_conflicting`, and :class:`PreserveGradient` for any method):
where g_u . g_p < 0 remove the component along g_p exactly,

    g_u  <-  g_u - (g_u . g_p / ||g_p||^2) g_p,

so a step along the result does not (to first order) increase the preservation loss; the update applied
is  surgery(g_u, g_p) + w g_p  (the preservation loss keeps its own gradient, weight w). The two rules
agree only for lambda = 1 and ||g_u|| = 1 (after clipping).

Granularity: both rules work **per parameter tensor** (each tensor's gradients flattened), as DoCo's
reference does per cross-attention tensor. A zero g_p leaves g_u untouched.

:class:`PreserveGradient` wraps any erasure method (``ErasureConfig(preserve_gradient=True)``, CLI
``--preserve-gradient``) with the paper's rule: it takes the method's loss as the unlearning loss and the
method's own ``preservation_loss(ctx)`` where it has one (AdvUnlearn's utility-retaining loss),
otherwise :class:`PriorPreservation`: the ordinary diffusion loss on latents the original model
generated from the retain prompts (the anchor prompt when none are given). DoCo applies its own rule
(``diffkit.erasure.doco``; the engine does not wrap it).

Data-parallel: both gradients are averaged over processes *before* the surgery, so every process
applies the same transform to the global-batch gradients (the result does not depend on the process
count). Forward passes here bypass DDP and gradients are all-reduced explicitly (:func:`all_reduce_mean`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .method import ErasureMethod


def project_conflicting(g_u: torch.Tensor, g_p: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The paper's rule on one tensor: (g_u - (g_u.g_p / ||g_p||^2) g_p, True) if g_u.g_p < 0, else (g_u, False).

    Computed in float64 for the dot products; the result has g_u's dtype and shape.
    """
    if g_u.shape != g_p.shape:
        raise ValueError(f"gradients must have the same shape, got {tuple(g_u.shape)} and {tuple(g_p.shape)}")
    u, p = g_u.detach().double().reshape(-1), g_p.detach().double().reshape(-1)
    dot = torch.dot(u, p)
    sq = torch.dot(p, p)
    if not bool(dot < 0) or not bool(sq > 0):
        return g_u, False
    return (u - (dot / sq) * p).reshape(g_u.shape).to(g_u.dtype), True


def clip_global_norm(grads: dict[str, torch.Tensor], max_norm: float) -> dict[str, torch.Tensor]:
    """``torch.nn.utils.clip_grad_norm_`` on copies: all tensors scaled by min(1, max_norm / (||g|| + 1e-6)),
    ||g|| the norm over every tensor together."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    total = torch.sqrt(sum((g.detach().double() ** 2).sum() for g in grads.values())) if grads else 0.0
    scale = min(1.0, float(max_norm / (total + 1e-6)))
    return {q: g * scale for q, g in grads.items()}


def correct_conflicting(g_u: torch.Tensor, g_p: torch.Tensor, lam: float = 1.0) -> tuple[torch.Tensor, bool]:
    """The reference rule on one tensor: g_u - lam cos unit(g_p) where cos = unit(g_u) . unit(g_p) < 0.

    Unit vectors use the reference's +1e-8 in the norms. Returns (g_u adjusted or unchanged, conflicted).
    """
    if g_u.shape != g_p.shape:
        raise ValueError(f"gradients must have the same shape, got {tuple(g_u.shape)} and {tuple(g_p.shape)}")
    u, p = g_u.detach().double().reshape(-1), g_p.detach().double().reshape(-1)
    unit_p = p / (torch.linalg.vector_norm(p) + 1e-8)
    cos = torch.dot(u / (torch.linalg.vector_norm(u) + 1e-8), unit_p)
    if not bool(cos < 0):
        return g_u, False
    return (u - lam * cos * unit_p).reshape(g_u.shape).to(g_u.dtype), True


def reference_correction(unlearn: dict[str, torch.Tensor], preserve: dict[str, torch.Tensor], lam: float = 1.0,
                         max_norm: float = 1.0) -> tuple[dict[str, torch.Tensor], int]:
    """DoCo's reference concept-preserving gradient: clip both gradient sets to ``max_norm`` (globally),
    then per tensor :func:`correct_conflicting`. Returns (the adjusted g_u only, number of conflicting
    tensors); g_p is not part of the result."""
    if set(unlearn) != set(preserve):
        raise ValueError("unlearn and preserve gradients must name the same tensors")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    g_u, g_p = clip_global_norm(unlearn, max_norm), clip_global_norm(preserve, max_norm)
    out, conflicts = {}, 0
    for q in g_u:
        out[q], hit = correct_conflicting(g_u[q], g_p[q], lam)
        conflicts += hit
    return out, conflicts


def concept_preserving_gradients(unlearn: dict[str, torch.Tensor], preserve: dict[str, torch.Tensor],
                                 weight: float = 0.0) -> tuple[dict[str, torch.Tensor], int]:
    """Per tensor: surgery(g_u, g_p) + weight x g_p. Returns (gradients, number of conflicting tensors)."""
    if set(unlearn) != set(preserve):
        raise ValueError("unlearn and preserve gradients must name the same tensors")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight!r}")
    out, conflicts = {}, 0
    for q, g_u in unlearn.items():
        g, hit = project_conflicting(g_u, preserve[q])
        conflicts += hit
        out[q] = g + weight * preserve[q] if weight else g
    return out, conflicts


def all_reduce_mean(ctx, tensors) -> None:
    """Average tensors in place over the data-parallel processes (no-op for one process)."""
    if ctx.num_processes <= 1:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)
        t.div_(ctx.num_processes)


def grads_of(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    """Each parameter's ``.grad`` (zeros where it received none)."""
    return {q: (p.grad if p.grad is not None else torch.zeros_like(p)) for q, p in params.items()}


def backward_reduced(ctx, loss: torch.Tensor) -> None:
    """``accelerator.backward`` for a loss computed without DDP, then the explicit gradient all-reduce."""
    ctx.accelerator.backward(loss)
    all_reduce_mean(ctx, [p.grad for p in ctx.trainable.values() if p.grad is not None])


def embed_unwrapped(ctx, prompts: list[str], prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Conditioning from the trained text encoder without DDP (gradients flow where it trains)."""
    if not ctx.trains_text_encoder() and prefix is None:
        with torch.no_grad():
            return ctx.prompts.encode(prompts)
    with ctx.accelerator.autocast():
        return ctx.prompts.encode(prompts, prefix, cache=False).float()  # a training encoder: never cached


class PriorPreservation:
    """Diffusion loss on the original model's images of the preservation prompts (DreamBooth/DoCo prior
    preservation): || eps_theta(x_t, c_r, t) - eps ||^2, x_t = q(x_t | x_0) of a generated x_0."""

    def __init__(self, config, prompts: tuple[str, ...] | None = None):
        self.prompts_source = tuple(prompts) if prompts else (tuple(config.retain_prompts) or (config.anchor,))
        self.config = config

    def prepare(self, ctx, latents: torch.Tensor | None = None) -> None:
        """Generate ``num_images`` images of the preservation prompts (or use ``latents``, one per prompt
        of the cycled prompt list, when the caller already has them)."""
        n = self.config.num_images if latents is None else len(latents)
        self.prompts = [self.prompts_source[i % len(self.prompts_source)] for i in range(n)]
        self.latents = ctx.generate(self.prompts, ctx.prepare_rng) if latents is None else latents

    def loss(self, ctx) -> torch.Tensor:
        n = self.config.batch_size
        i = ctx.local(ctx.randint(n, len(self.prompts)))
        t = ctx.local(ctx.randint(n, ctx.num_train_timesteps)).to(ctx.device)
        noise = ctx.local(ctx.randn(n))
        x0 = self.latents[i.to(ctx.device)]
        x_t = ctx.add_noise(x0, noise, t)
        pred = ctx.predict(x_t, t, embed_unwrapped(ctx, [self.prompts[j] for j in i.tolist()]), wrapped=False)
        return F.mse_loss(pred, ctx.diffusion_target(x0, noise, t))


class PreserveGradient(ErasureMethod):
    """Wraps an erasure method: its loss is the unlearning loss; the update is the paper-text surgery
    surgery(g_u, g_p) + w g_p (w: the method's ``preservation_weight``, else ``config.beta``)."""

    def __init__(self, inner: ErasureMethod):
        self.inner = inner
        self.config = inner.config
        self.cfg = inner.cfg
        self.name = inner.name
        own = getattr(inner, "preservation_loss", None)
        self.preservation = None if own is not None else PriorPreservation(inner.config)
        self.weight = float(getattr(inner, "preservation_weight", inner.config.beta))
        self.conflicts, self.tensor_steps = 0, 0

    # needs_original: the inner method's choice (the default preservation loss does not use the original)
    @property
    def needs_original(self):
        return self.inner.needs_original

    def prepare(self, ctx, params):
        trained = self.inner.prepare(ctx, params)
        if self.preservation is not None:
            self.preservation.prepare(ctx)
        return trained

    def preservation_loss(self, ctx) -> torch.Tensor:
        own = getattr(self.inner, "preservation_loss", None)
        return own(ctx) if own is not None else self.preservation.loss(ctx)

    def loss(self, ctx):
        return self.inner.loss(ctx)

    def backward(self, ctx, loss):
        params = ctx.trainable
        self.inner.backward(ctx, loss)  # all-reduced g_u (through DDP or explicitly)
        g_u = {q: g.detach().clone() for q, g in grads_of(params).items()}
        for p in params.values():
            p.grad = None
        backward_reduced(ctx, self.preservation_loss(ctx))
        g_p = grads_of(params)
        new, conflicts = concept_preserving_gradients(g_u, g_p, self.weight)
        for q, p in params.items():
            p.grad = new[q]
        self.conflicts += conflicts
        self.tensor_steps += len(params)

    def transform_gradients(self, ctx, params):
        self.inner.transform_gradients(ctx, params)

    def artifact_masks(self):
        return self.inner.artifact_masks()

    def state_digest(self):
        return self.inner.state_digest()

    def extra_state(self):
        return self.inner.extra_state()

    def load_extra_state(self, tensors):
        self.inner.load_extra_state(tensors)

    def summary(self):
        # Counts cover the steps run in this process (a resumed job counts from its resume point).
        return {**self.inner.summary(), "surgery_conflicting_tensor_steps": self.conflicts,
                "surgery_tensor_steps": self.tensor_steps, "preservation_weight": self.weight}
