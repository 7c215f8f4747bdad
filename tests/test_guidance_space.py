"""Prediction <-> denoised estimate conversions against each scheduler's own x0 at that step."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from diffkit.guidance import SUPPORTED_SCHEDULERS, from_denoised, noise_level, to_denoised, to_epsilon
from diffkit.noise import current_step_index
from diffkit.zoo.tiny import SD_SCHEDULER

STEPS = 6


def _scheduler(name: str, prediction_type: str, **extra):
    sched = getattr(diffusers, name).from_config({**SD_SCHEDULER, "prediction_type": prediction_type, **extra})
    sched.set_timesteps(STEPS)
    return sched


def _tensors(seed: int, shape=(2, 4, 8, 8)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


# Schedulers whose step output carries pred_original_sample.
WITH_X0 = ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
           "HeunDiscreteScheduler"]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", WITH_X0)
def test_to_denoised_matches_scheduler_pred_original_sample(name, prediction_type):
    sched = _scheduler(name, prediction_type)
    for i, t in enumerate(sched.timesteps[:5]):  # Heun: first- and second-order stages alternate
        sample, pred = _tensors(i)
        level = noise_level(sched, t)  # before step: step_index may still be None
        ours = to_denoised(pred, sample, level, prediction_type)
        kwargs = {} if name == "HeunDiscreteScheduler" else {"generator": torch.Generator().manual_seed(0)}
        out = sched.step(pred, t, sample, **kwargs)
        torch.testing.assert_close(ours, out.pred_original_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("name", ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_to_denoised_matches_multistep_history(name, prediction_type):
    # DPM-Solver++ and UniPC (predict_x0) store their converted x0 as the newest model output.
    sched = _scheduler(name, prediction_type)
    for i, t in enumerate(sched.timesteps[:3]):
        sample, pred = _tensors(10 + i)
        ours = to_denoised(pred, sample, noise_level(sched, t), prediction_type)
        sched.step(pred, t, sample)
        torch.testing.assert_close(ours, sched.model_outputs[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_to_epsilon_matches_deis_history(prediction_type):
    # DEIS (algorithm "deis") stores the noise prediction it derived.
    sched = _scheduler("DEISMultistepScheduler", prediction_type)
    for i, t in enumerate(sched.timesteps[:3]):
        sample, pred = _tensors(20 + i)
        ours = to_epsilon(pred, sample, noise_level(sched, t), prediction_type)
        sched.step(pred, t, sample)
        torch.testing.assert_close(ours, sched.model_outputs[-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_uses_alphas_cumprod_like_ddim(prediction_type):
    pndm, ddim = _scheduler("PNDMScheduler", prediction_type), _scheduler("DDIMScheduler", prediction_type)
    for i, t in enumerate(pndm.timesteps[:3]):
        sample, pred = _tensors(30 + i)
        ours = to_denoised(pred, sample, noise_level(pndm, t), prediction_type)
        torch.testing.assert_close(ours, ddim.step(pred, int(t), sample).pred_original_sample, rtol=1e-5, atol=1e-5)


def test_euler_v_prediction_formula_written_out():
    sched = _scheduler("EulerDiscreteScheduler", "v_prediction")
    t = sched.timesteps[2]
    sched._step_index = 2
    sigma = sched.sigmas[2]
    x, v = _tensors(40)
    expected = x / (sigma**2 + 1) - v * sigma / (sigma**2 + 1) ** 0.5
    torch.testing.assert_close(to_denoised(v, x, noise_level(sched, t), "v_prediction"), expected)
    torch.testing.assert_close(to_denoised(v, x, noise_level(sched, t), "epsilon"), x - sigma * v)


@pytest.mark.parametrize("name", sorted(SUPPORTED_SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_round_trip_and_decomposition(name, prediction_type):
    sched = _scheduler(name, prediction_type)
    t = sched.timesteps[1]
    level = noise_level(sched, t)
    sample, pred = _tensors(50)
    d = to_denoised(pred, sample, level, prediction_type)
    eps = to_epsilon(pred, sample, level, prediction_type)
    torch.testing.assert_close(from_denoised(d, sample, level, prediction_type), pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(level.a * d + level.b * eps, sample, rtol=1e-4, atol=1e-4)  # x = a D + b eps


def test_step_index_before_first_step_uses_scheduler_rules():
    sched = _scheduler("DPMSolverMultistepScheduler", "epsilon")
    assert sched.step_index is None
    t = sched.timesteps[0]
    assert current_step_index(sched, t) == 0
    _, sigma = sched._sigma_to_alpha_sigma_t(sched.sigmas[0])
    assert torch.equal(noise_level(sched, t).b, sigma)
    sched.set_begin_index(3)  # img2img-style start: the scheduler uses begin_index, not the timestep
    assert current_step_index(sched, t) == 3
    euler = _scheduler("EulerDiscreteScheduler", "epsilon")
    assert current_step_index(euler, euler.timesteps[4]) == 4  # index_for_timestep


def test_unsupported_scheduler_lists_supported():
    sched = diffusers.KDPM2DiscreteScheduler.from_config(SD_SCHEDULER)
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="KDPM2DiscreteScheduler is not supported.*: DDIMScheduler, .*HeunDiscrete"):
        noise_level(sched, sched.timesteps[0])


def test_bad_prediction_type_and_flow_sigmas():
    sched = _scheduler("DDIMScheduler", "epsilon")
    x, p = _tensors(0)
    with pytest.raises(ValueError, match="prediction_type must be one of .*'flow'"):
        to_denoised(p, x, noise_level(sched, sched.timesteps[0]), "flow")
    flow = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    flow.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="use_flow_sigmas=True"):
        noise_level(flow, flow.timesteps[0])


def test_zero_terminal_snr_first_step_is_finite_and_matches_ddim():
    """At a zero-terminal-SNR schedule's t = T (trailing spacing) alpha = a = 0: v-prediction's D is -v and
    eps is x (the VP sample is pure noise), with no 0 / 0 (the fifth reference weights sample from there)."""
    sched = _scheduler("DDIMScheduler", "v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    t = sched.timesteps[0]
    assert int(t) == 999 and sched.alphas_cumprod[999].item() == 0.0
    sample, pred = _tensors(0)
    level = noise_level(sched, t)
    d = to_denoised(pred, sample, level, "v_prediction")
    assert torch.equal(d, -pred)  # alpha x - sigma v with alpha = 0, sigma = 1
    assert torch.equal(to_epsilon(pred, sample, level, "v_prediction"), sample)
    assert torch.equal(from_denoised(d, sample, level, "v_prediction"), pred)
    x0 = sched.step(pred, t, sample).pred_original_sample
    assert torch.allclose(d, x0, atol=1e-6)


def test_apg_and_cfgpp_are_finite_on_a_zero_terminal_snr_model():
    """APG and CFG++ convert through D at every step; on a zero-terminal-SNR v model the first step (alpha = 0)
    once gave NaN images."""
    from diffkit.guidance import APG, CFGPlusPlus
    from diffkit.zoo import build_tiny_pipeline

    pipe = build_tiny_pipeline("sd2", 0)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(
        pipe.scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    for guidance in (APG(15.0), CFGPlusPlus(0.6)):
        out = pipe("a red star", guidance=guidance, num_inference_steps=3, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
        assert np.isfinite(out).all(), guidance
