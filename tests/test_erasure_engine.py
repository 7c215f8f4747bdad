"""Engine paths the other tests do not cover: text-encoder erasure, gradient checkpointing, precision, descent."""

from __future__ import annotations

import pytest
import torch

import diffkit
from diffkit.erasure import ESD, ErasureConfig, erase, make_accelerator, read_artifact, select_parameters
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.zoo import build_tiny_pipeline


def _esd(**kw):
    return ErasureConfig(**{**dict(method="esd", concept="red star", steps=2, sample_steps=2, lr=1e-3), **kw})


def test_text_encoder_erasure_is_plug_and_play(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    unet_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    result = erase(pipe, _esd(parameters="text-encoder"), tmp_path / "te", progress=False)
    art = read_artifact(result.path)
    assert art.tensors and all(k.startswith("text_encoder.") and "embeddings" not in k for k in art.tensors)
    assert art.sidecar["base_model"]["components"].keys() == {"text_encoder"}
    assert all(torch.equal(v, unet_before[k]) for k, v in pipe.unet.state_dict().items())
    assert any(not torch.equal(v, te_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    # Another pipeline (different U-Net) with the same text encoder takes the artifact ...
    other = diffkit.to_diffkit(build_tiny_pipeline("sd15", seed=1))
    other.text_encoder.load_state_dict(te_before)
    other.load_erasure(result.path)
    assert all(torch.equal(other.text_encoder.get_parameter(k[13:]), v) for k, v in art.tensors.items())
    other.unload_erasure()
    assert all(torch.equal(v, te_before[k]) for k, v in other.text_encoder.state_dict().items())
    # ... one with another text encoder does not.
    stranger = diffkit.to_diffkit(build_tiny_pipeline("sd15", seed=1))
    with pytest.raises(ValueError, match=r"tensor text_encoder\..* differs from the one it was trained from"):
        stranger.load_erasure(result.path)


def test_gradient_checkpointing_gives_the_same_artifact(load_tiny, tmp_path):
    a = erase(load_tiny("sd15"), _esd(), tmp_path / "a", progress=False)
    pipe = load_tiny("sd15")
    b = erase(pipe, _esd(gradient_checkpointing=True), tmp_path / "b", progress=False)
    assert not pipe.unet.is_gradient_checkpointing  # switched back off after the job
    ta, tb = read_artifact(a.path).tensors, read_artifact(b.path).tensors
    assert all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


def test_mixed_precision_is_one_per_process(load_tiny, tmp_path):
    acc = make_accelerator("no")
    with pytest.raises(ValueError, match="mixed_precision='bf16' but this process already runs accelerate with "
                                         "mixed_precision='no'"):
        make_accelerator("bf16")
    with pytest.raises(ValueError, match="mixed_precision='bf16' but the accelerator runs 'no'"):
        erase(load_tiny("sd15"), _esd(mixed_precision="bf16"), tmp_path / "m", accelerator=acc, progress=False)


def test_esd_step_descends_its_loss(load_tiny):
    pipe = load_tiny("sd15")
    cfg = _esd(concept=["red star"], batch_size=2, eta=1.0, lr=1e-3)
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    params = select_parameters(ctx.components, "esd-x")
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=cfg.lr)
    state = ctx.rng.get_state()
    method, losses = ESD(cfg), []
    for _ in range(6):  # the same draws every time: a fixed batch
        ctx.rng.set_state(state)
        opt.zero_grad()
        loss, _ = method.loss(ctx)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_v_prediction_model_erases(load_tiny, tmp_path):
    result = erase(load_tiny("sd2"), _esd(parameters="esd-u", steps=3), tmp_path / "v", progress=False)
    losses = result.sidecar["metrics"]["losses"]
    assert len(losses) == 3 and all(0 < x < 10 for x in losses)
    assert result.sidecar["metrics"]["trained_tensors"] == len(read_artifact(result.path).tensors)
