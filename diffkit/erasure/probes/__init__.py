"""Non-text probes of erased concepts ("When Are Concepts Erased From Diffusion Models?", Lu, Kriplani,
Gandikota, Pham, Bau, Hegde, Cohen; NeurIPS 2025; reference code: kevinlu4588/WhenAreConceptsErased).

An erasure can hide a concept from the text path while the model still draws it. These probes leave the
prompt alone and change what else the erased model is given:

* :func:`noise_search_probe` (``noise_search.py``): many initial noises, keep the one the oracle scores most
  concept-like;
* :func:`completion_probe` (``completion.py``): a concept image noised part-way, completed (optionally only
  inside a mask: inpainting) by the erased model under a neutral prompt.

Each returns a :class:`ProbeReport` whose ``hits`` give the rate at which the probe brings the concept back
(``diffkit.evaluation.stats.rate(report.hits)``: k, n and the 95% Wilson interval; the evaluation layer's
``diffkit.evaluation.robustness`` does this with the oracle).
"""

from .completion import CompletionConfig, complete_from, completion_probe
from .noise_search import NoiseSearchConfig, noise_search_probe
from .report import ProbeReport

__all__ = ["CompletionConfig", "NoiseSearchConfig", "ProbeReport", "complete_from", "completion_probe",
           "noise_search_probe"]
