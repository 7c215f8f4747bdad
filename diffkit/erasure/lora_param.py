"""LoRA parametrisation of an erasure (``parametrization: lora``): train ``B A`` instead of ``W``.

LoRA (Hu et al. 2022, eq. 3) writes a layer's weight as ``W = W0 + (alpha / r) B A`` with ``A`` (r x in)
and ``B`` (out x r); ``B`` starts at zero, so the job starts from the base model exactly, and only ``A`` and
``B`` are trained. The layers are peft's (``peft.inject_adapter_in_model``), injected for the job into the
modules whose weights the method would have trained (every Linear / Conv2d among the selected tensors; a
LoRA trains no bias), and removed again afterwards, so the pipeline's modules are its own again.

The engine's frozen model needs nothing new: swapping the LoRA tensors back to their initial values puts
``B = 0`` back, which is the base model bit for bit (``base(x) + 0``).

The artifact holds the adapters as diffusers' standard LoRA file (:data:`LORA_FILE`, written with
``save_lora_weights`` and peft's LoRA config in its metadata), which ``pipe.load_lora_weights(folder)``
loads in plain diffusers and ``pipe.set_adapters([name], adapter_weights=[w])`` dials. diffkit's
``load_erasure`` merges it instead (:func:`lora_delta`), so it composes with pruning and other erasures
like a full-rank artifact, with the same base-model check.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

#: diffusers' LoRA weight file name (``load_lora_weights(folder)`` looks for it).
LORA_FILE = "pytorch_lora_weights.safetensors"
#: The adapter's name while the job trains it (diffusers names it itself when loading the file).
ADAPTER = "diffkit_erasure"
_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


@dataclass(frozen=True)
class LoraParametrization:
    """Rank ``r`` and ``alpha`` of the adapters; the update is scaled by ``alpha / r`` (LoRA eq. 3)."""

    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return float(self.alpha) / int(self.rank)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * B A`` as a weight of the adapted layer (float32).

    Linear: ``B (out x r) @ A (r x in)``. Conv2d: ``A`` is an r-channel convolution with the layer's
    kernel and ``B`` a 1x1 one, whose composition is the kernel ``B @ A`` over the flattened ``A``.
    """
    a32, b32 = a.detach().float(), b.detach().float()
    if a32.dim() == 2:
        return scaling * (b32 @ a32)
    out, r = b32.shape[:2]
    return scaling * (b32.reshape(out, r) @ a32.reshape(r, -1)).reshape(out, *a32.shape[1:])


def lora_keys(qualified_weight: str) -> tuple[str, str]:
    """The diffusers LoRA file's keys of the adapter of ``<comp>.<module>.weight``: (A key, B key)."""
    module = qualified_weight.rsplit(".", 1)[0]
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def target_modules(components: dict[str, torch.nn.Module], selected, strict: bool = True) -> list[str]:
    """Qualified names (``unet.<module>``) of the Linear / Conv2d modules owning the selected tensors.

    A LoRA adapts only such layers. ``strict`` (tensors the user listed): any other selected tensor is an
    error; otherwise (a named preset, e.g. ``text-encoder``, which also holds the layer norms) the other
    tensors are left as they are. Either way a selection without such a layer is an error.
    """
    modules, bad = [], []
    for q in selected:
        comp, _, name = q.partition(".")
        module_name = name.rsplit(".", 1)[0] if "." in name else ""
        module = components[comp].get_submodule(module_name) if module_name else components[comp]
        if not isinstance(module, _LAYERS):
            bad.append((q, type(module).__name__))
            continue
        qualified = f"{comp}.{module_name}"
        if qualified not in modules:
            modules.append(qualified)
    if bad and strict:
        q, kind = bad[0]
        raise ValueError(f"parametrization 'lora' adapts Linear and Conv2d layers; {len(bad)} selected tensor(s) "
                         f"belong to other modules (e.g. {q}, a {kind}): choose parameters of linear and "
                         f"convolution layers (e.g. the esd-x preset)")
    if not modules:
        shown = f" (e.g. {bad[0][0]}, a {bad[0][1]})" if bad else ""
        raise ValueError(f"parametrization 'lora' adapts Linear and Conv2d layers; the selected parameters name "
                         f"none{shown}")
    return sorted(modules)


class InjectedLora:
    """peft LoRA layers injected into a pipeline's components for one job; :meth:`remove` takes them out."""

    def __init__(self, components: dict[str, torch.nn.Module], modules: list[str], spec: LoraParametrization,
                 seed: int):
        from peft import LoraConfig, inject_adapter_in_model

        self.components, self.modules, self.spec = components, list(modules), spec
        self._had_config = {c: hasattr(m, "peft_config") for c, m in components.items()}
        self.injected: list[tuple[str, str]] = []  # (component, module name) in injection order
        by_comp: dict[str, list[str]] = {}
        for q in self.modules:
            comp, _, name = q.partition(".")
            by_comp.setdefault(comp, []).append(name)
        try:
            # A's initialisation draws from torch's global generator: fork it, seeded by the job (resume-safe).
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for comp, names in sorted(by_comp.items()):
                    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=names, lora_dropout=0.0,
                                        init_lora_weights=True, bias="none")
                    inject_adapter_in_model(config, components[comp], adapter_name=ADAPTER)
                    self.injected += [(comp, n) for n in names]
        except BaseException:
            self.remove()
            raise
        self._check_injected()

    def _layer(self, comp: str, name: str):
        return self.components[comp].get_submodule(name)

    def _check_injected(self) -> None:
        from peft.tuners.lora import LoraLayer

        missing = [f"{c}.{n}" for c, n in self.injected if not isinstance(self._layer(c, n), LoraLayer)]
        if missing:
            self.remove()
            raise ValueError(f"parametrization 'lora': peft adapted none of {missing[:3]}")

    def parameters(self) -> dict[str, torch.nn.Parameter]:
        """Qualified names (``unet.<module>.lora_A.weight``) -> the trained A and B matrices."""
        out = {}
        for comp, name in self.injected:
            layer = self._layer(comp, name)
            out[f"{comp}.{name}.lora_A.weight"] = layer.lora_A[ADAPTER].weight
            out[f"{comp}.{name}.lora_B.weight"] = layer.lora_B[ADAPTER].weight
        return out

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """Per component, peft's LoRA keys without the adapter name (``<module>.lora_A.weight``), on the CPU."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for q, p in self.parameters().items():
            comp, _, key = q.partition(".")
            out.setdefault(comp, {})[key] = p.detach().to("cpu", torch.float32, copy=True).contiguous()
        return out

    def remove(self) -> None:
        """Put every adapted module's own layer back (idempotent); the components are as before injection."""
        from peft.tuners.lora import LoraLayer

        for comp, name in reversed(self.injected):
            parent_name, _, child = name.rpartition(".")
            parent = self.components[comp].get_submodule(parent_name) if parent_name else self.components[comp]
            layer = getattr(parent, child)
            if isinstance(layer, LoraLayer):
                setattr(parent, child, layer.get_base_layer())
        self.injected = []
        for comp, module in self.components.items():
            if not self._had_config[comp] and hasattr(module, "peft_config"):
                del module.peft_config


def adapter_metadata(spec: LoraParametrization, modules: list[str], component: str) -> dict:
    """peft's LoRA config of one component's adapter, as diffusers stores it in the file's metadata."""
    names = sorted(q.partition(".")[2] for q in modules if q.partition(".")[0] == component)
    return {"r": int(spec.rank), "lora_alpha": float(spec.alpha), "target_modules": names, "lora_dropout": 0.0,
            "bias": "none", "init_lora_weights": True, "use_dora": False}


def save_lora_file(out: Path, state: dict[str, dict[str, torch.Tensor]], spec: LoraParametrization,
                   modules: list[str]) -> Path:
    """Write :data:`LORA_FILE` with diffusers' own ``save_lora_weights`` (keys ``unet.<module>.lora_A.weight``
    and the adapter config in the metadata), atomically: into a temporary folder, then renamed."""
    from diffusers import StableDiffusionPipeline

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".lora-") as tmp:
        StableDiffusionPipeline.save_lora_weights(
            tmp, unet_lora_layers=state.get("unet"), text_encoder_lora_layers=state.get("text_encoder"),
            safe_serialization=True, weight_name=LORA_FILE,
            unet_lora_adapter_metadata=adapter_metadata(spec, modules, "unet") if "unet" in state else None,
            text_encoder_lora_adapter_metadata=(adapter_metadata(spec, modules, "text_encoder")
                                                if "text_encoder" in state else None))
        os.replace(Path(tmp) / LORA_FILE, out / LORA_FILE)
    return out / LORA_FILE
