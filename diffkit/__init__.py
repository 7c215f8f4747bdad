"""diffkit: composable extensions for Hugging Face diffusers (guidance, caching, pruning, erasure)."""

__version__ = "0.1.0"

from .attention import get_attention_backend, set_attention_backend  # noqa: E402
from .pipelines import DiffusionPipeline, to_diffkit  # noqa: E402

__all__ = ["DiffusionPipeline", "__version__", "get_attention_backend", "set_attention_backend", "to_diffkit"]
