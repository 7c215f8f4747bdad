"""Apply per-unit masks to a live U-Net: a masking attention processor and two forward pre-hooks.

* Heads: :class:`MaskedAttnProcessor2_0` is diffusers' ``AttnProcessor2_0`` (attention computed once,
  unchanged) plus, for the duration of its call, a pre-hook on ``attn.to_out[0]`` that multiplies each
  head's slice of the concatenated head outputs by its mask value.
* FFN neurons: a pre-hook on ``ff.net[2]`` scales the GEGLU output (value * gelu(gate)) per neuron.
* Resnet channels: a pre-hook on ``resnet.conv2`` scales its input (after norm2, activation, dropout)
  per GroupNorm group.

All read their mask from one shared :class:`MaskState` (``masks[name]`` is a tensor of the unit
count, or absent for "unmasked"), so one attachment serves relaxed masks during learning and binary
masks for checking surgery. ``detach()`` restores the original processors and removes every hook.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from .units import Unit


class MaskState:
    """The masks currently in force, by module name (no entry = that module is unmasked)."""

    def __init__(self):
        self.masks: dict[str, torch.Tensor] = {}

    def get(self, name: str) -> torch.Tensor | None:
        return self.masks.get(name)


def _scale_last_dim(x: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """Multiply consecutive blocks of ``width`` features on the last dim by one mask value each."""
    shape = x.shape
    x = x.reshape(*shape[:-1], mask.numel(), width) * mask.to(x.dtype)[:, None]
    return x.reshape(shape)


class MaskedAttnProcessor2_0(AttnProcessor2_0):
    """``AttnProcessor2_0`` whose per-head outputs are scaled by ``state.masks[name]`` before ``to_out``."""

    def __init__(self, state: MaskState, name: str):
        super().__init__()
        self.state = state
        self.name = name

    def __call__(self, attn, hidden_states, *args, **kwargs):
        mask = self.state.get(self.name)
        if mask is None:
            return super().__call__(attn, hidden_states, *args, **kwargs)
        width = attn.inner_dim // attn.heads

        def scale_heads(_module, inputs):
            return (_scale_last_dim(inputs[0], mask, width), *inputs[1:])

        handle = attn.to_out[0].register_forward_pre_hook(scale_heads)
        try:
            return super().__call__(attn, hidden_states, *args, **kwargs)
        finally:
            handle.remove()


def _ffn_hook(state: MaskState, name: str):
    def hook(_module, inputs):
        mask = state.get(name)
        if mask is None:
            return None
        return (inputs[0] * mask.to(inputs[0].dtype), *inputs[1:])

    return hook


def _channel_hook(state: MaskState, name: str, width: int):
    def hook(_module, inputs):
        mask = state.get(name)
        if mask is None:
            return None
        x = inputs[0]
        per_channel = mask.to(x.dtype).repeat_interleave(width)
        return (x * per_channel[None, :, None, None], *inputs[1:])

    return hook


class MaskAttachment:
    """Masks attached to a U-Net; use as a context manager or call :meth:`detach`."""

    def __init__(self, unet: torch.nn.Module, units: list[Unit], state: MaskState | None = None):
        self.unet = unet
        self.units = list(units)
        self.state = state if state is not None else MaskState()
        self._handles = []
        self._processors: dict[str, object] = {}
        for u in self.units:
            m = unet.get_submodule(u.name)
            if u.kind == "heads":
                self._processors[u.name] = m.processor
                m.set_processor(MaskedAttnProcessor2_0(self.state, u.name))
            elif u.kind == "ffn":
                self._handles.append(m.net[2].register_forward_pre_hook(_ffn_hook(self.state, u.name)))
            else:
                self._handles.append(m.conv2.register_forward_pre_hook(_channel_hook(self.state, u.name, u.width)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for name, proc in self._processors.items():
            self.unet.get_submodule(name).set_processor(proc)
        self._processors.clear()
        self.state.masks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()


def binary_masks(units: list[Unit], kept: dict[str, list[int]], device=None, dtype=torch.float32):
    """0/1 masks from kept indices (modules absent from ``kept`` keep everything)."""
    out = {}
    for u in units:
        m = torch.ones(u.size, device=device, dtype=dtype)
        if u.name in kept:
            m.zero_()
            idx = torch.as_tensor(list(kept[u.name]), dtype=torch.long, device=device)
            m[idx] = 1.0
        out[u.name] = m
    return out
