"""Parameters and multiply-accumulates of a U-Net, and parameter shares by structural unit kind.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the ``meta`` device (the module's
weights are swapped for meta tensors with ``torch.func.functional_call``: nothing is computed or
allocated), for one U-Net evaluation of batch 1 (FLOPs / 2 = MACs; counted ops: matmuls, convolutions,
attention).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from .units import KINDS, find_units, unit_param_costs


def unet_parameters(unet: torch.nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


def _meta_inputs(unet, sample_shape=None):
    cfg = unet.config
    dt = next(unet.parameters()).dtype
    if sample_shape is None:
        s = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        sample_shape = (1, cfg.in_channels, s, s)
    cross = cfg.cross_attention_dim
    cross = cross if isinstance(cross, int) else cross[0]
    kwargs = {"encoder_hidden_states": torch.empty(sample_shape[0], 77, cross, device="meta", dtype=dt)}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.empty(sample_shape[0], pooled, device="meta", dtype=dt),
            "time_ids": torch.empty(sample_shape[0], 6, device="meta", dtype=dt),
        }
    return torch.empty(sample_shape, device="meta", dtype=dt), torch.tensor(999, device="meta"), kwargs


def unet_macs(unet: torch.nn.Module, sample_shape=None) -> int:
    """Multiply-accumulates of one U-Net evaluation at ``sample_shape`` (default: its config's size)."""
    sample, t, kwargs = _meta_inputs(unet, sample_shape)
    state = {k: torch.empty_like(v, device="meta") for k, v in unet.state_dict(keep_vars=True).items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        torch.func.functional_call(unet, state, (sample, t), {**kwargs, "return_dict": False})
    return counter.get_total_flops() // 2


def parameter_shares(unet: torch.nn.Module) -> dict[str, float]:
    """Fraction of the U-Net's parameters held by each unit kind's prunable part.

    ``self_attention`` / ``cross_attention`` / ``ffn`` / ``resnet_channels`` count what pruning every
    unit would remove; ``resnets`` counts whole ResnetBlock2D modules (the convention of EcoDiff's
    shares); ``other`` is everything not in a prunable part.
    """
    total = unet_parameters(unet)
    units = find_units(unet, KINDS)
    parts = {"self_attention": 0, "cross_attention": 0, "ffn": 0, "resnet_channels": 0}
    for u in units:
        fixed, per, _ = unit_param_costs(unet, u)
        if u.kind == "heads":
            parts["cross_attention" if u.name.endswith("attn2") else "self_attention"] += per * u.size
        elif u.kind == "ffn":
            parts["ffn"] += per * u.size
        else:
            parts["resnet_channels"] += per * u.size
    from diffusers.models.resnet import ResnetBlock2D

    resnets = sum(sum(p.numel() for p in m.parameters()) for m in unet.modules() if isinstance(m, ResnetBlock2D))
    out = {k: v / total for k, v in parts.items()}
    out["resnets"] = resnets / total
    out["prunable"] = sum(parts.values()) / total
    out["total_params"] = total
    return out
