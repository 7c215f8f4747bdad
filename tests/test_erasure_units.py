"""Small pieces: partial DDIM sampling, name lookup errors, mask bit packing, checksums, fingerprints."""

from __future__ import annotations

import pytest
import torch

from diffkit.erasure.artifact import (
    base_fingerprint,
    config_hash,
    pack_mask,
    tensor_checksum,
    tensor_checksums,
    unpack_mask,
)
from diffkit.erasure.sampling import cfg, ddim_scheduler, sample_until
from diffkit.erasure.selection import get_parameter, split_name


def test_sample_until_takes_each_latent_at_its_own_step(load_tiny):
    pipe = load_tiny("sd15")
    sched = ddim_scheduler(pipe.scheduler.config, 4)
    calls = []

    def predict(x, t, emb):  # a stand-in model: the prediction is a known function of x
        calls.append((x.shape[0], int(t[0])))
        return 0.1 * x + emb.mean() * 0

    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    emb = torch.zeros(3, 77, 32)
    stop = torch.tensor([0, 2, 4])
    x, t = sample_until(predict, sched, noise, emb, emb, stop, guidance=3.0)
    assert calls == [(6, int(sched.timesteps[i])) for i in range(4)]  # batched [uncond, cond], max(stop) steps
    ref = noise.clone()
    for i in range(4):
        ref = sched.step(cfg(0.1 * ref, 0.1 * ref, 3.0), sched.timesteps[i], ref).prev_sample
        if i == 1:
            assert torch.allclose(x[1], ref[1], atol=1e-6)
    assert torch.equal(x[0], noise[0]) and torch.allclose(x[2], ref[2], atol=1e-6)
    assert t.tolist() == [int(sched.timesteps[0]), int(sched.timesteps[2]), 0]
    assert torch.equal(cfg(torch.zeros(2), torch.ones(2), 7.5), torch.full((2,), 7.5))
    with pytest.raises(ValueError, match=r"stop indices must be in \[0, 4\] with one per latent, got \[5, 0, 0\]"):
        sample_until(predict, sched, noise, emb, emb, torch.tensor([5, 0, 0]), 3.0)


def test_qualified_name_errors(load_tiny):
    pipe = load_tiny("sd15")
    comps = {"unet": pipe.unet}
    assert get_parameter(comps, "unet.conv_in.weight") is pipe.unet.conv_in.weight
    assert split_name("text_encoder.a.b") == ("text_encoder", "a.b")
    with pytest.raises(ValueError, match=r"tensor name 'vae.x' must start with one of \('unet', 'text_encoder'\)"):
        split_name("vae.x")
    with pytest.raises(ValueError, match="this pipeline's unet has no tensor 'nope.weight'"):
        get_parameter(comps, "unet.nope.weight")
    with pytest.raises(ValueError, match="belongs to a text_encoder, which this pipeline lacks"):
        get_parameter(comps, "text_encoder.final_layer_norm.weight")


def test_mask_bits_roundtrip_and_checksums(load_tiny):
    m = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(0)) > 0.5
    bits = pack_mask(m)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-m.numel() // 8)
    assert torch.equal(unpack_mask(bits, m.numel()).reshape(m.shape), m)
    t = torch.linspace(-1, 1, 10)
    sums = tensor_checksums(t)
    assert sums["float32"] == tensor_checksum(t) and sums["float16"] == tensor_checksum(t.half())
    assert sums["bfloat16"] == tensor_checksum(t.bfloat16()) and len(set(sums.values())) == 3
    assert tensor_checksum(t) != tensor_checksum(t + 1e-6)
    a, b = load_tiny("sd15"), load_tiny("sd2")
    assert config_hash(a.unet) == config_hash(load_tiny("sd15").unet) != config_hash(b.unet)
    fp = base_fingerprint({"unet": a.unet}, {"unet.conv_in.bias": a.unet.conv_in.bias})
    assert fp["components"] == {"unet": config_hash(a.unet)}
    assert fp["tensors"]["unet.conv_in.bias"]["float32"] == tensor_checksum(a.unet.conv_in.bias)
    assert len(fp["fingerprint"]) == 16
