"""A diffkit ControlNet pipeline over a tiny SD 1.5's components, with a seeded random ControlNet."""

from __future__ import annotations

import diffusers
import torch

import diffkit


def controlnet_pipeline(pipe, seed: int = 0):
    torch.manual_seed(seed)
    net = diffusers.ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    cn = diffkit.DiffusionPipeline.from_pipe(diffusers.StableDiffusionControlNetPipeline(**pipe.components,
                                                                                          controlnet=net))
    cn.set_progress_bar_config(disable=True)
    return cn, net
