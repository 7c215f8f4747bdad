"""The cached step of DeepCache: the U-Net's shallow branch, fed the cached deep feature.

``shallow_forward(unet, plan, deep_feature, <UNet2DConditionModel.forward arguments>)`` returns what
``unet.forward`` returns, computing only (see :class:`~diffkit.cache.branch.BranchPlan`):

1. the embeddings and ``conv_in`` exactly as ``UNet2DConditionModel.forward`` does (time, class and
   SDXL text/size embeddings through the U-Net's own ``get_*`` methods, attention-mask biases, GLIGEN);
2. the down layers producing skips ``1..b``, then ControlNet residuals added to skips ``0..b``;
3. from the cached deep feature, the up layers consuming skips ``b..0`` (with FreeU when enabled, and
   the upsamplers in between), then ``conv_norm_out``/``conv_act``/``conv_out``.

Run on the same inputs as the full step that produced ``deep_feature``, this gives the full forward's
output exactly (the same operations on the same tensors); the tests check that for every branch.
"""

from __future__ import annotations

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils.peft_utils import apply_lora_scale
from diffusers.utils.torch_utils import apply_freeu

#: ``UNet2DConditionModel.forward``'s parameters after ``self``, in order (to bind positional args).
FORWARD_PARAMS = (
    "sample",
    "timestep",
    "encoder_hidden_states",
    "class_labels",
    "timestep_cond",
    "attention_mask",
    "cross_attention_kwargs",
    "added_cond_kwargs",
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "encoder_attention_mask",
    "return_dict",
)


def bind_forward_args(args: tuple, kwargs: dict) -> dict:
    """Map a ``unet(...)`` call's arguments to ``{parameter: value}`` (missing ones are absent)."""
    if len(args) > len(FORWARD_PARAMS):
        raise TypeError(f"UNet2DConditionModel.forward takes {len(FORWARD_PARAMS)} arguments, got {len(args)}")
    bound = dict(zip(FORWARD_PARAMS, args))
    for name, value in kwargs.items():
        if name not in FORWARD_PARAMS:
            raise TypeError(f"UNet2DConditionModel.forward got an unexpected keyword argument {name!r}")
        if name in bound:
            raise TypeError(f"UNet2DConditionModel.forward got multiple values for argument {name!r}")
        bound[name] = value
    return bound


def uses_adapter(call: dict) -> bool:
    """Whether a call carries T2I-Adapter residuals (which DeepCache does not support)."""
    if call.get("down_intrablock_additional_residuals") is not None:
        return True
    # diffusers' deprecated spelling: down residuals without a mid residual mean T2I-Adapter
    return call.get("down_block_additional_residuals") is not None and call.get("mid_block_additional_residual") is None


def _attn(block, i, h, ctx):
    return block.attentions[i](
        h,
        encoder_hidden_states=ctx["encoder_hidden_states"],
        cross_attention_kwargs=ctx["cross_attention_kwargs"],
        attention_mask=ctx["attention_mask"],
        encoder_attention_mask=ctx["encoder_attention_mask"],
        return_dict=False,
    )[0]


def _freeu(block):
    params = [getattr(block, n, None) for n in ("s1", "s2", "b1", "b2")]
    return params if all(params) else None


@apply_lora_scale("cross_attention_kwargs")
def shallow_forward(unet, plan, deep_feature: torch.Tensor, sample: torch.Tensor, timestep,
                    encoder_hidden_states: torch.Tensor, class_labels=None, timestep_cond=None,
                    attention_mask=None, cross_attention_kwargs=None, added_cond_kwargs=None,
                    down_block_additional_residuals=None, mid_block_additional_residual=None,
                    down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict=True):
    """One cached DeepCache step of ``unet`` (see the module docstring)."""
    if uses_adapter(dict(down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                         down_block_additional_residuals=down_block_additional_residuals,
                         mid_block_additional_residual=mid_block_additional_residual)):
        raise ValueError("DeepCache does not support T2I-Adapter residuals (down_intrablock_additional_residuals)")
    # --- as UNet2DConditionModel.forward: upsample sizes, mask biases, embeddings, conv_in ---
    up_factor = 2**unet.num_upsamplers
    forward_upsample_size = any(dim % up_factor != 0 for dim in sample.shape[-2:])
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if encoder_attention_mask is not None:
        encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)
    if unet.config.addition_embed_type == "image_hint":
        aug_emb, hint = aug_emb
        sample = torch.cat([sample, hint], dim=1)
    emb = emb + aug_emb if aug_emb is not None else emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
    )
    h = unet.conv_in(sample)
    if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen", None) is not None:
        cross_attention_kwargs = cross_attention_kwargs.copy()
        gligen_args = cross_attention_kwargs.pop("gligen")
        cross_attention_kwargs["gligen"] = {"objs": unet.position_net(**gligen_args)}
    ctx = dict(encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
               attention_mask=attention_mask, encoder_attention_mask=encoder_attention_mask)

    # --- the shallow down path: skips 0..b ---
    skips = [h]
    for k, kind, i in plan.down:
        block = unet.down_blocks[k]
        if kind == "downsample":
            for downsampler in block.downsamplers:
                h = downsampler(h)
        else:
            h = block.resnets[i](h, emb)
            if hasattr(block, "attentions"):
                h = _attn(block, i, h, ctx)
        skips.append(h)
    if down_block_additional_residuals is not None:  # ControlNet: its residuals for skips 0..b
        skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]

    # --- the shallow up path, entered with the cached deep feature ---
    h = deep_feature
    last = len(unet.up_blocks) - 1
    for k in range(plan.up_block, last + 1):
        block = unet.up_blocks[k]
        freeu = _freeu(block)
        for i in range(plan.up_layer if k == plan.up_block else 0, len(block.resnets)):
            res = skips.pop()
            if freeu is not None:
                s1, s2, b1, b2 = freeu
                h, res = apply_freeu(block.resolution_idx, h, res, s1=s1, s2=s2, b1=b1, b2=b2)
            h = block.resnets[i](torch.cat([h, res], dim=1), emb)
            if hasattr(block, "attentions"):
                h = _attn(block, i, h, ctx)
        if block.upsamplers is not None:
            upsample_size = skips[-1].shape[2:] if (k != last and forward_upsample_size) else None
            for upsampler in block.upsamplers:
                h = upsampler(h, upsample_size)
    if skips:  # pragma: no cover - guards the BranchPlan arithmetic
        raise RuntimeError(f"DeepCache shallow path left {len(skips)} skip connections unused")

    if unet.conv_norm_out:
        h = unet.conv_act(unet.conv_norm_out(h))
    h = unet.conv_out(h)
    if not return_dict:
        return (h,)
    return UNet2DConditionOutput(sample=h)
