"""Physical pruning: slice the weights of kept units so the U-Net is smaller and faster.

For a module whose kept index list is empty the whole module is replaced by one that returns what the
masked module returns when every unit is masked: its output bias (attention: ``to_out`` bias broadcast
over the tokens; FFN: ``net[2]`` bias; resnet: ``(shortcut(x) + conv2.bias) / output_scale_factor``).
"""

from __future__ import annotations

import torch
from torch import nn

from .units import Unit, ffn_is_gated


def _rows(kept: list[int], width: int, device) -> torch.Tensor:
    """Feature indices of the kept units (unit i owns features [i*width, (i+1)*width))."""
    k = torch.as_tensor(sorted(kept), dtype=torch.long, device=device)
    return (k[:, None] * width + torch.arange(width, device=device)[None, :]).reshape(-1)


def _slice_linear(lin: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = lin.weight
    if rows is not None:
        w = w[rows]
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.detach().clone(), requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        b = lin.bias if rows is None else lin.bias[rows]
        new.bias = nn.Parameter(b.detach().clone(), requires_grad=lin.bias.requires_grad)
    return new


def _slice_conv(conv: nn.Conv2d, out_idx=None, in_idx=None) -> nn.Conv2d:
    w = conv.weight
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None:
        w = w[:, in_idx]
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.detach().clone(), requires_grad=conv.weight.requires_grad)
    if conv.bias is not None:
        b = conv.bias if out_idx is None else conv.bias[out_idx]
        new.bias = nn.Parameter(b.detach().clone(), requires_grad=conv.bias.requires_grad)
    return new


class ZeroAttention(nn.Module):
    """A fully pruned attention: every head masked, so only ``to_out``'s bias remains."""

    def __init__(self, bias: torch.Tensor | None, out_dim: int, residual_connection=False, rescale=1.0):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_dim = out_dim
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        shape = (*hidden_states.shape[:-1], self.out_dim)
        if self.bias is None:
            out = hidden_states.new_zeros(shape)
        else:
            out = self.bias.to(hidden_states.dtype).expand(shape)
        if self.residual_connection:
            out = out + hidden_states
        return out / self.rescale_output_factor


class ZeroFeedForward(nn.Module):
    """A fully pruned FFN: returns the bias of its second linear layer."""

    def __init__(self, bias: torch.Tensor | None, out_dim: int):
        super().__init__()
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_dim = out_dim

    def forward(self, hidden_states, *args, **kwargs):
        shape = (*hidden_states.shape[:-1], self.out_dim)
        if self.bias is None:
            return hidden_states.new_zeros(shape)
        return self.bias.to(hidden_states.dtype).expand(shape)


class ZeroResnet(nn.Module):
    """A fully pruned resnet block: ``(shortcut(x) + conv2.bias) / output_scale_factor``."""

    def __init__(self, conv_shortcut: nn.Module | None, bias: torch.Tensor | None, out_channels: int, scale: float):
        super().__init__()
        self.conv_shortcut = conv_shortcut
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.out_channels = out_channels
        self.output_scale_factor = scale

    def forward(self, input_tensor, temb=None, *args, **kwargs):
        x = input_tensor if self.conv_shortcut is None else self.conv_shortcut(input_tensor)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[None, :, None, None]
        return x / self.output_scale_factor


def _slim_attention(attn, kept: list[int], width: int):
    if not kept:
        out = attn.to_out[0]
        return ZeroAttention(out.bias, out.out_features, attn.residual_connection, attn.rescale_output_factor)
    rows = _rows(kept, width, attn.to_q.weight.device)
    attn.to_q = _slice_linear(attn.to_q, rows=rows)
    attn.to_k = _slice_linear(attn.to_k, rows=rows)
    attn.to_v = _slice_linear(attn.to_v, rows=rows)
    attn.to_out[0] = _slice_linear(attn.to_out[0], cols=rows)
    attn.heads = len(kept)
    attn.sliceable_head_dim = len(kept)
    attn.inner_dim = attn.inner_kv_dim = len(kept) * width
    return attn


def _slim_ffn(ff, kept: list[int]):
    out = ff.net[2]
    if not kept:
        return ZeroFeedForward(out.bias, out.out_features)
    idx = _rows(kept, 1, out.weight.device)
    act = ff.net[0]
    if ffn_is_gated(ff):  # rows [0, inner) are the value half, [inner, 2 inner) the gate half
        inner = out.in_features
        act.proj = _slice_linear(act.proj, rows=torch.cat([idx, idx + inner]))
    else:
        act.proj = _slice_linear(act.proj, rows=idx)
    ff.net[2] = _slice_linear(out, cols=idx)
    return ff


def _slim_resnet(res, kept: list[int], width: int):
    if not kept:
        return ZeroResnet(res.conv_shortcut, res.conv2.bias, res.conv2.out_channels, res.output_scale_factor)
    idx = _rows(kept, width, res.conv1.weight.device)
    res.conv1 = _slice_conv(res.conv1, out_idx=idx)
    if res.time_emb_proj is not None:
        res.time_emb_proj = _slice_linear(res.time_emb_proj, rows=idx)
    old = res.norm2
    norm = nn.GroupNorm(len(kept), len(idx), eps=old.eps, affine=old.affine, device="meta", dtype=old.weight.dtype)
    if old.affine:
        norm.weight = nn.Parameter(old.weight[idx].detach().clone(), requires_grad=old.weight.requires_grad)
        norm.bias = nn.Parameter(old.bias[idx].detach().clone(), requires_grad=old.bias.requires_grad)
    res.norm2 = norm
    res.conv2 = _slice_conv(res.conv2, in_idx=idx)
    return res


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def slim_module(module: nn.Module, unit: Unit, kept: list[int]) -> nn.Module:
    """Return ``module`` sliced to ``kept`` (in place where possible; a Zero* module when empty)."""
    kept = sorted(set(int(i) for i in kept))
    if kept and (kept[0] < 0 or kept[-1] >= unit.size):
        raise ValueError(f"kept indices of {unit.name} must lie in [0, {unit.size}), got {kept[0]}..{kept[-1]}")
    if unit.kind == "heads":
        return _slim_attention(module, kept, unit.width)
    if unit.kind == "ffn":
        return _slim_ffn(module, kept)
    return _slim_resnet(module, kept, unit.width)


def prune_unet(unet: nn.Module, units: list[Unit], kept: dict[str, list[int]]) -> dict[str, nn.Module]:
    """Slice ``unet`` in place to the kept units; return ``{name: new module}`` of the changed modules.

    Modules whose kept list covers every unit are left untouched (and not returned).
    """
    by_name = {u.name: u for u in units}
    unknown = sorted(set(kept) - set(by_name))
    if unknown:
        raise ValueError(f"kept indices name modules that are not prunable units of this U-Net: {unknown[:3]}")
    changed = {}
    for name, idx in kept.items():
        unit = by_name[name]
        if len(set(idx)) == unit.size:
            continue
        new = slim_module(unet.get_submodule(name), unit, idx)
        _set_submodule(unet, name, new)
        changed[name] = new
    return changed


#: ``{parameter name in the full module: (name in the slim module or None, ((dim, indices), ...))}``
ParameterMap = dict[str, tuple[str | None, tuple[tuple[int, torch.Tensor], ...]]]


def parameter_map(module: nn.Module, unit: Unit, kept: list[int]) -> ParameterMap:
    """Where each parameter of the *full* ``module`` goes when it is slimmed to ``kept`` (as
    :func:`slim_module` slices it): the slim module's parameter name and the index selections per
    dimension, or ``None`` for a parameter that no longer exists. An erasure trained on the unpruned
    model is mapped onto a pruned one with it (``select`` the same rows/columns surgery kept)."""
    kept = sorted(set(int(i) for i in kept))
    names = [n for n, _ in module.named_parameters()]
    out: ParameterMap = {n: (n, ()) for n in names}
    device = next(module.parameters()).device
    if not kept:
        keep_bias = {"heads": "to_out.0.bias", "ffn": "net.2.bias", "channels": "conv2.bias"}[unit.kind]
        for n in names:
            shortcut = unit.kind == "channels" and n.startswith("conv_shortcut.")
            out[n] = ("bias", ()) if n == keep_bias else (n, ()) if shortcut else (None, ())
        return out
    if unit.kind == "heads":
        rows = _rows(kept, unit.width, device)
        for proj in ("to_q", "to_k", "to_v"):
            for p in ("weight", "bias"):
                out[f"{proj}.{p}"] = (f"{proj}.{p}", ((0, rows),))
        out["to_out.0.weight"] = ("to_out.0.weight", ((1, rows),))
    elif unit.kind == "ffn":
        idx = _rows(kept, 1, device)
        if ffn_is_gated(module):
            inner = module.net[2].in_features
            idx_in = torch.cat([idx, idx + inner])
        else:
            idx_in = idx
        for p in ("weight", "bias"):
            out[f"net.0.proj.{p}"] = (f"net.0.proj.{p}", ((0, idx_in),))
        out["net.2.weight"] = ("net.2.weight", ((1, idx),))
    else:
        idx = _rows(kept, unit.width, device)
        for layer in ("conv1", "time_emb_proj", "norm2"):
            for p in ("weight", "bias"):
                out[f"{layer}.{p}"] = (f"{layer}.{p}", ((0, idx),))
        out["conv2.weight"] = ("conv2.weight", ((1, idx),))
    return {n: v for n, v in out.items() if n in names}


def select(value: torch.Tensor, selections) -> torch.Tensor:
    """Apply a :data:`ParameterMap` entry's index selections to a full-size value."""
    for dim, idx in selections:
        value = value.index_select(dim, idx.to(value.device))
    return value
