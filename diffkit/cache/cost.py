"""MACs of a DeepCache cached step relative to a full U-Net step (the speed ceiling of the method).

Counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers and the
attention matmuls; MACs = FLOPs / 2), on any device including ``meta``, where nothing is allocated, so
the full-size SD 1.5 / SDXL architectures are counted on a laptop. With ``r`` the cached/full ratio,
uniform 1:N can at most be ``N / (1 + (N - 1) r)`` times faster (U-Net time only).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.flop_counter import FlopCounterMode

from .branch import branch_plan, check_unet
from .controlnet import shallow_controlnet_forward
from .hook import CAPTURE_HOOK_NAME, _CaptureHook, _registry, _source_module
from .shallow import shallow_forward


def example_inputs(unet, batch: int = 2, height: int | None = None, width: int | None = None,
                   seq_len: int = 77) -> dict:
    """U-Net forward kwargs of the right shapes (zeros) on the U-Net's device and dtype."""
    unet = check_unet(unet)
    cfg = unet.config
    p = next(unet.parameters())
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    h, w = height or size, width or size
    kw = dict(device=p.device, dtype=p.dtype)
    inputs = dict(
        sample=torch.zeros(batch, cfg.in_channels, h, w, **kw),
        timestep=torch.tensor(500, device=p.device),
        encoder_hidden_states=torch.zeros(batch, seq_len, cfg.cross_attention_dim, **kw),
    )
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.zeros(batch, text_dim, **kw),
                                           time_ids=torch.zeros(batch, 6, **kw))
    return inputs


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def unet_macs(unet, branches=(0,), controlnet=None, **input_kw) -> dict:
    """``{"full": MACs, "cached": {branch: MACs}}`` of one U-Net evaluation (``example_inputs`` shapes).

    With a ``controlnet`` (a ``ControlNetModel`` paired with the U-Net) each figure includes its
    evaluation: in full on a full step, its shallow branch on a cached one.
    """
    unet = check_unet(unet)
    inputs = example_inputs(unet, **input_kw)
    full = _flops(lambda: unet(**inputs)) // 2
    cached = {}
    if controlnet is not None:
        x = inputs["sample"]
        cn_kw = dict(sample=x, timestep=inputs["timestep"], encoder_hidden_states=inputs["encoder_hidden_states"],
                     added_cond_kwargs=inputs.get("added_cond_kwargs"),
                     controlnet_cond=torch.zeros(x.shape[0], controlnet.config.conditioning_channels,
                                                 8 * x.shape[2], 8 * x.shape[3], device=x.device, dtype=x.dtype))
        full += _flops(lambda: controlnet(**cn_kw)) // 2
        last = controlnet(**cn_kw, return_dict=False)
    for b in branches:
        if controlnet is not None:
            cached[b] = _flops(lambda b=b: shallow_controlnet_forward(controlnet, branch_plan(unet, b), last,
                                                                      **cn_kw)) // 2
        else:
            cached[b] = 0
        plan = branch_plan(unet, b)
        keep = SimpleNamespace(feature=None)  # the capture hook writes .feature here
        registry = _registry(_source_module(unet, plan))
        registry.register_hook(_CaptureHook(keep, plan.source), CAPTURE_HOOK_NAME + ".cost")
        try:
            unet(**inputs)
        finally:
            registry.remove_hook(CAPTURE_HOOK_NAME + ".cost", recurse=False)
        feature = keep.feature
        cached[b] += _flops(lambda plan=plan, feature=feature: shallow_forward(unet, plan, feature, **inputs)) // 2
    return {"full": full, "cached": cached}


def cached_step_mac_ratio(unet, branch: int = 0, **input_kw) -> float:
    """MACs of a cached step at ``branch`` divided by the MACs of a full step."""
    macs = unet_macs(unet, (branch,), **input_kw)
    return macs["cached"][branch] / macs["full"]


def speed_ceiling(interval: int, ratio: float, num_steps: int | None = None) -> float:
    """Uniform 1:N speed-up bound from MACs: ``N / (1 + (N - 1) r)``; for a run of ``num_steps`` steps
    exactly ``T / (F + (T - F) r)`` with ``F = ceil(T / N)`` full steps."""
    if num_steps is None:
        return interval / (1 + (interval - 1) * ratio)
    full = -(-num_steps // interval)
    return num_steps / (full + (num_steps - full) * ratio)
