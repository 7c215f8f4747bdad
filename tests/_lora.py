"""A user's LoRA for the tests: made with peft on a U-Net, saved as diffusers saves one (no diffkit code)."""

from __future__ import annotations

import copy

import diffusers
import torch

RANK, ALPHA = 4, 8  # peft's scaling alpha / r = 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def make_lora(unet, out, seed=0, rank=RANK, alpha=ALPHA, targets=TARGETS):
    """A random LoRA (B != 0, small) on a copy of ``unet``, saved with ``save_lora_weights`` to ``out``."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    unet.add_adapter(cfg)
    with torch.no_grad():  # keep the delta small: a LoRA a person would train, not noise
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.mul_(0.05)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers,
                                                        unet_lora_adapter_metadata=cfg.to_dict())
    return out
