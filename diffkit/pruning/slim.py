"""Make, save and apply pruning specs: kept indices -> physically slimmed U-Net (+ stats)."""

from __future__ import annotations

import copy

import torch

from .spec import BaseModelMismatch, PruningSpec, check_fingerprint, fingerprint, read_spec, save_spec
from .stats import unet_macs, unet_parameters
from .surgery import prune_unet
from .units import KINDS, find_units


def make_spec(unet, kept: dict[str, list[int]], *, config: dict | None = None, sample_shape=None,
              macs: bool = True) -> tuple[PruningSpec, torch.nn.Module]:
    """Spec + the slim U-Net (a pruned deep copy of ``unet``; ``unet`` itself is untouched)."""
    units = find_units(unet, KINDS)
    by_name = {u.name: u for u in units}
    unknown = sorted(set(kept) - set(by_name))
    if unknown:
        raise ValueError(f"kept names modules that are not prunable units: {unknown[:3]}")
    slim = copy.deepcopy(unet)
    changed = prune_unet(slim, units, kept)
    stats = {"params_before": unet_parameters(unet), "params_after": unet_parameters(slim)}
    stats["param_reduction"] = 1 - stats["params_after"] / stats["params_before"]
    if macs:
        stats["macs_before"] = unet_macs(unet, sample_shape)
        stats["macs_after"] = unet_macs(slim, sample_shape)
        stats["mac_reduction"] = 1 - stats["macs_after"] / stats["macs_before"]
    stats["kept_fraction"] = {
        kind: sum(len(kept.get(u.name, range(u.size))) for u in units if u.kind == kind)
        / max(1, sum(u.size for u in units if u.kind == kind))
        for kind in KINDS
        if any(u.kind == kind for u in units)
    }
    spec = PruningSpec(
        kept={name: sorted(int(i) for i in idx) for name, idx in kept.items() if name in changed},
        units={name: {"kind": by_name[name].kind, "size": by_name[name].size, "width": by_name[name].width}
               for name in changed},
        base=fingerprint(unet),
        stats=stats,
        config=dict(config or {}),
    )
    return spec, slim


def save_pruning(directory, unet, kept: dict[str, list[int]], **kwargs) -> PruningSpec:
    """Prune a copy of ``unet`` to ``kept`` and write the spec directory; return the spec."""
    spec, slim = make_spec(unet, kept, **kwargs)
    save_spec(directory, spec, {name: slim.get_submodule(name) for name in spec.kept})
    return spec


def apply_spec(unet, spec: PruningSpec, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.nn.Module]:
    """Slim ``unet`` in place to ``spec`` (after checking the base), then load the saved slim weights.

    Returns ``{name: original module}`` of every replaced module (the caller may keep or drop them).
    """
    check_fingerprint(spec.base, unet)
    units = {u.name: u for u in find_units(unet, KINDS)}
    for name, info in spec.units.items():
        u = units.get(name)
        if u is None or (u.kind, u.size, u.width) != (info["kind"], info["size"], info["width"]):
            raise BaseModelMismatch(f"this U-Net has no {info['kind']} unit module {name} of size {info['size']}")
    originals = {name: unet.get_submodule(name) for name in spec.kept}
    # Slice copies so the originals stay intact (surgery edits modules in place).
    work = {name: copy.deepcopy(m) for name, m in originals.items()}
    for name, m in work.items():
        _set(unet, name, m)
    changed = prune_unet(unet, list(units.values()), spec.kept)
    if tensors:
        for name, m in changed.items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
            ref = m.state_dict()
            if set(own) != set(ref) or any(own[k].shape != ref[k].shape for k in ref):
                raise ValueError(f"pruned weights for {name} do not match the spec's shapes")
            m.load_state_dict({k: v.to(ref[k].device, ref[k].dtype) for k, v in own.items()})
    return originals


def _set(root, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def load_pruning_into(unet, directory) -> tuple[PruningSpec, dict[str, torch.nn.Module]]:
    spec, tensors = read_spec(directory)
    return spec, apply_spec(unet, spec, tensors)


def restore_modules(unet, originals: dict[str, torch.nn.Module]) -> None:
    for name, m in originals.items():
        _set(unet, name, m)
