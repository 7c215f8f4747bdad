"""Conversions between a model's prediction, the denoised estimate D (x0) and the noise epsilon.

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


def _check_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def to_denoised(pred: torch.Tensor, sample: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """D from the model's prediction: ``(x - b eps) / a``; ``alpha x_vp - sigma v``; or the sample itself."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return (sample - level.b * pred) / level.a
    if prediction_type == "v_prediction":
        return level.alpha * (sample * (level.alpha / level.a)) - level.sigma * pred
    return pred


def to_epsilon(pred: torch.Tensor, sample: torch.Tensor, level: NoiseLevel, prediction_type: str) -> torch.Tensor:
    """eps from the model's prediction: itself; ``sigma x_vp + alpha v``; or ``(x - a D) / b``."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return level.sigma * (sample * (level.alpha / level.a)) + level.alpha * pred
    return (sample - level.a * pred) / level.b


def from_denoised(denoised: torch.Tensor, sample: torch.Tensor, level: NoiseLevel,
                  prediction_type: str) -> torch.Tensor:
    """The model's prediction type from D (inverse of :func:`to_denoised` at the same sample and level)."""
    _check_type(prediction_type)
    level = level.to(sample)
    if prediction_type == "epsilon":
        return (sample - level.a * denoised) / level.b
    if prediction_type == "v_prediction":
        return (level.alpha * (sample * (level.alpha / level.a)) - denoised) / level.sigma
    return denoised
