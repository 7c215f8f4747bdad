"""What every diffkit pipeline adds to its diffusers parent: the ``guidance=`` argument.

The other features attach through their own mixins (``diffkit.cache``, ``diffkit.pruning``,
``diffkit.erasure``, ``diffkit.guidance.inversion``); this one only owns the call.
"""

from __future__ import annotations

import inspect

from ..attention import get_attention_backend, set_attention_backend
from ..guidance.base import Guidance
from .guided_call import guided_call

# Any value > 1 makes diffusers build the [uncond, cond] batch; the guidance object does the rest.
_BATCHING_SCALE = 2.0


def reset_unet_hooks(unet) -> None:
    """Reset stateful U-Net hooks (DeepCache's cache) so no state crosses pipeline calls."""
    registry = getattr(unet, "_diffusers_hook", None)
    if registry is not None:
        registry.reset_stateful_hooks()


class GuidanceCallMixin:
    """``pipe(..., guidance=CFG(7.5) | APG(...) | CFGPlusPlus(...))``; ``guidance=None`` is diffusers."""

    def __call__(self, *args, guidance: Guidance | None = None, **kwargs):
        reset_unet_hooks(self.unet)
        parent_call = super().__call__
        if guidance is None:
            return parent_call(*args, **kwargs)
        if not isinstance(guidance, Guidance):
            raise TypeError(
                f"guidance must be a diffkit.guidance object (CFG, APG, CFGPlusPlus), got {type(guidance).__name__}"
            )
        try:
            call = inspect.signature(parent_call).bind_partial(*args, **kwargs).arguments
        except TypeError as e:
            raise TypeError(f"{type(self).__name__}.__call__: {e}") from None
        call.update(call.pop("kwargs", {}))
        given = call.get("guidance_scale")
        if given is not None and float(given) != float(guidance.scale):
            raise ValueError(
                f"guidance_scale={given} disagrees with guidance={guidance!r}; pass only guidance= "
                f"(or a guidance_scale equal to its scale)"
            )
        if call.get("guidance_rescale"):
            raise ValueError("guidance_rescale belongs to diffusers' own CFG; it cannot be combined with guidance=")
        if self.unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("this U-Net embeds the guidance scale (time_cond_proj_dim); guidance= is not supported")
        if not guidance.needs_unconditional:
            call["guidance_scale"] = 1.0
            return parent_call(**call)
        call["guidance_scale"] = max(float(guidance.scale), _BATCHING_SCALE)
        with guided_call(self, guidance):
            return parent_call(**call)

    # Attention backend, as a pipeline method for convenience (see diffkit.attention).
    def set_attention_backend(self, backend: str) -> None:
        set_attention_backend(self.unet, backend)

    @property
    def attention_backend(self) -> str:
        return get_attention_backend(self.unet)
