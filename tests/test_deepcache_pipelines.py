"""DeepCache through diffkit pipelines: schedules counted per call, schedulers, state, batches, variants, compile."""

from __future__ import annotations

import math

import diffusers
import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)

import diffkit
from diffkit.cache import DeepCacheConfig, apply_deepcache, full_steps
from diffkit.guidance import APG, CFG, CFGPlusPlus

PROMPT = "a red star"


def _run(pipe, seed=0, **kw):
    kw.setdefault("num_inference_steps", 6)
    kw.setdefault("output_type", "latent")
    return pipe(kw.pop("prompt", PROMPT), generator=torch.Generator().manual_seed(seed), **kw).images


class Counter:
    """Counts full evaluations (the mid block runs) and all evaluations (conv_out runs), in order."""

    def __init__(self, unet):
        self.kinds = []
        self._mid = False
        self.handles = [
            unet.mid_block.register_forward_hook(lambda *a: setattr(self, "_mid", True)),
            unet.conv_out.register_forward_hook(self._end),
        ]

    def _end(self, *a):
        self.kinds.append("full" if self._mid else "cached")
        self._mid = False

    def close(self):
        for h in self.handles:
            h.remove()


def _levels(timesteps):
    """Noise-level index of each evaluation: runs of equal timesteps share one."""
    ts, out = [float(t) for t in timesteps], []
    for i, t in enumerate(ts):
        out.append(0 if i == 0 else out[-1] + (t != ts[i - 1]))
    return out


# ---------------------------------------------------------------------------------------------- exactness
def test_interval_one_gives_identical_latents(load_tiny):
    pipe = load_tiny("sd15")
    ref = _run(pipe, guidance_scale=7.5)
    pipe.enable_deepcache(interval=1, branch=0)
    assert torch.equal(_run(pipe, guidance_scale=7.5), ref)
    assert pipe.deepcache_stats()["cached"] == 0


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_disable_is_bit_identical_to_never_enabled(load_tiny, family):
    pipe, fresh = load_tiny(family), load_tiny(family)
    pipe.enable_deepcache(interval=3, branch=0)
    cached = _run(pipe)
    pipe.disable_deepcache()
    assert pipe.deepcache is None
    out, ref = _run(pipe), _run(fresh)
    assert torch.equal(out, ref) and not torch.equal(cached, ref)


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("schedule", ["uniform", "non-uniform"])
@pytest.mark.parametrize("steps", [10, 25, 50])
def test_full_and_cached_evaluations_follow_the_schedule(load_tiny, schedule, steps):
    pipe = load_tiny("sd15")
    config = pipe.enable_deepcache(interval=3, branch=1, schedule=schedule)
    counter = Counter(pipe.unet)
    _run(pipe, num_inference_steps=steps, guidance_scale=7.5)
    counter.close()
    full = full_steps(config, steps)
    assert counter.kinds == ["full" if s in full else "cached" for s in range(steps)]
    stats = pipe.deepcache_stats()
    assert (stats["full"], stats["cached"]) == (math.ceil(steps / 3), steps - math.ceil(steps / 3))
    assert stats["num_steps"] == steps
    assert [k for *_, k in stats["evaluations"]] == counter.kinds


@pytest.mark.parametrize("scheduler_cls, evaluations, n_full", [(PNDMScheduler, 11, 4), (HeunDiscreteScheduler, 19, 7)])
def test_schedulers_evaluating_twice_follow_the_schedule_by_step(load_tiny, scheduler_cls, evaluations, n_full):
    """PNDM's warm-up evaluates its 2nd timestep twice (11 evaluations for 10 steps); Heun evaluates every
    inner timestep twice (19). Steps are noise levels: 10 of them, full at 0, 3, 6, 9."""
    pipe = load_tiny("sd15")
    extra = dict(skip_prk_steps=True) if scheduler_cls is PNDMScheduler else {}
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    pipe.enable_deepcache(interval=3, branch=0)
    counter = Counter(pipe.unet)
    _run(pipe, num_inference_steps=10, guidance_scale=7.5)
    counter.close()
    levels = _levels(pipe.scheduler.timesteps)
    assert len(levels) == evaluations and levels[-1] == 9
    assert counter.kinds == ["full" if lv % 3 == 0 else "cached" for lv in levels]
    assert counter.kinds.count("full") == n_full
    stats = pipe.deepcache_stats()
    assert stats["num_steps"] == 10 and [e[0] for e in stats["evaluations"]] == levels


@pytest.mark.parametrize("scheduler_cls, extra", [
    (EulerDiscreteScheduler, {}),
    (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++")),
])
def test_single_evaluation_schedulers(load_tiny, scheduler_cls, extra):
    pipe = load_tiny("sd15")
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **extra)
    ref = _run(pipe, num_inference_steps=8)
    pipe.enable_deepcache(interval=2, branch=0, schedule="non-uniform", center=2)
    counter = Counter(pipe.unet)
    out = _run(pipe, num_inference_steps=8)
    counter.close()
    full = full_steps(DeepCacheConfig(interval=2, schedule="non-uniform", center=2), 8)
    assert counter.kinds == ["full" if s in full else "cached" for s in range(8)]
    assert out.shape == ref.shape and torch.isfinite(out).all() and not torch.equal(out, ref)


# ---------------------------------------------------------------------------------------------- state
def _img2img(pipe):
    return diffkit.DiffusionPipeline.from_pipe(diffusers.StableDiffusionImg2ImgPipeline(**pipe.components))


def test_img2img_after_another_call_equals_fresh_pipeline(load_tiny):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    base = load_tiny("sd15")
    used = _img2img(base)  # shares base's U-Net, hence its DeepCache hook and state
    used.enable_deepcache(interval=3, branch=0)
    _run(used, image=image, strength=0.9, num_inference_steps=10)
    _run(base, prompt="a blue circle", num_inference_steps=7)  # text-to-image through the same U-Net
    after = _run(used, image=image, strength=0.5, num_inference_steps=10)
    stats = used.deepcache_stats()
    fresh = _img2img(load_tiny("sd15"))
    fresh.enable_deepcache(interval=3, branch=0)
    assert torch.equal(after, _run(fresh, image=image, strength=0.5, num_inference_steps=10))
    assert stats["num_steps"] == 5 and [k for *_, k in stats["evaluations"]] == ["full", "cached", "cached",
                                                                               "full", "cached"]


def test_batches_cfg_and_images_per_prompt_match_single_runs(load_tiny):
    pipe = load_tiny("sd15")
    pipe.enable_deepcache(interval=3, branch=1)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    prompts = ["a red star", "a blue circle"]
    batch = pipe(prompts, num_images_per_prompt=2, latents=latents, num_inference_steps=6, guidance_scale=7.5,
                 output_type="latent").images
    assert pipe.deepcache_stats()["cached"] == 4  # cached steps ran with the batch of 2 x 2 x CFG
    for i in range(4):
        single = pipe(prompts[i // 2], latents=latents[i:i + 1], num_inference_steps=6, guidance_scale=7.5,
                      output_type="latent").images
        # batched CPU convolutions differ from single ones in the last bits only (the cache effect is ~1)
        torch.testing.assert_close(batch[i:i + 1], single, rtol=1e-4, atol=1e-4)


def test_guidance_object_with_deepcache(load_tiny):
    pipe = load_tiny("sd15")
    pipe.enable_deepcache(interval=2, branch=0)
    plain = _run(pipe, guidance_scale=5.0)
    counts = pipe.deepcache_stats()
    assert torch.equal(_run(pipe, guidance=CFG(5.0)), plain)
    assert pipe.deepcache_stats() == counts


@pytest.mark.parametrize("make", [lambda: CFG(5.0), lambda: APG(scale=5.0, eta=0.0, norm_threshold=15.0, momentum=-0.5),
                                  lambda: CFGPlusPlus(scale=0.6)], ids=["CFG", "APG", "CFG++"])
def test_every_guidance_method_with_deepcache(load_tiny, make):
    pipe = load_tiny("sd15")
    plain = _run(pipe, guidance=make())
    pipe.enable_deepcache(interval=1, branch=0)
    assert torch.equal(_run(pipe, guidance=make()), plain)  # guidance state untouched by the hook
    pipe.enable_deepcache(interval=3, branch=0)
    counter = Counter(pipe.unet)
    out = _run(pipe, guidance=make())
    counter.close()
    assert counter.kinds == ["full", "cached", "cached"] * 2
    assert torch.isfinite(out).all() and not torch.equal(out, plain)


# ---------------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_families_img2img_and_inpaint(load_tiny, family):
    pipe = load_tiny(family)
    img2img_cls = diffusers.StableDiffusionXLImg2ImgPipeline if family == "sdxl" else \
        diffusers.StableDiffusionImg2ImgPipeline
    inpaint_cls = diffusers.StableDiffusionXLInpaintPipeline if family == "sdxl" else \
        diffusers.StableDiffusionInpaintPipeline
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    pipe.enable_deepcache(interval=3, branch=2)
    _run(pipe)
    assert [k for *_, k in pipe.deepcache_stats()["evaluations"]] == ["full", "cached", "cached"] * 2
    for cls, kw in ((img2img_cls, dict(image=image, strength=0.5)),
                    (inpaint_cls, dict(image=image, mask_image=mask, strength=1.0))):
        variant = diffkit.DiffusionPipeline.from_pipe(cls(**pipe.components))
        assert variant.deepcache == pipe.deepcache  # the same U-Net carries the hook
        out = _run(variant, num_inference_steps=6, **kw)
        steps = 3 if "mask_image" not in kw else 6
        kinds = [k for *_, k in variant.deepcache_stats()["evaluations"]]
        assert kinds == ["full" if s % 3 == 0 else "cached" for s in range(steps)], cls.__name__
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_nets", [1, 2], ids=["ControlNet", "Multi-ControlNet"])
def test_controlnet_pipeline(load_tiny, n_nets):
    pipe = load_tiny("sd15")
    nets = []
    for i in range(n_nets):
        torch.manual_seed(i)
        nets.append(ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8)))
        for p in nets[-1].parameters():
            torch.nn.init.normal_(p, std=0.05)
    cn = diffkit.DiffusionPipeline.from_pipe(diffusers.StableDiffusionControlNetPipeline(
        **pipe.components, controlnet=nets[0] if n_nets == 1 else nets))
    cn.set_progress_bar_config(disable=True)
    conds = [torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2 + i)) for i in range(n_nets)]
    image = conds[0] if n_nets == 1 else conds
    ref = _run(cn, image=image, guidance_scale=7.5)
    cn.enable_deepcache(interval=1)
    assert torch.equal(_run(cn, image=image, guidance_scale=7.5), ref)
    for guess_mode in (False, True):
        apply_deepcache(cn.unet, interval=3, branch=4)  # U-Net only: the ControlNet runs in full every step
        unpaired = _run(cn, image=image, guidance_scale=7.5, guess_mode=guess_mode)
        cn.enable_deepcache(interval=3, branch=4)  # the pipeline pairs its ControlNet(s)
        counter, cn_mid = Counter(cn.unet), []
        handles = [net.mid_block.register_forward_hook(lambda *a, calls=cn_mid: calls.append(1)) for net in nets]
        out = _run(cn, image=image, guidance_scale=7.5, guess_mode=guess_mode)
        counter.close()
        for h in handles:
            h.remove()
        assert counter.kinds == ["full", "cached", "cached"] * 2
        assert len(cn_mid) == 2 * n_nets  # each ControlNet's deep half ran on the full steps only
        assert torch.equal(out, unpaired)  # and its skipped residuals were never read
        assert torch.isfinite(out).all() and not torch.equal(out, ref)


def test_enable_deepcache_errors_name_the_parameter(load_tiny):
    pipe = load_tiny("sd15")
    with pytest.raises(ValueError, match="interval must be an integer >= 1, got 0"):
        pipe.enable_deepcache(interval=0)
    with pytest.raises(ValueError, match=r"branch must be in \[0, 8\] for this U-Net \(9 skip connections\), got 11"):
        pipe.enable_deepcache(branch=11)
    with pytest.raises(ValueError, match="schedule must be one of"):
        pipe.enable_deepcache(schedule="exponential")
    assert pipe.deepcache is None
    pipe.enable_deepcache(interval=3, schedule="non-uniform", center=20)
    with pytest.raises(ValueError, match=r"center must be a step index in \[0, 5\] for 6 steps, got 20"):
        _run(pipe)


# ---------------------------------------------------------------------------------------------- torch.compile
def _mini_unet():
    """Two levels, one layer per block: the cheapest U-Net with SD's block types (dynamo tracing is slow)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4,
                                cross_attention_dim=32, norm_num_groups=4).eval()


def test_torch_compile_two_graphs_no_recompilation(load_tiny):
    """A compiled U-Net traces one graph for full steps and one for cached steps, then never recompiles:
    not across steps, not across pipeline calls, not when the interval changes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    pipe = load_tiny("sd15")
    pipe.unet = _mini_unet()
    pipe.enable_deepcache(interval=3, branch=1)
    eager = _run(pipe, num_inference_steps=4)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo's graphs and guards; the backend does not matter
    pipe.unet = torch.compile(pipe.unet, backend=counter)
    try:
        for _ in range(3):
            assert torch.equal(_run(pipe, num_inference_steps=4), eager)
        assert counter.frame_count == 2
        assert pipe.deepcache_stats()["full"] == 2
        pipe.enable_deepcache(interval=2, branch=1)  # same branch: same hooks, same graphs
        _run(pipe, num_inference_steps=4)
        assert pipe.deepcache_stats()["full"] == 2 and [e[2] for e in pipe.deepcache_stats()["evaluations"]] == [
            "full", "cached", "full", "cached"]
        assert counter.frame_count == 2
    finally:
        torch._dynamo.reset()
