"""The offline zoo: tokenizer, tiny pipelines, full-size architectures."""

from __future__ import annotations

import pytest
import torch

from diffkit.zoo import (
    build_clip_tokenizer,
    build_full_unet,
    build_tiny_pipeline,
    count_parameters,
    full_unet_config,
    tiny_unet_config,
)


def test_tokenizer_words_are_single_tokens_and_unknown_words_split():
    tok = build_clip_tokenizer(["pentagram", "crimson"])
    assert tok.tokenize("a crimson pentagram") == ["a</w>", "crimson</w>", "pentagram</w>"]
    assert len(tok.tokenize("xyzzy")) > 1  # unknown words still tokenize, in pieces
    ids = tok("a red star", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[4] == tok.eos_token_id
    assert build_clip_tokenizer(["crimson", "pentagram"]).get_vocab() == tok.get_vocab()  # order-free


def test_tokenizer_rejects_non_alphabetic_words():
    with pytest.raises(ValueError, match="tokenizer words must be alphabetic ASCII, got 'x1'"):
        build_clip_tokenizer(["x1"])


def test_tokenizer_round_trip(tmp_path):
    from transformers import CLIPTokenizer

    tok = build_clip_tokenizer(["crimson"])
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again("a crimson star").input_ids == tok("a crimson star").input_ids


@pytest.mark.parametrize("family,prediction", [("sd15", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")])
def test_tiny_pipeline_is_deterministic(family, prediction):
    a, b = build_tiny_pipeline(family, seed=1), build_tiny_pipeline(family, seed=1)
    assert a.scheduler.config.prediction_type == prediction
    for (n, p), (_, q) in zip(a.unet.named_parameters(), b.unet.named_parameters()):
        assert torch.equal(p, q), n
    out = a("a red star", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 4, 8, 8)
    c = build_tiny_pipeline(family, seed=2)
    assert not torch.equal(a.unet.conv_in.weight, c.unet.conv_in.weight)


def test_tiny_family_validation():
    with pytest.raises(ValueError, match=r"family must be one of \('sd15', 'sd2', 'sdxl'\), got 'sd3'"):
        build_tiny_pipeline("sd3")
    with pytest.raises(ValueError, match="family must be one of"):
        tiny_unet_config("flux")


def test_sdxl_tiny_config_is_consistent():
    cfg = tiny_unet_config("sdxl")
    assert cfg["projection_class_embeddings_input_dim"] == 6 * cfg["addition_time_embed_dim"] + 32
    assert cfg["cross_attention_dim"] == 64


def test_full_size_architectures_on_meta():
    # Parameter counts of the real checkpoints' U-Nets: SD1.5 859.52M, SDXL 2567.46M.
    assert count_parameters(build_full_unet("sd15")) == 859_520_964
    assert count_parameters(build_full_unet("sdxl")) == 2_567_463_684
    assert build_full_unet("sd15").conv_in.weight.device.type == "meta"
    with pytest.raises(ValueError, match=r"arch must be one of \['sd15', 'sdxl'\], got 'sd3'"):
        full_unet_config("sd3")
