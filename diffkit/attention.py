"""Memory-efficient attention backend choice: PyTorch SDPA by default, xformers on request.

``set_attention_backend(unet, "sdpa" | "xformers")`` sets every attention processor of a model;
``get_attention_backend(unet)`` reads back which one is active ("sdpa", "xformers", "mixed" or the
processor class name for anything else, e.g. a pruning mask processor). Asking for xformers when it
is not installed is an error, never a silent fallback.

On a pipeline the backend is the lifecycle feature ``"attention"`` (touches the attention processors;
stage "processors"; reattachable): ``pipe.set_attention_backend(b)`` attaches it, remembering the
processors it replaced, and detaching it puts those back exactly.
"""

from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0, XFormersAttnProcessor
from diffusers.utils import is_xformers_available

from .lifecycle import FeatureKind, Touch, register_feature

BACKENDS = ("sdpa", "xformers")


def set_attention_backend(model, backend: str = "sdpa") -> None:
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "xformers":
        if not is_xformers_available():
            raise RuntimeError(
                "attention backend 'xformers' was requested but xformers is not installed; "
                "install it with `pip install diffkit[xformers]` or use 'sdpa'"
            )
        model.set_attn_processor(XFormersAttnProcessor())
    else:
        model.set_attn_processor(AttnProcessor2_0())


def get_attention_backend(model) -> str:
    names = {type(p).__name__ for p in model.attn_processors.values()}
    if not names:
        return "none"
    if names == {"AttnProcessor2_0"}:
        return "sdpa"
    if names == {"XFormersAttnProcessor"}:
        return "xformers"
    return names.pop() if len(names) == 1 else "mixed"


class AttentionState:
    """The processors a backend replaced (by module name), to put back on detach."""

    def __init__(self, unet, previous: dict):
        self.unet = unet
        self.previous = previous


def _attach(pipe, backend: str) -> AttentionState:
    previous = dict(pipe.unet.attn_processors)
    set_attention_backend(pipe.unet, backend)
    return AttentionState(pipe.unet, previous)


def _detach(pipe, state: AttentionState) -> None:
    state.unet.set_attn_processor(state.previous)


ATTENTION = register_feature(FeatureKind("attention", Touch.ATTENTION_PROCESSORS, "processors", _attach, _detach,
                                         reattachable=True, describe=str))
