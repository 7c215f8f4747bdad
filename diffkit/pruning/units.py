"""The prunable structural units of a diffusers U-Net, found by module type and keyed by module name.

Three kinds:

* ``heads``: the attention heads of every ``Attention`` inside a ``BasicTransformerBlock`` (self- and
  cross-attention). The mask scales each head's output before ``to_out``.
* ``ffn``: the hidden neurons of every transformer block's ``FeedForward`` (after the GEGLU gate, i.e.
  the input of ``ff.net[2]``).
* ``channels``: the inner channels of every ``ResnetBlock2D`` (conv1 output = conv2 input), in whole
  GroupNorm groups of ``norm2``. Group statistics are computed per group, so removing a whole group
  leaves the other groups' normalisation unchanged and slicing is exact; removing single channels
  would change the statistics of the rest of their group. One unit = one group (SD: 10-40 channels).

Names are ``unet.named_modules()`` names, so masks, specs and checkpoints do not depend on call order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.activations import GEGLU
from diffusers.models.attention import BasicTransformerBlock, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D

KINDS = ("heads", "ffn", "channels")


@dataclass(frozen=True)
class Unit:
    """One prunable module: ``size`` units of ``width`` channels each."""

    name: str
    kind: str
    size: int
    width: int

    @property
    def channels(self) -> int:
        return self.size * self.width


def _resnet_is_prunable(m: ResnetBlock2D) -> bool:
    return (
        isinstance(m.norm2, torch.nn.GroupNorm)
        and m.time_embedding_norm == "default"
        and m.upsample is None
        and m.downsample is None
        and m.conv2.kernel_size == (3, 3)
        and m.conv2.stride == (1, 1)
    )


def find_units(unet: torch.nn.Module, kinds=KINDS) -> list[Unit]:
    """Every prunable unit group of ``unet`` of the given kinds, in ``named_modules`` order."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"unit kinds must be among {KINDS}, got {bad}")
    units: list[Unit] = []
    for name, m in unet.named_modules():
        if isinstance(m, BasicTransformerBlock):
            for attr in ("attn1", "attn2"):
                attn = getattr(m, attr, None)
                if "heads" in kinds and isinstance(attn, Attention) and attn.heads > 0:
                    units.append(Unit(f"{name}.{attr}", "heads", attn.heads, attn.inner_dim // attn.heads))
            ff = getattr(m, "ff", None)
            if "ffn" in kinds and isinstance(ff, FeedForward) and isinstance(ff.net[2], torch.nn.Linear):
                units.append(Unit(f"{name}.ff", "ffn", ff.net[2].in_features, 1))
        elif "channels" in kinds and isinstance(m, ResnetBlock2D) and _resnet_is_prunable(m):
            groups = m.norm2.num_groups
            units.append(Unit(name, "channels", groups, m.norm2.num_channels // groups))
    return units


def ffn_is_gated(ff: FeedForward) -> bool:
    """GEGLU's projection holds 2 x inner rows: the value half, then the gate half."""
    return isinstance(ff.net[0], GEGLU)


def unit_param_costs(unet: torch.nn.Module, unit: Unit) -> tuple[int, int, int]:
    """``(fixed, per_unit, when_empty)`` parameter counts of a unit's module.

    With ``k >= 1`` units kept the module holds ``fixed + k * per_unit`` parameters; with none it holds
    ``when_empty`` (the output bias, plus a resnet's shortcut). Checked against real surgery in tests.
    """
    m = unet.get_submodule(unit.name)
    w = unit.width
    nb = lambda lin: 0 if lin is None or lin.bias is None else lin.bias.numel()  # noqa: E731
    count = lambda mod: 0 if mod is None else sum(p.numel() for p in mod.parameters())  # noqa: E731
    if unit.kind == "heads":
        out = m.to_out[0]
        per = 0
        for lin in (m.to_q, m.to_k, m.to_v):
            per += w * (lin.in_features + (1 if lin.bias is not None else 0))
        per += out.out_features * w
        fixed = count(m) - per * unit.size
        return fixed, per, nb(out)
    if unit.kind == "ffn":
        proj, out = m.net[0].proj, m.net[2]
        rows = 2 if ffn_is_gated(m) else 1
        per = rows * (proj.in_features + (1 if proj.bias is not None else 0)) + out.out_features
        fixed = count(m) - per * unit.size
        return fixed, per, nb(out)
    # channels: conv1 out rows, time_emb_proj rows, norm2 affine, conv2 in columns (one group = w channels)
    c1, c2 = m.conv1, m.conv2
    k1 = c1.kernel_size[0] * c1.kernel_size[1]
    k2 = c2.kernel_size[0] * c2.kernel_size[1]
    per_ch = c1.in_channels * k1 + (1 if c1.bias is not None else 0)
    if m.time_emb_proj is not None:
        per_ch += m.time_emb_proj.in_features + (1 if m.time_emb_proj.bias is not None else 0)
    per_ch += 2 if m.norm2.affine else 0
    per_ch += c2.out_channels * k2
    per = per_ch * w
    fixed = count(m) - per * unit.size
    return fixed, per, count(m.conv_shortcut) + nb(c2)
