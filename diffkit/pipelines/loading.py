"""``diffkit.DiffusionPipeline``: diffusers' loader, returning diffkit's subclass of what it loaded."""

from __future__ import annotations

import warnings

import diffusers

from .classes import BY_PARENT, FEATURES, PIPELINES


def to_diffkit(pipe):
    """Return ``pipe`` as the matching diffkit pipeline, sharing its components (no weights copied).

    A diffkit pipeline is returned unchanged; an unsupported class is returned as is, with a warning.
    """
    if type(pipe) in PIPELINES.values():
        return pipe
    target = BY_PARENT.get(type(pipe))
    if target is None:
        warnings.warn(
            f"diffkit does not support {type(pipe).__name__}; it is loaded as plain diffusers and these "
            f"diffkit features are unavailable: {', '.join(FEATURES)}. Supported: {', '.join(PIPELINES)}.",
            UserWarning,
            stacklevel=3,
        )
        return pipe
    # A new object of the diffkit class over the same state: the same modules, config, dtype, device
    # and offload hooks. (diffusers' own from_pipe would re-instantiate and cast to float32.)
    new = object.__new__(target)
    new.__dict__.update(pipe.__dict__)
    return new


class DiffusionPipeline:
    """Drop-in for :class:`diffusers.DiffusionPipeline` loading, returning diffkit pipelines.

    ``from_pretrained`` takes exactly diffusers' arguments and loads exactly what diffusers loads.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("use diffkit.DiffusionPipeline.from_pretrained(...) or .from_pipe(pipeline)")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = diffusers.DiffusionPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return to_diffkit(pipe)

    @classmethod
    def from_pipe(cls, pipeline):
        if not isinstance(pipeline, diffusers.DiffusionPipeline):
            raise TypeError(f"from_pipe needs a diffusers pipeline, got {type(pipeline).__name__}")
        return to_diffkit(pipeline)
