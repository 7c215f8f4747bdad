"""Evaluation: concept accuracy and erasure metrics (UA / IRA / CRA) read by the oracle, KID / FID on its
features, saturation, PSNR, and seeded batched generation (sharded with accelerate when launched so).

Every metric is a pure function of labels, features or images; ``evaluate_concepts`` and
``erasure_report`` run a pipeline and the oracle and apply them. The CLI is ``diffkit eval``.
"""

from .accuracy import concept_accuracy, cross_domain_retain_accuracy, in_domain_retain_accuracy, unlearning_accuracy
from .concepts import (
    ConceptResult,
    PromptSpec,
    classify_specs,
    erasure_report,
    evaluate_concepts,
    shapes_erasure_prompts,
    shapes_prompt_specs,
)
from .fid import fid, frechet_distance, gaussian_stats
from .generation import generate_images
from .images import to_float_images, to_uint8_images
from .kid import kid, mmd2_unbiased, polynomial_kernel
from .psnr import mean_psnr, psnr
from .saturation import hsv_saturation, image_saturation, mean_saturation
from .stats import Difference, Rate, bootstrap_interval, paired_difference, rate, verdict, wilson_interval

__all__ = [
    "ConceptResult",
    "Difference",
    "Rate",
    "bootstrap_interval",
    "paired_difference",
    "rate",
    "verdict",
    "wilson_interval",
    "PromptSpec",
    "classify_specs",
    "concept_accuracy",
    "cross_domain_retain_accuracy",
    "erasure_report",
    "evaluate_concepts",
    "fid",
    "frechet_distance",
    "gaussian_stats",
    "generate_images",
    "hsv_saturation",
    "image_saturation",
    "in_domain_retain_accuracy",
    "kid",
    "mean_psnr",
    "mean_saturation",
    "mmd2_unbiased",
    "polynomial_kernel",
    "psnr",
    "shapes_erasure_prompts",
    "shapes_prompt_specs",
    "to_float_images",
    "to_uint8_images",
    "unlearning_accuracy",
]
