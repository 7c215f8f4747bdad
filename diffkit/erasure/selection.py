"""Which parameters an erasure trains: named presets (from the papers' reference code) or regexes.

Names are qualified by component: ``unet.<name>``, ``text_encoder.<name>`` and (SDXL) ``text_encoder_2.<name>``,
the keys artifacts use.

ESD's reference code (rohitgandikota/erasing, ``get_esd_trainable_parameters``) selects every
``Linear``/``Conv2d`` module by module name:
  * ``esd-x``        all linear layers of the cross-attention (``attn2``: to_q, to_k, to_v, to_out);
  * ``esd-x-strict`` only ``attn2.to_k`` and ``attn2.to_v`` (the layers that read the text);
  * ``esd-u``        every Linear/Conv2d outside ``attn2`` (norm layers are not trained);
  * ``esd-all``      every Linear/Conv2d.
SalUn's candidates are all U-Net weights (``unet-all``); its saliency mask then narrows them.
``text-encoder`` is every text-encoder weight except the embeddings (AdvUnlearn's recommended choice); on
SDXL it covers both text encoders, less what SDXL never reads: ``text_encoder``'s last layer and final
layer norm (its conditioning is the penultimate hidden state), which could receive no gradient.
"""

from __future__ import annotations

import re

import torch

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: The text encoders, in the order the prompt encoder runs them (``text_encoder_2``: SDXL only).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def _module_params(module: torch.nn.Module, keep) -> list[str]:
    names = []
    for mod_name, mod in module.named_modules():
        if isinstance(mod, _LAYERS) and keep(mod_name):
            names += [f"{mod_name}.{p}" for p, _ in mod.named_parameters(recurse=False)]
    return names


def _sdxl_unread(component: str, module: torch.nn.Module, components) -> tuple[str, ...]:
    """Name prefixes of ``component``'s tensors that SDXL's conditioning never reads: ``text_encoder``'s last
    layer and final layer norm (``encode_prompt`` takes its penultimate hidden state), when SDXL."""
    if component != "text_encoder" or "text_encoder_2" not in components:
        return ()
    last = int(module.config.num_hidden_layers) - 1
    return (f"encoder.layers.{last}.", "final_layer_norm.")


def _text_encoder_params(component: str, module: torch.nn.Module, components) -> list[str]:
    unread = _sdxl_unread(component, module, components)
    return [n for n, _ in module.named_parameters()
            if "embeddings" not in n and not any(u in n for u in unread)]


# preset -> (the components it selects from, the first required; names within one component)
PRESETS = {
    "esd-x": (("unet",), lambda c, m, cs: _module_params(m, lambda n: "attn2" in n)),
    "esd-x-strict": (("unet",), lambda c, m, cs: _module_params(m, lambda n: "attn2.to_k" in n or "attn2.to_v" in n)),
    "esd-u": (("unet",), lambda c, m, cs: _module_params(m, lambda n: "attn2" not in n)),
    "esd-all": (("unet",), lambda c, m, cs: _module_params(m, lambda n: True)),
    "unet-all": (("unet",), lambda c, m, cs: [n for n, _ in m.named_parameters()]),
    "text-encoder": (TEXT_ENCODERS, _text_encoder_params),
}


def components_of(pipe) -> dict[str, torch.nn.Module]:
    """The trainable components an erasure may touch, by artifact prefix."""
    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


def select_parameters(components: dict[str, torch.nn.Module], spec) -> dict[str, torch.nn.Parameter]:
    """Qualified name -> parameter for ``spec`` (a preset name or a sequence of regexes, full match)."""
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"parameters must be one of {sorted(PRESETS)} or a list of regexes, got {spec!r}")
        comps, names_of = PRESETS[spec]
        if comps[0] not in components:
            raise ValueError(f"parameters preset {spec!r} needs a {comps[0]}, which this pipeline lacks")
        selected = {}
        for comp in (c for c in comps if c in components):
            params = dict(components[comp].named_parameters())
            selected.update({f"{comp}.{n}": params[n] for n in names_of(comp, components[comp], components)})
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
        raise ValueError(f"tensor name {qualified!r} must start with one of {COMPONENTS[:2]} (or "
                         f"{COMPONENTS[2]!r} on SDXL)")
    return comp, name


def get_parameter(components: dict[str, torch.nn.Module], qualified: str) -> torch.nn.Parameter:
    comp, name = split_name(qualified)
    if comp not in components:
        raise ValueError(f"tensor {qualified!r} belongs to a {comp}, which this pipeline lacks")
    try:
        return components[comp].get_parameter(name)
    except AttributeError:
        raise ValueError(f"this pipeline's {comp} has no tensor {name!r}") from None
