"""Attention backend selection."""

from __future__ import annotations

import pytest

from diffkit.attention import get_attention_backend, set_attention_backend


def test_sdpa_is_default_and_readable(load_tiny):
    pipe = load_tiny("sd15")
    assert pipe.attention_backend == "sdpa"
    set_attention_backend(pipe.unet, "sdpa")
    assert get_attention_backend(pipe.unet) == "sdpa"


def test_xformers_missing_is_an_error(load_tiny, monkeypatch):
    monkeypatch.setattr("diffkit.attention.is_xformers_available", lambda: False)
    pipe = load_tiny("sd15")
    msg = r"xformers is not installed; install it with `pip install diffkit\[xformers\]`"
    with pytest.raises(RuntimeError, match=msg):
        pipe.set_attention_backend("xformers")
    assert pipe.attention_backend == "sdpa"  # nothing changed


def test_unknown_backend(load_tiny):
    with pytest.raises(ValueError, match=r"attention backend must be one of \('sdpa', 'xformers'\), got 'flash'"):
        set_attention_backend(load_tiny("sd15").unet, "flash")


def test_custom_and_mixed_processors_are_named(load_tiny):
    from diffusers.models.attention_processor import AttnProcessor

    unet = load_tiny("sd15").unet
    unet.set_attn_processor(AttnProcessor())
    assert get_attention_backend(unet) == "AttnProcessor"
    procs = dict(unet.attn_processors)
    first = next(iter(procs))
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs[first] = AttnProcessor2_0()
    unet.set_attn_processor(procs)
    assert get_attention_backend(unet) == "mixed"
