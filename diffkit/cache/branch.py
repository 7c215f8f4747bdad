"""Skip branches of a ``UNet2DConditionModel``: what a DeepCache cached step runs at branch ``b``.

The U-Net's down path produces skip connections in order: skip 0 is the ``conv_in`` output, then one
skip per down *layer* (a resnet with its attention, or a downsampler). The up path consumes them in
reverse, one per up resnet. Branch ``b`` (the reference helper's ``cache_branch_id``; the paper's
branch ``b + 1``) is skip ``b``: a cached step recomputes the down layers producing skips ``1..b`` and
the up layers consuming skips ``b..0``; the up layer consuming skip ``b`` is fed the *deep feature*
cached at the last full step, i.e. the hidden state that entered it then (the output of the up layer
before it, or of the up block / mid block before it). With ``layers_per_block=2`` a down block
produces 3 skips, so ``b = 3 x block + layer`` as in the reference helper.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.unets.unet_2d_blocks import (
    CrossAttnDownBlock2D,
    CrossAttnUpBlock2D,
    DownBlock2D,
    UpBlock2D,
)
from diffusers.utils.torch_utils import unwrap_module

#: Block classes whose forward DeepCache's shallow path reproduces layer by layer.
SUPPORTED_DOWN = (CrossAttnDownBlock2D, DownBlock2D)
SUPPORTED_UP = (CrossAttnUpBlock2D, UpBlock2D)


@dataclass(frozen=True)
class BranchPlan:
    """The cached-step program for one branch of one U-Net architecture.

    ``down``: the down layers to run, ``(block, "layer", i)`` (resnet i + attention i) or
    ``(block, "downsample", 0)``, in order. ``up_block``/``up_layer``: the first up layer to run
    (``up_blocks[up_block].resnets[up_layer]``, which receives the deep feature); every later layer
    and upsampler of the up path runs too. ``source``: where the deep feature is captured on a full
    step, ``("up_block_input", k)`` (the ``hidden_states`` entering ``up_blocks[k]``) or
    ``("layer_output", k, i)`` (the output of ``up_blocks[k]``'s attention i, or resnet i).
    """

    branch: int
    num_branches: int
    down: tuple[tuple[int, str, int], ...]
    up_block: int
    up_layer: int
    source: tuple

    def source_module_name(self, unet) -> str:
        if self.source[0] == "up_block_input":
            return f"up_blocks.{self.source[1]} (its hidden_states input)"
        _, k, i = self.source
        kind = "attentions" if hasattr(unet.up_blocks[k], "attentions") else "resnets"
        return f"up_blocks.{k}.{kind}.{i}"


def check_unet(unet) -> UNet2DConditionModel:
    """Return the (unwrapped) U-Net, or raise ``ValueError`` if DeepCache cannot run on it."""
    unet = unwrap_module(unet)
    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(
            f"DeepCache needs a diffusers UNet2DConditionModel (SD 1.x/2.x/XL); got {type(unet).__name__}. "
            f"Allowed: UNet2DConditionModel with down blocks {[c.__name__ for c in SUPPORTED_DOWN]} and up blocks "
            f"{[c.__name__ for c in SUPPORTED_UP]}"
        )
    for name, blocks, allowed in (("down", unet.down_blocks, SUPPORTED_DOWN), ("up", unet.up_blocks, SUPPORTED_UP)):
        for i, block in enumerate(blocks):
            if type(block) not in allowed:
                raise ValueError(
                    f"DeepCache does not support {name}_blocks.{i} of type {type(block).__name__}; "
                    f"allowed: {[c.__name__ for c in allowed]}"
                )
            for attn in getattr(block, "attentions", ()):
                if not isinstance(attn, Transformer2DModel):
                    raise ValueError(
                        f"DeepCache does not support attention modules of type {type(attn).__name__} in "
                        f"{name}_blocks.{i}; allowed: Transformer2DModel"
                    )
    return unet


def down_layers(unet) -> tuple[tuple[int, str, int], ...]:
    """The down layers in forward order; down layer ``j`` produces skip ``j + 1``."""
    out = []
    for k, block in enumerate(unet.down_blocks):
        out += [(k, "layer", i) for i in range(len(block.resnets))]
        if block.downsamplers is not None:
            out.append((k, "downsample", 0))
    return tuple(out)


def up_layers(unet) -> tuple[tuple[int, int], ...]:
    """The up resnets ``(block, i)`` in forward order; up layer ``q`` consumes skip ``S - 1 - q``."""
    return tuple((k, i) for k, block in enumerate(unet.up_blocks) for i in range(len(block.resnets)))


def num_branches(unet) -> int:
    """The number of skip connections S (branch ids are 0..S-1)."""
    unet = check_unet(unet)
    return 1 + len(down_layers(unet))


def branch_plan(unet, branch: int) -> BranchPlan:
    """The :class:`BranchPlan` of ``branch`` for ``unet``; ``ValueError`` if the U-Net has no such branch."""
    unet = check_unet(unet)
    downs, ups = down_layers(unet), up_layers(unet)
    s = 1 + len(downs)
    if len(ups) != s:  # pragma: no cover - every UNet2DConditionModel config satisfies this
        raise ValueError(f"U-Net has {s} skip connections but {len(ups)} up resnets; DeepCache cannot split it")
    if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < s:
        raise ValueError(f"branch must be in [0, {s - 1}] for this U-Net ({s} skip connections), got {branch!r}")
    k, i = ups[s - 1 - branch]
    source = ("up_block_input", k) if i == 0 else ("layer_output", k, i - 1)
    return BranchPlan(branch, s, downs[:branch], k, i, source)


def describe_branch(unet, branch: int) -> dict[str, list[str] | str]:
    """The modules a cached step at ``branch`` runs, and where its deep feature comes from (for docs)."""
    unet = check_unet(unet)
    plan = branch_plan(unet, branch)
    down = []
    for k, kind, i in plan.down:
        block = unet.down_blocks[k]
        if kind == "downsample":
            down.append(f"down_blocks.{k}.downsamplers.0")
        else:
            down.append(f"down_blocks.{k}.resnets.{i}")
            if hasattr(block, "attentions"):
                down.append(f"down_blocks.{k}.attentions.{i}")
    up = []
    for k in range(plan.up_block, len(unet.up_blocks)):
        block = unet.up_blocks[k]
        for i in range(plan.up_layer if k == plan.up_block else 0, len(block.resnets)):
            up.append(f"up_blocks.{k}.resnets.{i}")
            if hasattr(block, "attentions"):
                up.append(f"up_blocks.{k}.attentions.{i}")
        if block.upsamplers is not None:
            up.append(f"up_blocks.{k}.upsamplers.0")
    add = ["add_embedding"] if getattr(unet, "add_embedding", None) is not None else []
    pre = ["time_proj", "time_embedding", *add, "conv_in"]
    post = ["conv_norm_out", "conv_act", "conv_out"] if unet.conv_norm_out is not None else ["conv_out"]
    return {"pre": pre, "down": down, "up": up, "post": post, "deep_feature": plan.source_module_name(unet)}
