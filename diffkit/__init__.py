"""diffkit: composable extensions for Hugging Face diffusers (guidance, caching, pruning, erasure).

The public names are imported on first use, so that ``import diffkit.cli`` (and the command line) can
configure logging before diffusers is imported.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DiffusionPipeline": "diffkit.pipelines",
    "to_diffkit": "diffkit.pipelines",
    "get_attention_backend": "diffkit.attention",
    "set_attention_backend": "diffkit.attention",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'diffkit' has no attribute {name!r}")
