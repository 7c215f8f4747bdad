"""Foundation: drop-in loading and exact parity with diffusers (guidance=None and guidance=CFG)."""

from __future__ import annotations

import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

import diffkit
from diffkit.guidance import CFG
from diffkit.pipelines import PIPELINES

SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}
IMG2IMG = {"sd15": diffusers.StableDiffusionImg2ImgPipeline, "sd2": diffusers.StableDiffusionImg2ImgPipeline,
           "sdxl": diffusers.StableDiffusionXLImg2ImgPipeline}


def _pair(tiny_paths, family, task, scheduler):
    """The same weights as a plain diffusers pipeline and as a diffkit pipeline."""
    base = diffusers.DiffusionPipeline.from_pretrained(tiny_paths[family])
    if task == "img2img":
        base = IMG2IMG[family](**base.components)
    base.scheduler = SCHEDULERS[scheduler].from_config(base.scheduler.config)
    base.set_progress_bar_config(disable=True)
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    return base, ours


def _init_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_parity_with_diffusers(tiny_paths, family, task, scheduler):
    base, ours = _pair(tiny_paths, family, task, scheduler)
    kw = dict(prompt="a red star", num_inference_steps=4, output_type="latent")
    if task == "img2img":
        kw.update(image=_init_image(), strength=0.75)
    ref = base(generator=torch.Generator().manual_seed(3), guidance_scale=7.5, **kw).images
    plain = ours(generator=torch.Generator().manual_seed(3), guidance_scale=7.5, **kw).images
    cfg = ours(generator=torch.Generator().manual_seed(3), guidance=CFG(7.5), **kw).images
    assert ref.shape[1:] == (4, 8, 8)
    assert (plain - ref).abs().max().item() == 0.0
    assert (cfg - ref).abs().max().item() == 0.0


def test_cfg_scale_one_is_conditional_only(load_tiny, gen):
    pipe = load_tiny("sd15")
    calls = []
    pipe.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    a = pipe("a red star", num_inference_steps=2, guidance=CFG(1.0), output_type="latent", generator=gen(0)).images
    b = pipe("a red star", num_inference_steps=2, guidance_scale=1.0, output_type="latent", generator=gen(0)).images
    assert calls == [1, 1, 1, 1]  # no unconditional batch, like diffusers
    assert torch.equal(a, b)


def test_cfg_below_one_interpolates(load_tiny, gen):
    pipe = load_tiny("sd15")
    halves = []
    pipe.unet.register_forward_hook(lambda m, a, o: halves.append(o[0].detach().clone()))
    pipe("a red star", num_inference_steps=1, guidance=CFG(0.5), output_type="latent", generator=gen(0))
    assert halves[0].shape[0] == 2  # both halves evaluated


def test_loading_returns_diffkit_subclass(tiny_paths):
    for family, cls in [("sd15", diffusers.StableDiffusionPipeline), ("sdxl", diffusers.StableDiffusionXLPipeline)]:
        pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths[family])
        assert isinstance(pipe, cls)
        assert type(pipe) is PIPELINES[cls.__name__]
        assert type(pipe).__module__.startswith("diffkit")


def test_dtype_kwarg_is_diffusers(tiny_paths):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"], dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16


def test_from_pipe_shares_weights(tiny_paths):
    base = diffusers.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    ours = diffkit.DiffusionPipeline.from_pipe(base)
    assert ours.unet is base.unet and ours.text_encoder is base.text_encoder
    assert diffkit.DiffusionPipeline.from_pipe(ours) is ours


def test_save_pretrained_stays_loadable_by_diffusers(tiny_paths, tmp_path):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.save_pretrained(tmp_path / "resaved")
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path / "resaved")
    assert type(again) is diffusers.StableDiffusionPipeline


def test_unsupported_pipeline_warns_and_loads_plain(tiny_paths):
    base = diffusers.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    other = diffusers.StableDiffusionPAGPipeline(**base.components)
    with pytest.warns(UserWarning, match=r"StableDiffusionPAGPipeline.*unavailable: guidance=, enable_deepcache"):
        out = diffkit.DiffusionPipeline.from_pipe(other)
    assert out is other


def test_from_pipe_rejects_non_pipeline():
    with pytest.raises(TypeError, match="from_pipe needs a diffusers pipeline, got int"):
        diffkit.DiffusionPipeline.from_pipe(3)
    with pytest.raises(TypeError, match="from_pretrained"):
        diffkit.DiffusionPipeline()


def test_missing_model_is_diffusers_error(tmp_path):
    with pytest.raises(ValueError, match="neither a valid local path nor a valid repo id"):
        diffkit.DiffusionPipeline.from_pretrained(str(tmp_path / "missing"))


def test_guidance_argument_errors(load_tiny):
    pipe = load_tiny("sd15")
    kw = dict(num_inference_steps=1, output_type="latent")
    with pytest.raises(ValueError, match=r"guidance_scale=5.0 disagrees with guidance=CFG\(scale=7.5\)"):
        pipe("x", guidance=CFG(7.5), guidance_scale=5.0, **kw)
    with pytest.raises(ValueError, match="guidance_rescale belongs to diffusers"):
        pipe("x", guidance=CFG(7.5), guidance_rescale=0.7, **kw)
    with pytest.raises(TypeError, match="guidance must be a diffkit.guidance object .* got float"):
        pipe("x", guidance=7.5, **kw)
    # agreeing guidance_scale is accepted
    pipe("x", guidance=CFG(7.5), guidance_scale=7.5, **kw)


def test_guidance_hook_removed_after_call_and_on_error(load_tiny):
    pipe = load_tiny("sd15")
    pipe("x", guidance=CFG(3.0), num_inference_steps=1, output_type="latent")
    assert "step" not in vars(pipe.scheduler)
    assert pipe.unet._diffusers_hook.get_hook("diffkit.guidance") is None
    with pytest.raises(ValueError):
        pipe("x", guidance=CFG(3.0), num_inference_steps=1, prompt_embeds=torch.zeros(1, 77, 32))
    assert "step" not in vars(pipe.scheduler)
    assert pipe.unet._diffusers_hook.get_hook("diffkit.guidance") is None


def test_cfg_validation():
    with pytest.raises(ValueError, match=r"scale must be in \[0, inf\), got -1.0"):
        CFG(-1.0)
    with pytest.raises(ValueError, match="scale must be a number, got 'big'"):
        CFG("big")
    assert CFG(7.5).needs_unconditional and not CFG(1.0).needs_unconditional


def test_cfg_combine_formula():
    u, c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = CFG(4.0)(u, c, None, {})
    assert out.renoise_pred is None
    assert torch.equal(out.pred, u + 4.0 * (c - u))


def test_pipeline_warnings_are_quiet(load_tiny):
    pipe = load_tiny("sd15")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("x", guidance=CFG(2.0), num_inference_steps=1, output_type="latent")


def test_controlnet_and_inpaint_parity(tiny_paths):
    base = diffusers.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    torch.manual_seed(0)
    controlnet = diffusers.ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 16, 16, 16))
    cn = diffusers.StableDiffusionControlNetPipeline(**base.components, controlnet=controlnet)
    inpaint = diffusers.StableDiffusionInpaintPipeline(**base.components)
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16))
    cases = [(cn, dict(image=_init_image())), (inpaint, dict(image=_init_image(), mask_image=mask))]
    for plain, extra in cases:
        plain.set_progress_bar_config(disable=True)
        ours = diffkit.DiffusionPipeline.from_pipe(plain)
        assert type(ours).__name__ == type(plain).__name__ and type(ours) is not type(plain)
        kw = dict(prompt="a red star", num_inference_steps=3, output_type="latent", **extra)
        ref = plain(generator=torch.Generator().manual_seed(0), guidance_scale=5.0, **kw).images
        got = ours(generator=torch.Generator().manual_seed(0), guidance=CFG(5.0), **kw).images
        assert (got - ref).abs().max().item() == 0.0


def test_every_supported_class_is_a_subclass_of_its_parent():
    from diffkit.pipelines import SUPPORTED

    for name in SUPPORTED:
        assert issubclass(PIPELINES[name], getattr(diffusers, name))
        assert PIPELINES[name].__name__ == name
