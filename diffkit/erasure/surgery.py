"""Concept-preserving gradient (Wu et al., "Unlearning Concepts in Diffusion Model via Concept Domain
Correction", 2024): gradient surgery between an unlearning and a preservation gradient.

Where the unlearning gradient g_u conflicts with the preservation gradient g_p (g_u . g_p < 0), its
component along g_p is removed (the paper's rule):

    g_u  <-  g_u - (g_u . g_p / ||g_p||^2) g_p        if g_u . g_p < 0,   else g_u unchanged,

so a step along the result does not (to first order) increase the preservation loss. The update then
applied is  surgery(g_u, g_p) + w g_p  (the preservation loss keeps its own gradient, weight w).

Granularity: the rule is applied **per parameter tensor** (each tensor's g_u and g_p are flattened into
vectors), as DoCo's reference code does per cross-attention key/value tensor. The reference writes the
correction as lambda cos(g_u, g_p) ||g_u|| unit(g_p), which for lambda = 1 equals the paper's
projection above; we implement the paper's rule (no lambda). A zero g_p leaves g_u untouched.

The transform wraps any erasure method (``ErasureConfig(preserve_gradient=True)``, CLI
``--preserve-gradient``): :class:`PreserveGradient` takes the method's loss as the unlearning loss and
the method's own ``preservation_loss(ctx)`` where it has one (AdvUnlearn's utility-retaining loss,
DoCo's prior preservation), otherwise :class:`PriorPreservation`: the ordinary diffusion loss on
latents the original model generated from the retain prompts (the anchor prompt when none are given).

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
    if not ctx._trains("text_encoder") and prefix is None:
        with torch.no_grad():
            return ctx.prompts.encode(prompts)
    with ctx.accelerator.autocast():
        return ctx.prompts.encode(prompts, prefix).float()


class PriorPreservation:
    """Diffusion loss on the original model's images of the preservation prompts (DreamBooth/DoCo prior
    preservation): || eps_theta(x_t, c_r, t) - eps ||^2, x_t = q(x_t | x_0) of a generated x_0."""

    def __init__(self, config):
        self.prompts_source = tuple(config.retain_prompts) or (config.anchor,)
        self.config = config

    def prepare(self, ctx) -> None:
        n = self.config.num_images
        self.prompts = [self.prompts_source[i % len(self.prompts_source)] for i in range(n)]
        self.latents = ctx.generate(self.prompts, ctx.prepare_rng)

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
    """Wraps an erasure method: its loss is the unlearning loss; the update is the concept-preserving
    gradient surgery(g_u, g_p) + w g_p (w: the method's ``preservation_weight``, else ``config.beta``)."""

    def __init__(self, inner: ErasureMethod):
        self.inner = inner
        self.config = inner.config
        self.options = inner.options
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
