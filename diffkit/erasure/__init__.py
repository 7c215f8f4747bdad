"""Concept erasure: one training engine, ESD and SalUn, artifacts, batch jobs, the prompt attack.

    from diffkit.erasure import ErasureConfig, erase
    cfg = ErasureConfig(method="esd", concept="red", steps=200)
    erase(pipe, cfg, "erased/esd-red")          # trains, writes the artifact, leaves pipe erased
    pipe.unload_erasure(); pipe.load_erasure("erased/esd-red")
"""

from .advunlearn import AdvUnlearn, AdvUnlearnConfig
from .artifact import read_artifact, read_sidecar
from .config import ErasureConfig
from .doco import DoCo, DoCoConfig, PatchDiscriminator
from .engine import ErasureResult, TrainingContext, erase, make_accelerator
from .esd import ESD, ESDConfig, esd_target
from .method import METHODS, ErasureMethod, MethodConfig, get_method, get_method_config, register_method
from .salun import SalUn, SalUnConfig, saliency_mask
from .selection import PRESETS, select_parameters
from .surgery import (
    PreserveGradient,
    concept_preserving_gradients,
    project_conflicting,
    reference_correction,
)

__all__ = [
    "AdvUnlearn",
    "AdvUnlearnConfig",
    "DoCo",
    "DoCoConfig",
    "ESDConfig",
    "MethodConfig",
    "SalUnConfig",
    "get_method_config",
    "reference_correction",
    "PatchDiscriminator",
    "PreserveGradient",
    "concept_preserving_gradients",
    "project_conflicting",
    "ESD",
    "METHODS",
    "PRESETS",
    "ErasureConfig",
    "ErasureMethod",
    "ErasureResult",
    "SalUn",
    "TrainingContext",
    "erase",
    "esd_target",
    "get_method",
    "make_accelerator",
    "read_artifact",
    "read_sidecar",
    "register_method",
    "saliency_mask",
    "select_parameters",
]
