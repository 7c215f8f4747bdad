"""Structural pruning (EcoDiff): learned hard-concrete masks over heads, FFN neurons and resnet channels,
trained end to end over the sampling trajectory with time-step gradient checkpointing, then physical
slicing into a smaller U-Net saved as a pruning spec directory (``pipe.load_pruning(dir)``).
"""

from .binarize import KeepRatios, binarize, kept_fractions, parameter_reduction, round_count
from .hard_concrete import HardConcrete
from .learn import MaskLearningConfig, MaskLearningResult, MaskLogits, learn_masks, logit_gradients
from .masking import MaskAttachment, MaskedAttnProcessor2_0, MaskState, binary_masks
from .slim import apply_spec, load_pruning_into, make_spec, save_pruning
from .spec import BaseModelMismatch, PruningSpec, module_fingerprint, read_spec
from .stats import parameter_shares, unet_macs, unet_parameters
from .surgery import ZeroAttention, ZeroFeedForward, ZeroResnet, prune_unet
from .trajectory import Sampler, capture_conditioning, check_scheduler, reverse_walk, run_trajectory
from .units import KINDS, Unit, find_units, unit_param_costs

__all__ = [
    "KINDS", "BaseModelMismatch", "HardConcrete", "KeepRatios", "MaskAttachment", "MaskLearningConfig",
    "MaskLearningResult", "MaskLogits", "MaskState", "MaskedAttnProcessor2_0", "PruningSpec", "Sampler", "Unit",
    "ZeroAttention", "ZeroFeedForward", "ZeroResnet", "apply_spec", "binarize", "binary_masks",
    "capture_conditioning", "check_scheduler", "find_units", "kept_fractions", "module_fingerprint", "learn_masks",
    "load_pruning_into", "logit_gradients", "make_spec", "parameter_reduction", "parameter_shares",
    "prune_unet", "read_spec", "reverse_walk", "round_count", "run_trajectory", "save_pruning",
    "unet_macs", "unet_parameters", "unit_param_costs",
]
