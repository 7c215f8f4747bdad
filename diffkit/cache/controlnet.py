"""DeepCache for SD ControlNet: on a cached step the ControlNet computes only the residuals the U-Net uses.

A cached U-Net step at branch ``b`` adds ControlNet residuals to skips ``0..b`` only (the deep skips and
the mid block belong to the skipped part). So on such a step ``shallow_controlnet_forward`` runs the
ControlNet's embeddings, ``conv_in`` + conditioning embedding and its first ``b`` down layers, their zero
convolutions and scaling, exactly as ``ControlNetModel.forward`` does; the deep residuals and the mid
residual of the returned tuple are those of the last full step, which keeps shapes right for the
pipeline (guess mode, Multi-ControlNet sums) and which the cached U-Net step never reads.

``ShallowControlNetHook`` takes its decision from the U-Net's ``DeepCacheHook`` (the ControlNet is
evaluated just before the U-Net at the same timestep), and tells it that the residuals it handed out are
partial, so a U-Net evaluation that would then have to run in full raises instead of silently using them.
"""

from __future__ import annotations

import torch
from diffusers import ControlNetModel
from diffusers.hooks import ModelHook
from diffusers.models.controlnets.controlnet import ControlNetOutput
from diffusers.utils.peft_utils import apply_lora_scale
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device, unwrap_module

from .branch import SUPPORTED_DOWN, down_layers

HOOK_NAME = "diffkit.deepcache.controlnet"

CONTROLNET_PARAMS = (
    "sample",
    "timestep",
    "encoder_hidden_states",
    "controlnet_cond",
    "conditioning_scale",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "added_cond_kwargs",
    "cross_attention_kwargs",
    "guess_mode",
    "return_dict",
)


def controlnets_of(controlnet) -> list[ControlNetModel]:
    """The ``ControlNetModel``s in ``controlnet`` (one, or the nets of a ``MultiControlNetModel``)."""
    controlnet = unwrap_module(controlnet)
    nets = list(getattr(controlnet, "nets", [controlnet]))
    out = []
    for net in nets:
        net = unwrap_module(net)
        if not isinstance(net, ControlNetModel):
            raise ValueError(f"DeepCache supports ControlNetModel (or MultiControlNetModel of them); got "
                             f"{type(net).__name__}")
        out.append(net)
    return out


def check_controlnet(net: ControlNetModel, unet) -> None:
    """The ControlNet must mirror the U-Net's down path (``ControlNetModel.from_unet`` does)."""
    for i, block in enumerate(net.down_blocks):
        if type(block) not in SUPPORTED_DOWN:
            raise ValueError(f"DeepCache does not support ControlNet down_blocks.{i} of type {type(block).__name__}; "
                             f"allowed: {[c.__name__ for c in SUPPORTED_DOWN]}")
    keys = ("down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim")
    differ = [k for k in keys if _as_tuple(net.config.get(k)) != _as_tuple(unet.config.get(k))]
    if differ or down_layers(net) != down_layers(unet):
        raise ValueError(f"the ControlNet's down path does not match the U-Net's (config {differ or 'layers'} "
                         "differ); DeepCache cannot pair their skip connections")


def _as_tuple(v):
    return tuple(v) if isinstance(v, list | tuple) else v


@apply_lora_scale("cross_attention_kwargs")
def shallow_controlnet_forward(net, plan, last, sample, timestep, encoder_hidden_states, controlnet_cond,
                               conditioning_scale=1.0, class_labels=None, timestep_cond=None, attention_mask=None,
                               added_cond_kwargs=None, cross_attention_kwargs=None, guess_mode=False,
                               return_dict=True):
    """ControlNet residuals ``0..b`` of ``plan``'s branch, computed; the rest copied from ``last`` (down, mid)."""
    # --- as ControlNetModel.forward: channel order, mask bias, embeddings ---
    order = net.config.controlnet_conditioning_channel_order
    if order == "bgr":
        controlnet_cond = torch.flip(controlnet_cond, dims=[1])
    elif order != "rgb":
        raise ValueError(f"unknown `controlnet_conditioning_channel_order`: {order}")
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    timesteps = timestep
    if not torch.is_tensor(timesteps):
        dtype = maybe_adjust_dtype_for_device(torch.float64 if isinstance(timestep, float) else torch.int64,
                                              sample.device)
        timesteps = torch.tensor([timesteps], dtype=dtype, device=sample.device)
    elif len(timesteps.shape) == 0:
        timesteps = timesteps[None].to(sample.device)
    timesteps = timesteps.expand(sample.shape[0])
    emb = net.time_embedding(net.time_proj(timesteps).to(dtype=sample.dtype), timestep_cond)
    if net.class_embedding is not None:
        if class_labels is None:
            raise ValueError("class_labels should be provided when num_class_embeds > 0")
        if net.config.class_embed_type == "timestep":
            class_labels = net.time_proj(class_labels)
        emb = emb + net.class_embedding(class_labels).to(dtype=net.dtype)
    aug_emb = None
    if net.config.addition_embed_type == "text":
        aug_emb = net.add_embedding(encoder_hidden_states)
    elif net.config.addition_embed_type == "text_time":
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        time_embeds = net.add_time_proj(time_ids.flatten()).reshape((text_embeds.shape[0], -1))
        aug_emb = net.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    emb = emb + aug_emb if aug_emb is not None else emb
    h = net.conv_in(sample) + net.controlnet_cond_embedding(controlnet_cond)

    # --- the shallow down path and its zero convolutions ---
    skips = [h]
    for k, kind, i in plan.down:
        block = net.down_blocks[k]
        if kind == "downsample":
            for downsampler in block.downsamplers:
                h = downsampler(h)
        else:
            h = block.resnets[i](h, emb)
            if hasattr(block, "attentions"):
                h = block.attentions[i](h, encoder_hidden_states=encoder_hidden_states,
                                        cross_attention_kwargs=cross_attention_kwargs, attention_mask=attention_mask,
                                        return_dict=False)[0]
        skips.append(h)
    residuals = [zero_conv(s) for s, zero_conv in zip(skips, net.controlnet_down_blocks)]
    n_all = len(net.controlnet_down_blocks)
    if guess_mode and not net.config.global_pool_conditions:
        scales = torch.logspace(-1, 0, n_all + 1, device=sample.device) * conditioning_scale
        residuals = [r * s for r, s in zip(residuals, scales)]
    else:
        residuals = [r * conditioning_scale for r in residuals]
    if net.config.global_pool_conditions:
        residuals = [torch.mean(r, dim=(2, 3), keepdim=True) for r in residuals]
    last_down, last_mid = last
    down = [*residuals, *last_down[len(residuals):]]
    if not return_dict:
        return (down, last_mid)
    return ControlNetOutput(down_block_res_samples=down, mid_block_res_sample=last_mid)


class ShallowControlNetHook(ModelHook):
    """Runs a ControlNet in full or shallow, following the paired U-Net's DeepCache decision."""

    _is_stateful = True

    def __init__(self, unet_hook):
        super().__init__()
        self.unet_hook = unet_hook
        self.last = None  # (down residuals, mid residual, (batch, height, width)) of the last full evaluation

    def reset_state(self, module):
        self.last = None
        return module

    @torch.compiler.disable
    def _shallow(self, call: dict) -> bool:
        sample = call["sample"]
        key = (sample.shape[0], *sample.shape[2:])
        if self.last is None or self.last[2] != key or self.unet_hook.predict_full(call["timestep"]):
            return False
        self.unet_hook.state.partial_residuals_at = self.unet_hook.timestep_value(call["timestep"])
        return True

    def new_forward(self, module, *args, **kwargs):
        if len(args) > len(CONTROLNET_PARAMS):
            raise TypeError(f"ControlNetModel.forward takes {len(CONTROLNET_PARAMS)} arguments, got {len(args)}")
        call = dict(zip(CONTROLNET_PARAMS, args), **kwargs)
        if self._shallow(call):
            return shallow_controlnet_forward(module, self.unet_hook.plan, self.last[:2], **call)
        out = self.fn_ref.original_forward(*args, **kwargs)
        down, mid = (out[0], out[1]) if isinstance(out, tuple) else (out.down_block_res_samples,
                                                                      out.mid_block_res_sample)
        sample = call["sample"]
        self.last = (list(down), mid, (sample.shape[0], *sample.shape[2:]))
        return out
