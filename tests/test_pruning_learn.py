"""Mask learning: the trajectory, time-step gradient checkpointing, memory, accelerate loop, resume."""

from __future__ import annotations

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from diffkit.pruning import (
    HardConcrete,
    MaskAttachment,
    MaskLearningConfig,
    MaskLogits,
    Sampler,
    capture_conditioning,
    find_units,
    learn_masks,
    logit_gradients,
    run_trajectory,
)
from diffkit.pruning.learn import masked_step_fn, plain_step_fn
from diffkit.pruning.memory import peak_live_bytes


@pytest.mark.parametrize("family,scheduler", [("sd15", "ddim"), ("sdxl", "euler")])
def test_sampler_reproduces_the_pipeline_loop(load_tiny, family, scheduler):
    pipe = load_tiny(family)
    if scheduler == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    cond = capture_conditioning(pipe, "a red star", 5.0)
    assert cond.cfg and cond.latent_shape == (1, 4, 8, 8)
    assert cond.unet_kwargs["encoder_hidden_states"].shape[0] == 2  # [uncond, cond]
    sampler = Sampler(pipe.unet, pipe.scheduler, 4, 5.0, "cpu")
    z0 = sampler.initial_latent(cond.latent_shape, seed=3)
    with torch.no_grad():
        ours = run_trajectory(plain_step_fn(sampler, cond, 3), z0, 4)
    noise = z0 / sampler.scheduler.init_noise_sigma  # the pipeline multiplies it back
    theirs = pipe("a red star", num_inference_steps=4, guidance_scale=5.0, latents=noise.clone(),
                  output_type="latent").images
    assert len(ours) == 5
    torch.testing.assert_close(ours[-1], theirs, atol=1e-5, rtol=1e-5)


def test_multistep_scheduler_is_refused(load_tiny):
    pipe = load_tiny("sd15")
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ValueError, match="single-step scheduler, got DPMSolverMultistepScheduler.*DDIMScheduler"):
        Sampler(pipe.unet, pipe.scheduler, 4, 5.0, "cpu")
    with pytest.raises(ValueError, match="num_steps must be >= 1, got 0"):
        Sampler(pipe.unet, EulerDiscreteScheduler.from_config(pipe.scheduler.config), 0, 5.0, "cpu")


def _setup(pipe, steps, height=None):
    pipe.unet.requires_grad_(False)
    cond = capture_conditioning(pipe, "a blue circle", 5.0, height=height, width=height)
    sampler = Sampler(pipe.unet, pipe.scheduler, steps, 5.0, "cpu")
    units = find_units(pipe.unet)
    logits = MaskLogits(units, 3.0)
    with torch.no_grad():  # spread the logits so that many masks are strictly inside (0, 1)
        for p in logits.logits:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 1.5)
    return cond, sampler, units, logits


@pytest.mark.parametrize("family,scheduler", [("sd15", "ddim"), ("sdxl", "euler"), ("sd15", "euler_ancestral")])
def test_checkpointed_gradients_equal_plain_backprop(load_tiny, family, scheduler):
    """4 steps; Euler ancestral also checks that a stochastic step's noise is re-seeded on recomputation."""
    from diffusers import EulerAncestralDiscreteScheduler

    pipe = load_tiny(family)
    kinds = {"euler": EulerDiscreteScheduler, "euler_ancestral": EulerAncestralDiscreteScheduler}
    if scheduler in kinds:
        pipe.scheduler = kinds[scheduler].from_config(pipe.scheduler.config)
    cond, sampler, units, logits = _setup(pipe, 4)
    params = list(logits.logits)
    z0 = sampler.initial_latent(cond.latent_shape, seed=1)
    with torch.no_grad():
        target = run_trajectory(plain_step_fn(sampler, cond, 1), z0, 4)[-1]
    with MaskAttachment(pipe.unet, units) as att:
        fn = masked_step_fn(sampler, att, logits, HardConcrete(), cond, prompt_seed=1, opt_step=0)
        mse_ck, g_ck = logit_gradients(fn, z0, target, params, 4, checkpointing=True)
        mse_bp, g_bp = logit_gradients(fn, z0, target, params, 4, checkpointing=False)
        other = masked_step_fn(sampler, att, logits, HardConcrete(), cond, prompt_seed=1, opt_step=1)
        mse_other, _ = logit_gradients(other, z0, target, params, 4, checkpointing=True)
    flat_ck, flat_bp = torch.cat([g.flatten() for g in g_ck]), torch.cat([g.flatten() for g in g_bp])
    assert mse_ck.item() == mse_bp.item() > 0
    assert (flat_bp != 0).sum() > flat_bp.numel() // 4  # a real test: most logits get gradient
    torch.testing.assert_close(flat_ck, flat_bp, atol=1e-7, rtol=1e-5)
    assert mse_other.item() != mse_ck.item()  # fresh mask noise at the next optimizer step


def test_mask_noise_is_reseeded_per_step(load_tiny):
    pipe = load_tiny("sd15")
    cond, sampler, units, logits = _setup(pipe, 2)
    seen = []
    with MaskAttachment(pipe.unet, units) as att:
        fn = masked_step_fn(sampler, att, logits, HardConcrete(), cond, prompt_seed=4, opt_step=2)
        real_step = sampler.step
        sampler.step = lambda z, i, c, s: seen.append((i, dict(att.state.masks))) or real_step(z, i, c, s)
        z0 = sampler.initial_latent(cond.latent_shape, seed=4)
        with torch.no_grad():
            fn(z0, 1)
            fn(z0, 0)
            fn(z0, 1)
        assert att.state.masks == {}  # cleared after each step
    (i1, a), (i0, b), (i1b, c) = seen
    assert all(torch.equal(a[k], c[k]) for k in a)  # same step -> same mask
    assert any(not torch.equal(a[k], b[k]) for k in a)  # other step -> other noise


def test_peak_memory_of_mask_learning_is_flat_in_steps(load_tiny):
    """Peak memory of one learning step (live tensors, measured) grows <= 30% from 4 to 16 denoising steps
    with checkpointing; plain backprop through the trajectory grows about linearly (shown for contrast)."""
    pipe = load_tiny("sd15")
    peaks = {}
    for checkpointing, steps in ((True, 4), (True, 16), (False, 2), (False, 4)):
        cond, sampler, units, logits = _setup(pipe, steps)
        params = list(logits.logits)
        z0 = sampler.initial_latent(cond.latent_shape, seed=0)
        with MaskAttachment(pipe.unet, units) as att:
            fn = masked_step_fn(sampler, att, logits, HardConcrete(), cond, 0, 0)
            peaks[checkpointing, steps], _ = peak_live_bytes(
                logit_gradients, fn, z0, torch.zeros_like(z0), params, steps, checkpointing)
    assert peaks[True, 16] <= 1.3 * peaks[True, 4]
    assert peaks[False, 4] >= 1.6 * peaks[False, 2]  # plain backprop keeps every step's activations
    assert peaks[False, 4] > 2 * peaks[True, 4]


def test_peak_live_bytes_counts_what_is_alive():
    def fn():
        a = torch.zeros(1000)  # 4000 bytes, alive until the end
        b = torch.zeros(2000)  # 8000 bytes, freed before c is made
        del b
        c = torch.zeros(500)
        return a, c

    peak, (a, c) = peak_live_bytes(fn)
    assert peak == 4000 + 8000


def test_learn_masks_runs_checkpoints_and_resumes(load_tiny, tmp_path):
    prompts = ["a red star", "a blue circle", "a green square"]
    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=2, batch_size=1, lr=0.1,
                             beta=0.5, checkpoint_every=2, seed=0)
    full = learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "a", progress=False)
    assert full.steps_done == 6 and [h["step"] for h in full.history] == [1, 2, 3, 4, 5, 6]
    units = find_units(load_tiny("sd15").unet)
    assert set(full.logits) == {u.name for u in units}
    changed = sum(int((v != 3.0).sum()) for v in full.logits.values())
    assert changed == sum(u.size for u in units)  # the L1 penalty moves every logit
    # One step-named tensor file (logits + AdamW state) and the pointer that names it.
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["masks-00000006.safetensors", "masks.json"]
    # interrupted after 3 steps (last checkpoint at step 3), then resumed in a new call
    part = learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "b", progress=False, stop_after=3)
    assert part.steps_done == 3
    resumed = learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.steps_done == 6 and resumed.history == full.history
    for name in full.logits:
        torch.testing.assert_close(resumed.logits[name], full.logits[name], atol=0, rtol=0)
    other = MaskLearningConfig(num_inference_steps=3, guidance_scale=5.0, epochs=2, checkpoint_every=2)
    with pytest.raises(ValueError, match="made with other settings.*num_inference_steps"):
        learn_masks(load_tiny("sd15"), prompts, other, checkpoint_dir=tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match=r"made with other prompts \(3 prompts\)"):
        learn_masks(load_tiny("sd15"), prompts[:2], cfg, checkpoint_dir=tmp_path / "b", progress=False)


def test_checkpoint_of_another_unet_is_refused(load_tiny, tiny_paths, tmp_path):
    """Masks learned on one U-Net are not resumed on another (other weights, or no record of which)."""
    import json

    import diffkit
    from diffkit.zoo import build_tiny_pipeline, save_tiny_pipeline

    prompts = ["a red star", "a blue circle"]
    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=2, checkpoint_every=1)
    learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "c", progress=False, stop_after=1)
    other = diffkit.DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "seed1", "sd15", seed=1))
    other.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="was made for a U-Net with other weights; remove it or use another"):
        learn_masks(other, prompts, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    wider = diffkit.to_diffkit(build_tiny_pipeline("sdxl"))
    with pytest.raises(ValueError, match="was made for a U-Net with other architecture; remove it"):
        learn_masks(wider, prompts, cfg, checkpoint_dir=tmp_path / "c", progress=False)
    state = json.loads((tmp_path / "c" / "masks.json").read_text())
    state.pop("unet_fingerprint")  # as written before checkpoints recorded the U-Net
    (tmp_path / "c" / "masks.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="does not record which U-Net it was made for; remove it"):
        learn_masks(load_tiny("sd15"), prompts, cfg, checkpoint_dir=tmp_path / "c", progress=False)


def test_learning_lowers_the_mse_objective(load_tiny):
    """With the penalty off, learning from a damaging start (logits 0) lowers the trajectory MSE."""
    pipe = load_tiny("sd15")
    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=12, lr=0.2, beta=0.0,
                             hard_concrete=HardConcrete(init=0.0))
    result = learn_masks(pipe, ["a red star"], cfg, progress=False)
    mse = [h["mse"] for h in result.history]
    assert sum(mse[-3:]) < 0.75 * sum(mse[:3])


@pytest.mark.parametrize("kw,msg", [
    ({"kinds": ("neurons",)}, "kinds must be a non-empty subset"),
    ({"num_inference_steps": 0}, "num_inference_steps must be >= 1, got 0"),
    ({"lr": 0.0}, "lr must be > 0, got 0.0"),
    ({"beta": -1.0}, "beta must be >= 0, got -1.0"),
    ({"penalty": "l2"}, "penalty must be one of"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
])
def test_config_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        MaskLearningConfig(**kw)


def test_penalties_match_their_formulas():
    from diffkit.pruning import Unit

    units = [Unit("a", "heads", 2, 8), Unit("b", "ffn", 4, 1)]
    logits = MaskLogits(units)
    with torch.no_grad():
        logits.logits[0].copy_(torch.tensor([1.0, -3.0]))
        logits.logits[1].copy_(torch.tensor([0.5, 0.5, -0.5, 2.0]))
    hc = HardConcrete()
    l1 = ((1 + 3) / 2 + (0.5 + 0.5 + 0.5 + 2.0) / 4) / 2
    assert logits.penalty("l1", hc).item() == pytest.approx(l1)
    l0 = (hc.expected_l0(logits.logits[0]).mean() + hc.expected_l0(logits.logits[1]).mean()) / 2
    assert logits.penalty("l0", hc).item() == pytest.approx(l0.item())


WORKER = """
import sys, torch
from safetensors.torch import save_file
import diffkit
from diffkit.pruning import MaskLearningConfig, learn_masks
from diffkit.zoo import build_tiny_pipeline
pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15"))
pipe.set_progress_bar_config(disable=True)
cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=1, batch_size=int(sys.argv[2]))
res = learn_masks(pipe, ["a red star", "a blue circle", "a green square", "a cat"], cfg, progress=False)
import os
if os.environ.get("RANK", "0") == "0":
    save_file(res.logits, sys.argv[1], metadata={"num_processes": str(res.num_processes)})
"""


@pytest.mark.slow
def test_data_parallel_over_two_processes_equals_one_process_with_the_same_global_batch(tmp_path):
    """accelerate with two CPU processes (gloo), one prompt each per step == one process with two per step."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors import safe_open
    from safetensors.torch import load_file

    import diffkit
    from diffkit.zoo import build_tiny_pipeline

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "dp.safetensors"), "1"],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stderr=subprocess.PIPE)
             for r in range(2)]
    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=1, batch_size=2)
    pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15"))
    pipe.set_progress_bar_config(disable=True)
    one = learn_masks(pipe, ["a red star", "a blue circle", "a green square", "a cat"], cfg, progress=False).logits
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs[0].decode()[-2000:]
    with safe_open(str(tmp_path / "dp.safetensors"), "pt") as f:
        assert f.metadata()["num_processes"] == "2"
    dp = load_file(str(tmp_path / "dp.safetensors"))
    assert set(dp) == set(one)
    assert any((v != 3.0).any() for v in dp.values())
    for k in dp:
        torch.testing.assert_close(dp[k], one[k], atol=1e-5, rtol=1e-5)


def test_bf16_mixed_precision_learning_tracks_float32(load_tiny):
    """bf16 autocast runs after a float32 run in the same process (accelerate's state is a singleton) and
    gives nearly the same objective."""
    prompts = ["a red star"]
    f32 = learn_masks(load_tiny("sd15"), prompts, MaskLearningConfig(num_inference_steps=2, epochs=2), progress=False)
    bf16 = learn_masks(load_tiny("sd15"), prompts, MaskLearningConfig(num_inference_steps=2, epochs=2,
                                                                      mixed_precision="bf16"), progress=False)
    assert bf16.config.mixed_precision == "bf16" and len(bf16.history) == 2
    for a, b in zip(f32.history, bf16.history):
        assert b["mse"] == pytest.approx(a["mse"], rel=0.2) and b["mse"] != a["mse"]
    assert all(torch.isfinite(v).all() for v in bf16.logits.values())


def test_learning_refuses_a_hooked_unet(load_tiny):
    """Hooks put on the bare U-Net outside the pipeline's features are refused (the pipeline's own
    DeepCache is suspended for the job instead: tests/test_lifecycle.py)."""
    from diffkit.cache import apply_deepcache

    pipe = load_tiny("sd15")
    apply_deepcache(pipe.unet, interval=3)
    with pytest.raises(ValueError, match=r"active hooks \(diffkit.deepcache\).*remove them before mask learning"):
        learn_masks(pipe, ["a red star"], MaskLearningConfig(num_inference_steps=2, epochs=1), progress=False)
    with pytest.raises(ValueError, match="prompts must not be empty"):
        learn_masks(pipe, [], MaskLearningConfig(num_inference_steps=2, epochs=1), progress=False)


def test_pruned_pipeline_with_deepcache_runs(load_tiny, tmp_path, gen):
    """load_pruning and DeepCache compose: the slim U-Net is what DeepCache hooks."""
    from diffkit.pruning import save_pruning

    pipe = load_tiny("sd15")
    units = find_units(pipe.unet)
    kept = {u.name: list(range(u.size // 2)) for u in units}
    save_pruning(tmp_path, pipe.unet, kept, macs=False)
    pipe.load_pruning(tmp_path)
    plain = pipe("a red star", num_inference_steps=6, generator=gen(0), output_type="np").images
    pipe.enable_deepcache(interval=3)
    cached = pipe("a red star", num_inference_steps=6, generator=gen(0), output_type="np").images
    pipe.disable_deepcache()
    again = pipe("a red star", num_inference_steps=6, generator=gen(0), output_type="np").images
    assert cached.shape == plain.shape and not (cached == plain).all() and (again == plain).all()


def test_conditioning_is_cast_to_the_unet_dtype(load_tiny):
    """A text encoder stored in float16 next to a float32 U-Net (seen in saved pipelines) still samples."""
    pipe = load_tiny("sd15")
    pipe.text_encoder.to(torch.float16)
    cond = capture_conditioning(pipe, "a red star", 5.0)
    assert cond.unet_kwargs["encoder_hidden_states"].dtype == torch.float16
    sampler = Sampler(pipe.unet, pipe.scheduler, 2, 5.0, "cpu")
    with torch.no_grad():
        z = run_trajectory(plain_step_fn(sampler, cond, 0), sampler.initial_latent(cond.latent_shape, 0), 2)[-1]
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
