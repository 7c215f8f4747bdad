"""What every diffkit pipeline adds to its diffusers parent: the call with ``guidance=``, and the features.

The features attach through :mod:`diffkit.lifecycle` (``pipe.features``); the mixins of
``diffkit.cache``, ``diffkit.pruning``, ``diffkit.erasure`` and ``diffkit.guidance.inversion`` keep their
public verbs as thin calls into it. This one owns the call: it resets every feature's per-call state
and attaches the guidance object for the call's duration.
"""

from __future__ import annotations

import inspect

from ..attention import get_attention_backend
from ..guidance.base import Guidance
from ..guidance.diffusers_guiders import DiffusersGuidance, is_diffusers_guider
from ..lifecycle import FeatureSet, features_of
from . import guided_call  # noqa: F401  (registers the "guidance" feature kind)

# Any value > 1 makes diffusers build the [uncond, cond] batch; the guidance object does the rest.
_BATCHING_SCALE = 2.0


class GuidanceCallMixin:
    """``pipe(..., guidance=CFG(7.5) | APG(...) | CFGPlusPlus(...) | <a diffusers.guiders guider>)``;
    ``guidance=None`` is diffusers. A diffusers guider is wrapped in :class:`DiffusersGuidance`."""

    @property
    def features(self) -> FeatureSet:
        """The attached diffkit features, in attach order (see :mod:`diffkit.lifecycle`)."""
        return features_of(self)

    def __call__(self, *args, guidance: Guidance | None = None, **kwargs):
        features = features_of(self)
        features.begin_call()
        parent_call = super().__call__
        if guidance is None:
            return parent_call(*args, **kwargs)
        if is_diffusers_guider(guidance):
            guidance = DiffusersGuidance(guidance)
        if not isinstance(guidance, Guidance):
            raise TypeError(
                "guidance must be a diffkit.guidance object (CFG, APG, CFGPlusPlus, DiffusersGuidance) or a "
                "diffusers.guiders guider (ClassifierFreeGuidance, AdaptiveProjectedGuidance, "
                "PerturbedAttentionGuidance, SmoothedEnergyGuidance, SkipLayerGuidance, ...), "
                f"got {type(guidance).__name__}"
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
            raise ValueError("guidance_rescale belongs to diffusers' own CFG; it cannot be combined with guidance= "
                             "(a diffusers guider takes its own: e.g. ClassifierFreeGuidance(guidance_rescale=0.7))")
        if self.unet.config.get("time_cond_proj_dim") is not None:
            raise ValueError("this U-Net embeds the guidance scale (time_cond_proj_dim); guidance= is not supported")
        if not guidance.needs_unconditional:
            call["guidance_scale"] = 1.0
            return parent_call(**call)
        # diffusers batches [uncond, cond] when guidance_scale > 1; our do_classifier_free_guidance
        # keeps that true for any scale while the call is guided, and callbacks read the object's scale.
        call["guidance_scale"] = max(float(guidance.scale), _BATCHING_SCALE)
        with features.attached_for_call("guidance", guidance):
            self.__dict__["_diffkit_guided_scale"] = call["guidance_scale"], float(guidance.scale)
            try:
                return parent_call(**call)
            finally:
                self.__dict__.pop("_diffkit_guided_scale", None)

    @property
    def guidance_scale(self):
        """diffusers' ``guidance_scale``; under ``guidance=``, the guidance object's scale."""
        guided = self.__dict__.get("_diffkit_guided_scale")
        if guided is not None and self._guidance_scale == guided[0]:
            return guided[1]
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        """diffusers' rule (``guidance_scale > 1``, no guidance-embedding U-Net); under ``guidance=`` it
        stays true until a callback turns guidance off by lowering ``_guidance_scale`` to 1 or below."""
        guided = self.__dict__.get("_diffkit_guided_scale")
        if guided is not None and self._guidance_scale == guided[0]:
            return True
        return super().do_classifier_free_guidance

    # Attention backend, as a pipeline verb (a thin call into the lifecycle; see diffkit.attention).
    def set_attention_backend(self, backend: str) -> None:
        features_of(self).attach("attention", backend)

    @property
    def attention_backend(self) -> str:
        return get_attention_backend(self.unet)
