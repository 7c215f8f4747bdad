"""Scheduler step rules for guidance results that carry a separate re-noising prediction (CFG++).

A plain guidance result (one prediction) goes through the scheduler's own ``step``. A result with
``renoise_pred`` needs a rule that knows the scheduler's update: it forms the denoised estimate from
``pred`` and steps to the next noise level with ``renoise_pred``. Rules are registered per scheduler
class name; :func:`step_rule_for` raises a ``ValueError`` listing the supported schedulers.

A rule is ``rule(scheduler, real_step, out, ctx, step_kwargs) -> prev_sample``. ``real_step`` is the
scheduler's own bound ``step``, which rules may call to keep the scheduler's internal bookkeeping
(step index, multistep history) exactly as diffusers keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..noise import current_step_index, noise_level, to_denoised, to_epsilon

STEP_RULES: dict[str, Callable] = {}


def register_step_rule(*scheduler_names: str):
    def deco(fn):
        for name in scheduler_names:
            STEP_RULES[name] = fn
        return fn

    return deco


def step_rule_for(scheduler, guidance_name: str = "this guidance") -> Callable:
    name = type(scheduler).__name__
    if name in STEP_RULES:
        return STEP_RULES[name]
    supported = ", ".join(sorted(STEP_RULES)) or "none"
    raise ValueError(
        f"{guidance_name} re-noises with a separate prediction and needs a step rule for the scheduler; "
        f"{name} has none. Supported schedulers: {supported}."
    )


# --------------------------------------------------------------------------------------------------
# CFG++ steps (Chung et al., ICLR 2025). Each rule forms the denoised estimate D_lambda from ``out.pred``
# and takes the step back to the next noise level with the re-noising prediction ``out.renoise_pred``
# (D_u, eps_u), with the scheduler's own coefficients. Rules for stateful schedulers also run the
# scheduler's real ``step`` on the re-noising prediction, so that its step index, multistep history and
# random-number use advance exactly as diffusers advances them, and then return their own sample.
# --------------------------------------------------------------------------------------------------


def ddim_cfgpp_step(denoised: torch.Tensor, eps_renoise: torch.Tensor, alpha_prod_prev) -> torch.Tensor:
    """CFG++ DDIM (eta = 0, the paper's sampler): ``x_prev = sqrt(a_prev) D_lambda + sqrt(1 - a_prev) eps_u``."""
    return alpha_prod_prev**0.5 * denoised + (1 - alpha_prod_prev) ** 0.5 * eps_renoise


def euler_cfgpp_step(sample, denoised, denoised_renoise, sigma, sigma_next) -> torch.Tensor:
    """CFG++ Euler in k-diffusion form: ``x_next = D_lambda + sigma_next * (x - D_u) / sigma``.

    The derivative ``d = (x - D_u) / sigma`` uses the unconditional estimate; the guided one is the origin.
    """
    return denoised + sigma_next * ((sample - denoised_renoise) / sigma)


def dpmpp_2m_cfgpp_step(sample, denoised, denoised_renoise, denoised_renoise_prev, alpha_t, sigma_t, sigma_s0,
                        h, h_last=None) -> torch.Tensor:
    """CFG++ DPM-Solver++(2M) in VP form (the step of ComfyUI's ``dpmpp_2m_cfg_pp``, written on x_vp).

    First order: ``x_t = (sigma_t / sigma_s0) x + alpha_t D_lambda - alpha_t e^{-h} D_u``, i.e. DPM-Solver++(1)
    (= DDIM) with D_lambda as the origin and ``x - alpha_s0 D_u`` re-noising. Second order (multistep
    midpoint) adds ``alpha_t (1 - e^{-h}) / (2 r) (D_lambda - D_u_prev)`` with ``r = h_last / h``; the history
    holds unconditional estimates. ``h = lambda_t - lambda_s0`` in log-SNR ``lambda = log(alpha / sigma)``.
    """
    exp_neg_h = torch.exp(-h)
    x = (sigma_t / sigma_s0) * sample + alpha_t * denoised - (alpha_t * exp_neg_h) * denoised_renoise
    if h_last is not None:
        r = h_last / h
        x = x + (alpha_t * (1.0 - exp_neg_h) * (0.5 / r)) * (denoised - denoised_renoise_prev)
    return x


def _refuse(scheduler, problems: list[str]) -> None:
    if problems:
        raise ValueError(
            f"CFG++ step for {type(scheduler).__name__} does not support {'; '.join(problems)} "
            f"(supported schedulers: {', '.join(sorted(STEP_RULES))})"
        )


def _estimates(out, ctx, level, sample):
    """(D_lambda, D_u) at this step, from the guided and the re-noising predictions."""
    return (to_denoised(out.pred, sample, level, ctx.prediction_type),
            to_denoised(out.renoise_pred, sample, level, ctx.prediction_type))


@register_step_rule("DDIMScheduler")
def ddim_rule(scheduler, real_step, out, ctx, step_kwargs):
    """CFG++ DDIM with the scheduler's alphas_cumprod and its prev-timestep rule (DDIM keeps no step state)."""
    cfg = scheduler.config
    eta = step_kwargs.get("eta", 0.0) or 0.0
    _refuse(scheduler, [p for p, bad in (
        (f"eta={eta} (CFG++ DDIM is deterministic; pass eta=0)", eta != 0),
        ("thresholding=True", cfg.get("thresholding", False)),
        ("clip_sample=True", cfg.get("clip_sample", False)),
    ) if bad])
    t = int(ctx.timestep)
    prev_t = t - cfg.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    level = noise_level(scheduler, t)
    denoised = to_denoised(out.pred, ctx.sample, level, ctx.prediction_type)
    eps_renoise = to_epsilon(out.renoise_pred, ctx.sample, level, ctx.prediction_type)
    return ddim_cfgpp_step(denoised, eps_renoise, alpha_prod_prev.to(ctx.sample.device))


@register_step_rule("EulerDiscreteScheduler")
def euler_rule(scheduler, real_step, out, ctx, step_kwargs):
    """CFG++ Euler (ComfyUI ``euler_cfg_pp``) on the scheduler's sigmas; its own step advances the step index."""
    _refuse(scheduler, ["s_churn > 0 (stochastic Euler)"] if step_kwargs.get("s_churn", 0.0) > 0 else [])
    index = current_step_index(scheduler, ctx.timestep)
    sample = ctx.sample.to(torch.float32)  # diffusers' Euler computes in float32
    denoised, denoised_u = _estimates(out, ctx, noise_level(scheduler, ctx.timestep), sample)
    sigma, sigma_next = (s.to(sample.device) for s in (scheduler.sigmas[index], scheduler.sigmas[index + 1]))
    real_step(out.renoise_pred, ctx.timestep, ctx.sample, **step_kwargs, return_dict=False)  # bookkeeping
    return euler_cfgpp_step(sample, denoised, denoised_u, sigma, sigma_next).to(out.pred.dtype)


@register_step_rule("EulerAncestralDiscreteScheduler")
def euler_ancestral_rule(scheduler, real_step, out, ctx, step_kwargs):
    """CFG++ Euler ancestral (ComfyUI ``euler_ancestral_cfg_pp``): ``D_lambda + sigma_down d_u + sigma_up z``.

    The scheduler's own step on the unconditional prediction gives ``D_u + sigma_down d_u + sigma_up z`` with
    the noise z it draws from the call's generator; CFG++ differs from it by exactly ``D_lambda - D_u``.
    """
    sample = ctx.sample.to(torch.float32)
    denoised, denoised_u = _estimates(out, ctx, noise_level(scheduler, ctx.timestep), sample)
    prev_u = real_step(out.renoise_pred, ctx.timestep, ctx.sample, **step_kwargs, return_dict=False)[0]
    return (prev_u.to(torch.float32) + (denoised - denoised_u)).to(out.pred.dtype)


@register_step_rule("DPMSolverMultistepScheduler")
def dpmpp_2m_rule(scheduler, real_step, out, ctx, step_kwargs):
    """CFG++ DPM-Solver++(2M): same first/second-order choice as the scheduler; its history holds D_u."""
    cfg = scheduler.config
    _refuse(scheduler, [p for p, bad in (
        (f"algorithm_type={cfg.algorithm_type!r} (needs 'dpmsolver++')", cfg.algorithm_type != "dpmsolver++"),
        (f"solver_order={cfg.solver_order} (needs 2)", cfg.solver_order != 2),
        (f"solver_type={cfg.solver_type!r} (needs 'midpoint')", cfg.solver_type != "midpoint"),
        ("thresholding=True", cfg.get("thresholding", False)),
        ("use_flow_sigmas=True", cfg.get("use_flow_sigmas", False)),
    ) if bad])
    index = current_step_index(scheduler, ctx.timestep)
    n = len(scheduler.timesteps)
    lower_order_final = index == n - 1 and (
        cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
    )
    second_order = scheduler.lower_order_nums >= 1 and not lower_order_final
    denoised_u_prev = scheduler.model_outputs[-1] if second_order else None  # D_u of the previous step
    sample = ctx.sample.to(torch.float32)
    denoised, denoised_u = _estimates(out, ctx, noise_level(scheduler, ctx.timestep), sample)
    real_step(out.renoise_pred, ctx.timestep, ctx.sample, **step_kwargs, return_dict=False)  # history <- D_u

    def alpha_sigma_lambda(i):
        alpha, sigma = scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[i])
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)

    alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(index + 1)
    _, sigma_s0, lambda_s0 = alpha_sigma_lambda(index)
    h_last = None
    if second_order:
        h_last = lambda_s0 - alpha_sigma_lambda(index - 1)[2]
    coeffs = [c.to(sample.device) if isinstance(c, torch.Tensor) else c
              for c in (alpha_t, sigma_t, sigma_s0, lambda_t - lambda_s0, h_last)]
    prev = dpmpp_2m_cfgpp_step(sample, denoised, denoised_u, denoised_u_prev, *coeffs)
    return prev.to(out.pred.dtype)
