"""CFG++ (Chung et al., ICLR 2025): the DDIM formula, lambda = 0, and full runs against hand-written loops."""

from __future__ import annotations

import diffusers
import pytest
import torch

from diffkit.guidance import CFG, CFGPlusPlus, GuidanceOutput, StepContext
from diffkit.guidance.steps import STEP_RULES, ddim_rule, euler_rule
from diffkit.zoo.tiny import SD_SCHEDULER

PROMPT = "a red star"
STEPS = 6


def _pair(seed, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan")])
def test_scale_outside_unit_interval_is_rejected(bad):
    with pytest.raises(ValueError, match=r"scale must be in \[0, 1\]"):
        CFGPlusPlus(bad)


def test_outputs_interpolated_and_unconditional_predictions():
    u, c = _pair(0)
    out = CFGPlusPlus(0.6)(u, c, StepContext(None, 0, u, "epsilon"), {})
    torch.testing.assert_close(out.pred, u + 0.6 * (c - u))
    assert out.renoise_pred is u


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_equals_formula(prediction_type):
    sched = diffusers.DDIMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    sched.set_timesteps(10)
    t = sched.timesteps[4]
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 100]
    x, _ = _pair(1)
    u, c = _pair(2)
    lam = 0.7
    out = CFGPlusPlus(lam)(u, c, StepContext(sched, t, x, prediction_type), {})
    ours = ddim_rule(sched, sched.step, out, StepContext(sched, t, x, prediction_type), {"eta": 0.0})
    if prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x
        u, c = a_t.sqrt() * u + (1 - a_t).sqrt() * x, a_t.sqrt() * c + (1 - a_t).sqrt() * x
    eps_lam = u + lam * (c - u)
    x0 = (x - torch.sqrt(1 - a_t) * eps_lam) / torch.sqrt(a_t)
    expected = torch.sqrt(a_prev) * x0 + torch.sqrt(1 - a_prev) * u
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_lambda_zero_is_unguided_sampling_with_empty_prompt(load_tiny, gen):
    pipe = load_tiny("sd15")
    kw = dict(num_inference_steps=STEPS, output_type="latent")
    ours = pipe(PROMPT, guidance=CFGPlusPlus(0.0), generator=gen(5), **kw).images
    empty = pipe("", guidance_scale=1.0, generator=gen(5), **kw).images
    torch.testing.assert_close(ours, empty, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, pipe(PROMPT, guidance=CFGPlusPlus(1.0), generator=gen(5), **kw).images)


# ------------------------------------------------------------------ hand-written reference loops
# Each loop uses only the scheduler's timesteps, alphas_cumprod / sigmas and the U-Net; the CFG++ update is
# written in the form of the paper (DDIM) or of ComfyUI's k-diffusion samplers (Euler, Euler ancestral,
# DPM++ 2M: x in k-diffusion form x_vp / alpha, sigma the k-diffusion sigma).


def _x0_eps_vp(pred, x, a, family):
    """(x0, eps) for a VP sample x with alphas_cumprod a."""
    if family == "sd2":
        return a.sqrt() * x - (1 - a).sqrt() * pred, a.sqrt() * pred + (1 - a).sqrt() * x
    return (x - (1 - a).sqrt() * pred) / a.sqrt(), pred


def _x0_k(pred, x, s, family):
    """x0 for a k-diffusion sample x at sigma s."""
    if family == "sd2":
        return x / (s**2 + 1) - pred * s / (s**2 + 1) ** 0.5
    return x - s * pred


def _reference_loop(pipe, scheduler_name, lam, family, seed):
    sched = pipe.scheduler
    sched.set_timesteps(STEPS)
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g) * sched.init_noise_sigma

    def predict(model_in, t):
        u, c = pipe.unet(torch.cat([model_in] * 2), t, encoder_hidden_states=embeds).sample.chunk(2)
        return u, u + lam * (c - u)

    if scheduler_name == "DDIMScheduler":
        ratio = 1000 // STEPS
        for t in sched.timesteps:
            a = sched.alphas_cumprod[t]
            a_prev = sched.alphas_cumprod[t - ratio] if t - ratio >= 0 else sched.final_alpha_cumprod
            u, lam_pred = predict(x, t)
            x0_lam, _ = _x0_eps_vp(lam_pred, x, a, family)
            _, eps_u = _x0_eps_vp(u, x, a, family)
            x = a_prev.sqrt() * x0_lam + (1 - a_prev).sqrt() * eps_u
        return x
    sigmas = sched.sigmas
    if scheduler_name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
        for i, t in enumerate(sched.timesteps):
            s, s_next = sigmas[i], sigmas[i + 1]
            u, lam_pred = predict(x / (s**2 + 1) ** 0.5, t)
            d_lam, d_u = _x0_k(lam_pred, x, s, family), _x0_k(u, x, s, family)
            derivative = (x - d_u) / s
            if scheduler_name == "EulerDiscreteScheduler":
                x = d_lam + s_next * derivative
            else:
                s_up = (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5
                s_down = (s_next**2 - s_up**2) ** 0.5
                noise = torch.randn(x.shape, generator=g)
                x = d_lam + s_down * derivative + s_up * noise
        return x
    # DPM-Solver++(2M), CFG++: the k-diffusion sample is x_vp * sqrt(sigma^2 + 1)
    old_d_u, h_last = None, None
    for i, t in enumerate(sched.timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        alpha = 1 / (s**2 + 1) ** 0.5
        u, lam_pred = predict(x, t)
        a = alpha**2
        d_lam, _ = _x0_eps_vp(lam_pred, x, a, family)
        d_u, _ = _x0_eps_vp(u, x, a, family)
        xk = x / alpha
        if s_next == 0:
            xk = d_lam
        else:
            h = -torch.log(s_next) + torch.log(s)
            xk_next = d_lam + torch.exp(-h) * (xk - d_u)
            if old_d_u is not None:
                r = h_last / h
                xk_next = xk_next - torch.expm1(-h) * (1 / (2 * r)) * (d_lam - old_d_u)
            xk, h_last = xk_next, h
        old_d_u = d_u
        x = xk / (s_next**2 + 1) ** 0.5
    return x


SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("family", ["sd15", "sd2"])
@pytest.mark.parametrize("scheduler_name", SCHEDULERS)
def test_full_run_equals_reference_loop(load_tiny, gen, scheduler_name, family):
    pipe = load_tiny(family)
    pipe.scheduler = getattr(diffusers, scheduler_name).from_config(pipe.scheduler.config)
    ours = pipe(PROMPT, guidance=CFGPlusPlus(0.7), num_inference_steps=STEPS, generator=gen(7),
                output_type="latent").images
    ref = _reference_loop(pipe, scheduler_name, 0.7, family, seed=7)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_supported_schedulers_are_the_four():
    assert sorted(STEP_RULES) == sorted(SCHEDULERS)


def test_unsupported_scheduler_lists_supported(load_tiny):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.PNDMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="PNDMScheduler has none. Supported schedulers: DDIMScheduler, "
                                         "DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler, "
                                         "EulerDiscreteScheduler"):
        pipe(PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=5, output_type="latent")
    # CFG needs no step rule: it runs on any scheduler.
    assert pipe(PROMPT, guidance=CFG(3.0), num_inference_steps=5, output_type="latent").images.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("config, message", [
    (dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "algorithm_type='dpmsolver' \\(needs 'dpmsolver\\+\\+'\\)"),
    (dict(algorithm_type="sde-dpmsolver++"), "algorithm_type='sde-dpmsolver\\+\\+'"),
    (dict(solver_order=3), "solver_order=3 \\(needs 2\\)"),
    (dict(solver_type="heun"), "solver_type='heun' \\(needs 'midpoint'\\)"),
])
def test_dpm_solver_refuses_other_configs(load_tiny, config, message):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config({**pipe.scheduler.config, **config})
    with pytest.raises(ValueError, match="CFG\\+\\+ step for DPMSolverMultistepScheduler does not support " + message):
        pipe(PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=3, output_type="latent")


def test_ddim_refuses_eta_and_clipping(load_tiny):
    pipe = load_tiny("sd15")
    with pytest.raises(ValueError, match="eta=0.5 \\(CFG\\+\\+ DDIM is deterministic; pass eta=0\\)"):
        pipe(PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=2, eta=0.5, output_type="latent")
    pipe.scheduler = diffusers.DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": True})
    with pytest.raises(ValueError, match="clip_sample=True"):
        pipe(PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=2, output_type="latent")


def test_euler_refuses_churn():
    sched = diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(4)
    x, u = _pair(3)
    ctx = StepContext(sched, sched.timesteps[0], x, "epsilon")
    with pytest.raises(ValueError, match="s_churn > 0"):
        euler_rule(sched, sched.step, GuidanceOutput(u, u), ctx, {"s_churn": 1.0})


def test_scheduler_state_after_cfgpp_matches_plain_run(load_tiny, gen):
    # The rules run the scheduler's own step: step index and DPM history advance as in a plain call.
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe(PROMPT, guidance=CFGPlusPlus(0.6), num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    index, orders = pipe.scheduler.step_index, pipe.scheduler.lower_order_nums
    pipe(PROMPT, guidance_scale=5.0, num_inference_steps=STEPS, generator=gen(0), output_type="latent")
    assert (index, orders) == (pipe.scheduler.step_index, pipe.scheduler.lower_order_nums) == (STEPS, 2)


def test_dpmpp_2m_karras_equals_reference_loop(load_tiny, gen):
    """DPM++ 2M Karras: the rule reads the scheduler's own (Karras) sigmas."""
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    ours = pipe(PROMPT, guidance=CFGPlusPlus(0.8), num_inference_steps=STEPS, generator=gen(8),
                output_type="latent").images
    ref = _reference_loop(pipe, "DPMSolverMultistepScheduler", 0.8, "sd15", seed=8)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
