"""Make, save and apply pruning specs: kept indices -> physically slimmed U-Net (+ stats)."""

from __future__ import annotations

import copy

import torch

from ..lifecycle import FeatureConflict
from .spec import BaseModelMismatch, PruningSpec, check_base, module_fingerprint, read_spec, save_spec
from .stats import unet_macs, unet_parameters
from .surgery import ParameterMap, parameter_map, prune_unet, select
from .units import KINDS, find_units


def make_spec(unet, kept: dict[str, list[int]], *, config: dict | None = None, sample_shape=None,
              macs: bool = True, value_of=None) -> tuple[PruningSpec, torch.nn.Module]:
    """Spec + the slim U-Net (a pruned deep copy of ``unet``; ``unet`` itself is untouched).

    ``value_of(q)``: the base value of ``unet.<name>`` when ``unet`` carries features that changed
    weights (an erasure): the spec's fingerprint is the base model's.
    """
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
        base=module_fingerprint(unet, changed, value_of),
        stats=stats,
        config=dict(config or {}),
    )
    return spec, slim


def save_pruning(directory, unet, kept: dict[str, list[int]], **kwargs) -> PruningSpec:
    """Prune a copy of ``unet`` to ``kept`` and write the spec directory; return the spec."""
    spec, slim = make_spec(unet, kept, **kwargs)
    save_spec(directory, spec, {name: slim.get_submodule(name) for name in spec.kept})
    return spec


def apply_spec(unet, spec: PruningSpec, tensors: dict[str, torch.Tensor] | None = None, *,
               value_of=None) -> tuple[dict[str, torch.nn.Module], dict[str, ParameterMap]]:
    """Slim ``unet`` in place to ``spec`` after checking its base; all-or-nothing.

    The kept units are sliced from the **live** modules, so weights a feature changed before (an
    erasure) survive slimming; on an unchanged U-Net that is exactly the spec's stored slim weights
    (``tensors``, checked for shape). ``value_of``: base values for the fingerprint check (see
    :func:`make_spec`). Returns ``({name: original module}, {name: parameter map})`` of every
    replaced module (the caller may keep or drop the originals). On any error the U-Net is as before.
    """
    check_base(spec.base, unet, value_of)
    units = {u.name: u for u in find_units(unet, KINDS)}
    for name, info in spec.units.items():
        u = units.get(name)
        if u is None or (u.kind, u.size, u.width) != (info["kind"], info["size"], info["width"]):
            raise BaseModelMismatch(f"this U-Net has no {info['kind']} unit module {name} of size {info['size']}")
    originals = {name: unet.get_submodule(name) for name in spec.kept}
    maps = {name: parameter_map(m, units[name], spec.kept[name]) for name, m in originals.items()}
    value_of = value_of or (lambda q: unet.get_parameter(q.split(".", 1)[1]))
    # Base values of the full modules, read before any of them is replaced.
    bases = {name: {p: value_of(f"unet.{name}.{p}") for p in maps[name]} for name in originals}
    try:
        # Slice copies so the originals stay intact (surgery edits modules in place).
        for name, m in originals.items():
            _set(unet, name, copy.deepcopy(m))
        changed = prune_unet(unet, list(units.values()), spec.kept)
        for name, m in changed.items():
            _load_stored(name, m, originals[name], maps[name], tensors, bases[name])
    except BaseException:
        restore_modules(unet, originals)
        raise
    return originals, maps


def _load_stored(name, slim, full, pmap, tensors, bases) -> None:
    """Apply the spec's stored slim weights where they are not just the base model's slice.

    A stored tensor equal to the slice of the base value adds nothing: the live slice is kept, so an
    erasure loaded before survives. A stored tensor that differs (a slim model fine-tuned after
    pruning) wins; if an attached feature also changed that tensor, the two cannot both hold: error.
    """
    if not tensors:
        return
    own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
    ref = slim.state_dict()
    if set(own) != set(ref) or any(own[k].shape != ref[k].shape for k in ref):
        raise ValueError(f"pruned weights for {name} do not match the spec's shapes")
    with torch.no_grad():
        for full_name, (new, selections) in pmap.items():
            if new is None or new not in own:
                continue
            base = bases[full_name]
            stored = own[new].to(base.dtype)
            if torch.equal(stored, select(base.detach().to("cpu"), selections)):
                continue
            live = full.get_parameter(full_name)
            if not torch.equal(live.detach().to("cpu"), base.detach().to("cpu")):
                raise FeatureConflict(f"the pruning spec stores its own (fine-tuned) values for {name}.{full_name}, "
                                      f"which an attached feature (an erasure) also changed; unload that first")
            param = slim.get_parameter(new)
            param.copy_(stored.to(param.device, param.dtype))


def _set(root, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def load_pruning_into(unet, directory, value_of=None):
    """``(spec, originals, parameter maps)`` after slimming ``unet`` to the spec in ``directory``."""
    spec, tensors = read_spec(directory)
    return (spec, *apply_spec(unet, spec, tensors, value_of=value_of))


def restore_modules(unet, originals: dict[str, torch.nn.Module]) -> None:
    for name, m in originals.items():
        _set(unet, name, m)
