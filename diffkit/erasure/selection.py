"""Which parameters an erasure trains: named presets (from the papers' reference code) or regexes.

Names are qualified by component: ``unet.<name>`` and ``text_encoder.<name>``, the keys artifacts use.

ESD's reference code (rohitgandikota/erasing, ``get_esd_trainable_parameters``) selects every
``Linear``/``Conv2d`` module by module name:
  * ``esd-x``        all linear layers of the cross-attention (``attn2``: to_q, to_k, to_v, to_out);
  * ``esd-x-strict`` only ``attn2.to_k`` and ``attn2.to_v`` (the layers that read the text);
  * ``esd-u``        every Linear/Conv2d outside ``attn2`` (norm layers are not trained);
  * ``esd-all``      every Linear/Conv2d.
SalUn's candidates are all U-Net weights (``unet-all``); its saliency mask then narrows them.
``text-encoder`` is every text-encoder weight except the embeddings (AdvUnlearn's recommended choice).
"""

from __future__ import annotations

import re

import torch

COMPONENTS = ("unet", "text_encoder")
_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def _module_params(module: torch.nn.Module, keep) -> list[str]:
    names = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, _LAYERS) and keep(mod_name):
            names += [f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
    return names


PRESETS = {
    "esd-x": lambda c: _module_params(c["unet"], lambda n: "attn2" in n),
    "esd-x-strict": lambda c: _module_params(c["unet"], lambda n: "attn2.to_k" in n or "attn2.to_v" in n),
    "esd-u": lambda c: _module_params(c["unet"], lambda n: "attn2" not in n),
    "esd-all": lambda c: _module_params(c["unet"], lambda n: True),
    "unet-all": lambda c: [n for n, _ in c["unet"].named_parameters()],
    "text-encoder": lambda c: [n for n, _ in c["text_encoder"].named_parameters() if "embeddings" not in n],
}
_PRESET_COMPONENT = {k: ("text_encoder" if k == "text-encoder" else "unet") for k in PRESETS}


def components_of(pipe) -> dict[str, torch.nn.Module]:
    """The trainable components an erasure may touch, by artifact prefix."""
    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


def select_parameters(components: dict[str, torch.nn.Module], spec) -> dict[str, torch.nn.Parameter]:
    """Qualified name -> parameter for ``spec`` (a preset name or a sequence of regexes, full match)."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"parameters must be one of {sorted(PRESETS)} or a list of regexes, got {spec!r}")
        comp = _PRESET_COMPONENT[spec]
        if comp not in components:
            raise ValueError(f"parameters preset {spec!r} needs a {comp}, which this pipeline lacks")
        params = dict(components[comp].named_parameters())
        names = [f"{comp}.{n}" for n in PRESETS[spec](components)]
        selected = {q: params[q.split(".", 1)[1]] for q in names}
    else:
        regexes = [re.compile(p) for p in spec]
        selected = {}
        for comp, module in components.items():
            for n, p in module.named_parameters():
                q = f"{comp}.{n}"
                if any(r.fullmatch(q) for r in regexes):
                    selected[q] = p
    if not selected:
        shown = spec if isinstance(spec, str) else list(spec)
        raise ValueError(f"parameters {shown!r} select no tensor of this pipeline")
    return selected


def split_name(qualified: str) -> tuple[str, str]:
    comp, _, name = qualified.partition(".")
    if comp not in COMPONENTS or not name:
        raise ValueError(f"tensor name {qualified!r} must start with one of {COMPONENTS}")
    return comp, name


def get_parameter(components: dict[str, torch.nn.Module], qualified: str) -> torch.nn.Parameter:
    comp, name = split_name(qualified)
    if comp not in components:
        raise ValueError(f"tensor {qualified!r} belongs to a {comp}, which this pipeline lacks")
    try:
        return components[comp].get_parameter(name)
    except AttributeError:
        raise ValueError(f"this pipeline's {comp} has no tensor {name!r}") from None
