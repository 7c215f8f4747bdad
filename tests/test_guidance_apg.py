"""APG (Sadat et al., ICLR 2025): the rule written out, the CFG special case, diffusers' guider, full runs."""

from __future__ import annotations

import diffusers
import pytest
import torch
from diffusers.guiders import AdaptiveProjectedGuidance

from diffkit.guidance import APG, CFG, StepContext
from diffkit.guidance.apg import momentum_update, normalized_guidance, project, rescale
from diffkit.zoo.tiny import SD_SCHEDULER


def _pair(seed, shape=(3, 4, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


def _apg_by_hand(d_cond, d_uncond, w, eta, r, beta, running):
    """The paper's rule, per sample, written with plain loops over the batch."""
    diff = d_cond - d_uncond
    running = diff if running is None else diff + beta * running
    out = []
    for k in range(diff.shape[0]):
        dk, ck = running[k].double(), d_cond[k].double()
        if r > 0:
            dk = dk * min(1.0, r / dk.norm().item())
        par = (dk * ck).sum() / (ck * ck).sum() * ck
        orth = dk - par
        out.append(ck + (w - 1) * (orth + eta * par))
    return torch.stack(out).float(), running


# ---------------------------------------------------------------- parameters


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=-1.0), r"scale must be in \[0, inf\), got -1.0"),
    (dict(eta=1.5), r"eta must be in \[0, 1\], got 1.5"),
    (dict(eta=-0.1), r"eta must be in \[0, 1\], got -0.1"),
    (dict(momentum=-1.0), r"momentum must be in \(-1, 1\), got -1.0"),
    (dict(momentum=1.0), r"momentum must be in \(-1, 1\), got 1.0"),
    (dict(norm_threshold=-2.0), r"norm_threshold must be in \[0, inf\), got -2.0"),
    (dict(space="x0"), r"space must be one of \('denoised', 'epsilon'\), got 'x0'"),
    (dict(scale="big"), r"scale must be a number, got 'big'"),
])
def test_bad_parameters_name_parameter_value_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        APG(**kwargs)


def test_defaults_and_frozen():
    apg = APG()
    assert (apg.scale, apg.eta, apg.norm_threshold, apg.momentum, apg.space) == (15.0, 0.0, 15.0, -0.5, "denoised")
    with pytest.raises(AttributeError):
        apg.eta = 1.0
    assert not APG(scale=1.0).needs_unconditional and APG(scale=2.0).needs_unconditional


# ---------------------------------------------------------------- the pure functions


def test_project_splits_per_sample():
    v0, v1 = _pair(0)
    par, orth = project(v0, v1)
    torch.testing.assert_close(par + orth, v0)
    dots = (orth.double() * v1.double()).flatten(1).sum(1)
    assert dots.abs().max() < 1e-5  # orthogonal part is orthogonal to v1, sample by sample
    cos = torch.nn.functional.cosine_similarity(par.flatten(1), v1.flatten(1))
    assert torch.allclose(cos.abs(), torch.ones(3), atol=1e-5)


def test_rescale_bounds_norm_per_sample_and_zero_disables():
    diff, _ = _pair(1)
    diff[0] *= 0.01  # small sample: untouched
    out = rescale(diff, 5.0)
    norms = out.flatten(1).norm(dim=1)
    assert torch.allclose(norms[1:], torch.full((2,), 5.0), atol=1e-4)
    torch.testing.assert_close(out[0], diff[0])
    assert rescale(diff, 0.0) is diff


def test_momentum_running_average_starts_at_zero():
    a, b = _pair(2)
    state = {}
    torch.testing.assert_close(momentum_update(a, state, -0.5), a)
    torch.testing.assert_close(momentum_update(b, state, -0.5), b - 0.5 * a)


# ---------------------------------------------------------------- one step, written out


@pytest.mark.parametrize("w, eta, r, beta", [(15.0, 0.0, 15.0, -0.5), (7.5, 0.3, 2.0, -0.75), (4.0, 1.0, 0.0, 0.2)])
def test_epsilon_space_steps_equal_rule_written_out(w, eta, r, beta):
    apg, state, running = APG(w, eta=eta, norm_threshold=r, momentum=beta, space="epsilon"), {}, None
    for step in range(3):
        u, c = _pair(10 + step)
        ours = apg(u, c, StepContext(None, 0, u, "epsilon", step), state).pred
        expected, running = _apg_by_hand(c, u, w, eta, r, beta, running)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoised_space_step_equals_rule_on_x0(prediction_type):
    sched = diffusers.DDIMScheduler.from_config({**SD_SCHEDULER, "prediction_type": prediction_type})
    sched.set_timesteps(10)
    t = sched.timesteps[3]
    a = sched.alphas_cumprod[t]
    x, _ = _pair(20)
    u, c = _pair(21)
    if prediction_type == "epsilon":
        to_x0 = lambda e: (x - (1 - a).sqrt() * e) / a.sqrt()  # noqa: E731
        back = lambda d: (x - a.sqrt() * d) / (1 - a).sqrt()  # noqa: E731
    else:
        to_x0 = lambda v: a.sqrt() * x - (1 - a).sqrt() * v  # noqa: E731
        back = lambda d: (a.sqrt() * x - d) / (1 - a).sqrt()  # noqa: E731
    apg = APG(12.0, eta=0.0, norm_threshold=4.0, momentum=-0.5)
    ours = apg(u, c, StepContext(sched, t, x, prediction_type), {}).pred
    d_guided, _ = _apg_by_hand(to_x0(c), to_x0(u), 12.0, 0.0, 4.0, -0.5, None)
    torch.testing.assert_close(ours, back(d_guided), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("space", ["denoised", "epsilon"])
def test_cfg_special_case(space):
    sched = diffusers.EulerDiscreteScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(10)
    t = sched.timesteps[2]
    x, _ = _pair(30)
    u, c = _pair(31)
    ctx = StepContext(sched, t, x, "epsilon")
    apg = APG(7.5, eta=1.0, norm_threshold=0.0, momentum=0.0, space=space)
    torch.testing.assert_close(apg(u, c, ctx, {}).pred, CFG(7.5)(u, c, ctx, {}).pred, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w, eta, r, beta", [(15.0, 0.0, 15.0, -0.5), (5.0, 0.5, 3.0, -0.75), (9.0, 1.0, 0.0, 0.3)])
def test_epsilon_space_equals_diffusers_guider(w, eta, r, beta):
    guider = AdaptiveProjectedGuidance(guidance_scale=w - 1, use_original_formulation=True,
                                       adaptive_projected_guidance_momentum=beta,
                                       adaptive_projected_guidance_rescale=r, eta=eta)
    apg, state = APG(w, eta=eta, norm_threshold=r, momentum=beta, space="epsilon"), {}
    for step in range(4):
        guider.set_state(step=step, num_inference_steps=4, timestep=torch.tensor(999 - 250 * step))
        guider.prepare_inputs({})  # creates the momentum buffer at step 0
        u, c = _pair(40 + step)
        theirs = guider.forward(pred_cond=c, pred_uncond=u).pred
        ours = apg(u, c, StepContext(None, 0, u, "epsilon", step), state).pred
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_normalized_guidance_is_the_rule():
    u, c = _pair(50)
    torch.testing.assert_close(
        normalized_guidance(c, u, 6.0, 0.0, 3.0, 0.0, {}), _apg_by_hand(c, u, 6.0, 0.0, 3.0, 0.0, None)[0],
        rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- full runs


def _to_x0(pred, x, level, euler, family):
    """x0 from a prediction: k-diffusion sigma ``level`` (Euler) or alphas_cumprod ``level`` (DDIM)."""
    if euler:
        s = level
        return x / (s**2 + 1) - pred * s / (s**2 + 1) ** 0.5 if family == "sd2" else x - s * pred
    a = level
    return (x - (1 - a) ** 0.5 * pred) / a**0.5


def _from_x0(d, x, level, euler, family):
    if euler:
        s = level
        return (x / (s**2 + 1) - d) * (s**2 + 1) ** 0.5 / s if family == "sd2" else (x - d) / s
    a = level
    return (x - a**0.5 * d) / (1 - a) ** 0.5


def _reference_apg_loop(pipe, prompt, apg, steps, seed, family):
    """A hand-written sampling loop: the pipeline's text encoder, the scheduler's alphas or sigmas, APG on x0."""
    sched = pipe.scheduler
    sched.set_timesteps(steps)
    cond, uncond = pipe.encode_prompt(prompt, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(seed)) * sched.init_noise_sigma
    running = None
    euler = isinstance(sched, diffusers.EulerDiscreteScheduler)
    for i, t in enumerate(sched.timesteps):
        if euler:
            s = sched.sigmas[i]
            model_in = x / (s**2 + 1) ** 0.5
        else:
            model_in = x
        out = pipe.unet(torch.cat([model_in] * 2), t, encoder_hidden_states=embeds).sample
        u, c = out.chunk(2)
        level = sched.sigmas[i] if euler else sched.alphas_cumprod[t]
        d_guided, running = _apg_by_hand(_to_x0(c, x, level, euler, family), _to_x0(u, x, level, euler, family),
                                         apg.scale, apg.eta, apg.norm_threshold, apg.momentum, running)
        x = sched.step(_from_x0(d_guided, x, level, euler, family), t, x).prev_sample
    return x


@pytest.mark.parametrize("family, scheduler", [("sd15", "DDIMScheduler"), ("sd2", "EulerDiscreteScheduler")])
def test_full_run_equals_reference_loop(load_tiny, gen, family, scheduler):
    pipe = load_tiny(family)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    apg = APG(12.0, eta=0.0, norm_threshold=3.0, momentum=-0.5)
    ours = pipe("a red star", guidance=apg, num_inference_steps=5, generator=gen(3), output_type="latent").images
    ref = _reference_apg_loop(pipe, "a red star", apg, 5, 3, family)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    # The momentum state lives in one call: a second call gives the same latents.
    again = pipe("a red star", guidance=apg, num_inference_steps=5, generator=gen(3), output_type="latent").images
    assert torch.equal(ours, again)


def test_full_run_cfg_special_case_matches_diffusers(load_tiny, gen):
    pipe = load_tiny("sd15")
    kw = dict(num_inference_steps=4, output_type="latent")
    plain = pipe("a red star", guidance_scale=6.0, generator=gen(1), **kw).images
    apg = pipe("a red star", guidance=APG(6.0, eta=1.0, norm_threshold=0.0, momentum=0.0), generator=gen(1), **kw)
    torch.testing.assert_close(apg.images, plain, rtol=1e-4, atol=1e-4)


def test_half_precision_inputs_keep_their_dtype_and_match_float32():
    sched = diffusers.DDIMScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(10)
    t = sched.timesteps[0]
    x, _ = _pair(60)
    u, c = _pair(61)
    apg = APG(15.0)
    full = apg(u, c, StepContext(sched, t, x, "epsilon"), {}).pred
    half = apg(u.bfloat16(), c.bfloat16(), StepContext(sched, t, x.bfloat16(), "epsilon"), {}).pred
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)
