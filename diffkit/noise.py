"""The noise-level adapter: one place for eps / v / x0 and alpha / sigma conversions, per scheduler.

k-diffusion's lesson: adapt the model once, at the boundary. Guidance (APG, CFG++ steps), inversion,
erasure (training targets, DoCo's x0 estimate, the attacks), the reference model's training and the
demo all convert through this module; nothing else in diffkit restates these formulas.

Two entry points give a :class:`NoiseLevel`:

* :func:`noise_level` — sampling: the scheduler's own coefficients at the step it takes at a timestep;
* :func:`training_level` — training: the VP coefficients ``sqrt(abar_t)``, ``sqrt(1 - abar_t)`` of a
  batch of integer timesteps (shaped to broadcast over latents), as ``scheduler.add_noise`` uses them.

and the same pure functions convert at either: :func:`to_denoised`, :func:`to_epsilon`,
:func:`from_denoised`, :func:`add_noise` (``x_t = a x0 + b eps``) and :func:`prediction_target` (what a
model of a prediction type is trained to output: eps, ``v = alpha eps - sigma x0`` or x0).

Every supported scheduler writes its *own* sample as ``x = a * D + b * eps`` at the current step, with
coefficients it computes itself:

* VP schedulers indexed by timestep (DDIM, DDPM, PNDM): ``a = sqrt(alphas_cumprod[t])``,
  ``b = sqrt(1 - alphas_cumprod[t])``;
* VP schedulers indexed by sigma (DPM-Solver multistep, UniPC, DEIS):
  ``a, b = scheduler._sigma_to_alpha_sigma_t(sigmas[step_index])``;
* k-diffusion schedulers (Euler, Euler ancestral, Heun): the sample is ``x_vp / alpha``, so ``a = 1`` and
  ``b = sigmas[step_index]``.

v-prediction is defined on the VP sample ``x_vp = alpha D + sigma eps`` (Salimans & Ho 2022):
``v = alpha eps - sigma D``, hence ``D = alpha x_vp - sigma v`` and ``eps = sigma x_vp + alpha v``. For the
k-diffusion samplers ``alpha = 1 / sqrt(sigma_k^2 + 1)``, which gives diffusers' Euler form
``D = x / (sigma_k^2 + 1) - v sigma_k / sqrt(sigma_k^2 + 1)``.

The step index is the scheduler's own (``step_index``); before the first ``step`` of a call it is still
``None`` for some schedulers, and then the scheduler's own ``index_for_timestep`` rule (or its
``begin_index``) gives the index ``step`` is about to use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Schedulers whose sample is VP and whose level is alphas_cumprod[timestep].
ALPHAS_CUMPROD_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler")
#: Schedulers whose sample is VP and whose level is sigmas[step_index] through _sigma_to_alpha_sigma_t.
VP_SIGMA_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
#: Schedulers in k-diffusion form: the sample is x_vp / alpha and the level is sigmas[step_index].
KARRAS_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler")
SUPPORTED_SCHEDULERS = ALPHAS_CUMPROD_SCHEDULERS + VP_SIGMA_SCHEDULERS + KARRAS_SCHEDULERS

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

__all__ = [
    "ALPHAS_CUMPROD_SCHEDULERS", "KARRAS_SCHEDULERS", "PREDICTION_TYPES", "SUPPORTED_SCHEDULERS",
    "VP_SIGMA_SCHEDULERS", "NoiseLevel", "add_noise", "current_step_index", "from_denoised", "noise_level",
    "prediction_target", "to_denoised", "to_epsilon", "training_level",
]


@dataclass(frozen=True)
class NoiseLevel:
    """Coefficients of one step: the scheduler's sample is ``a * D + b * eps``; ``x_vp = (alpha / a) * x``.

    ``alpha`` and ``sigma`` are the VP coefficients (``alpha^2 + sigma^2 = 1``) that define v-prediction.
    """

    a: torch.Tensor
    b: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor

    def to(self, ref: torch.Tensor) -> NoiseLevel:
        """The same coefficients on ``ref``'s device (dtype kept: the schedulers compute in their own)."""
        return NoiseLevel(*(torch.as_tensor(c).to(ref.device) for c in (self.a, self.b, self.alpha, self.sigma)))


def _unsupported(scheduler) -> ValueError:
    return ValueError(
        f"{type(scheduler).__name__} is not supported for converting predictions; supported schedulers: "
        f"{', '.join(sorted(SUPPORTED_SCHEDULERS))}"
    )


def current_step_index(scheduler, timestep) -> int:
    """The index into ``scheduler.sigmas`` that ``scheduler.step(..., timestep, ...)`` is about to use."""
    if getattr(scheduler, "step_index", None) is not None:
        return int(scheduler.step_index)
    if getattr(scheduler, "begin_index", None) is not None:
        return int(scheduler.begin_index)
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.to(scheduler.timesteps.device)
    return int(scheduler.index_for_timestep(timestep))


def noise_level(scheduler, timestep) -> NoiseLevel:
    """The scheduler's own coefficients (a, b, alpha, sigma) at the step it takes at ``timestep``."""
    name = type(scheduler).__name__
    if name in ALPHAS_CUMPROD_SCHEDULERS:
        t = int(timestep)
        alpha_prod = scheduler.alphas_cumprod[t]
        a, b = alpha_prod**0.5, (1 - alpha_prod) ** 0.5
        return NoiseLevel(a, b, a, b)
    if name in VP_SIGMA_SCHEDULERS:
        if scheduler.config.get("use_flow_sigmas", False):
            raise ValueError(f"{name} with use_flow_sigmas=True is a flow-matching schedule; not supported")
        sigma = scheduler.sigmas[current_step_index(scheduler, timestep)]
        alpha_t, sigma_t = scheduler._sigma_to_alpha_sigma_t(sigma)
        return NoiseLevel(alpha_t, sigma_t, alpha_t, sigma_t)
    if name in KARRAS_SCHEDULERS:
        sigma = scheduler.sigmas[current_step_index(scheduler, timestep)]
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return NoiseLevel(torch.ones_like(sigma), sigma, alpha, sigma * alpha)
    raise _unsupported(scheduler)


def training_level(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> NoiseLevel:
    """VP coefficients of integer ``timesteps`` (a batch), shaped ``(B, 1, 1, 1)`` in float32.

    ``a = alpha = sqrt(abar_t)`` and ``b = sigma = sqrt(1 - abar_t)``: the forward process
    ``q(x_t | x_0) = N(alpha x_0, sigma^2 I)`` of DDPM (Ho et al. 2020, eq. 4).
    """
    t = torch.as_tensor(timesteps).reshape(-1).long()
    abar = alphas_cumprod.to(t.device)[t].float().reshape(-1, 1, 1, 1)
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    return NoiseLevel(alpha, sigma, alpha, sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """``x_t = a x0 + b eps`` (equals ``scheduler.add_noise`` for VP schedulers at a training level)."""
    level = level.to(x0)
    return level.a * x0 + level.b * noise


def prediction_target(x0: torch.Tensor, noise: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """What a model of ``prediction_type`` is trained to predict: eps, ``v = alpha eps - sigma x0`` or x0.

    v-prediction as defined by Salimans & Ho (2022, Sec. 4) on the VP sample; equals diffusers'
    ``scheduler.get_velocity``.
    """
    _check_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    level = level.to(x0)
    if prediction_type == "v_prediction":
        return level.alpha * noise - level.sigma * x0
    return x0


def _check_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _to_vp(sample: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
    """``x_vp = (alpha / a) x``. For VP schedulers ``a`` is ``alpha`` and the ratio is 1 exactly, also at a
    zero-terminal-SNR schedule's last step, where both are 0 and the plain quotient would be 0 / 0 = NaN."""
    same = torch.as_tensor(level.alpha == level.a)
    ratio = torch.where(same, torch.ones_like(torch.as_tensor(level.alpha)), level.alpha / level.a)
    return sample * ratio


def to_denoised(pred: torch.Tensor, sample: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """D from the model's prediction: ``(x - b eps) / a``; ``alpha x_vp - sigma v``; or the sample itself."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return (sample - level.b * pred) / level.a
    if prediction_type == "v_prediction":
        return level.alpha * _to_vp(sample, level) - level.sigma * pred
    return pred


def to_epsilon(pred: torch.Tensor, sample: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """eps from the model's prediction: itself; ``sigma x_vp + alpha v``; or ``(x - a D) / b``."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return level.sigma * _to_vp(sample, level) + level.alpha * pred
    return (sample - level.a * pred) / level.b


def from_denoised(denoised: torch.Tensor, sample: torch.Tensor, level: NoiseLevel,
                  prediction_type: str) -> torch.Tensor:
    """The model's prediction type from D (inverse of :func:`to_denoised` at the same sample and level)."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return (sample - level.a * denoised) / level.b
    if prediction_type == "v_prediction":
        return (level.alpha * _to_vp(sample, level) - denoised) / level.sigma
    return denoised
