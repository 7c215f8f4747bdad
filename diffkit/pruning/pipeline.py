"""Pipeline methods: ``load_pruning`` / ``unload_pruning`` (mixed into every diffkit pipeline)."""

from __future__ import annotations


class PruningMixin:
    """``pipe.load_pruning(dir)`` physically slims the U-Net to a pruning spec; ``unload_pruning()`` undoes it."""

    def load_pruning(self, directory, keep_original: bool = True):
        """Slim ``self.unet`` to the spec in ``directory`` (see :mod:`diffkit.pruning.spec`); return the spec.

        The spec must have been made for this base U-Net (architecture and weights), else
        ``BaseModelMismatch``. With ``keep_original`` the replaced full modules are kept on the CPU so
        that :meth:`unload_pruning` can restore them; otherwise they are freed.
        """
        from .slim import load_pruning_into

        if getattr(self, "_diffkit_pruning", None) is not None:
            raise RuntimeError("a pruning spec is already loaded; call pipe.unload_pruning() first")
        spec, originals = load_pruning_into(self.unet, directory)
        if keep_original:
            originals = {name: m.to("cpu") for name, m in originals.items()}
        else:
            originals = None
        self._diffkit_pruning = {"spec": spec, "originals": originals, "directory": str(directory)}
        return spec

    def unload_pruning(self) -> None:
        """Put the original (unpruned) modules back."""
        from .slim import restore_modules

        state = getattr(self, "_diffkit_pruning", None)
        if state is None:
            raise RuntimeError("no pruning spec is loaded")
        if state["originals"] is None:
            raise RuntimeError("the pruning spec was loaded with keep_original=False; reload the pipeline instead")
        p = next(self.unet.parameters())
        restore_modules(self.unet, {n: m.to(p.device, p.dtype) for n, m in state["originals"].items()})
        self._diffkit_pruning = None

    @property
    def pruning_spec(self):
        """The loaded :class:`~diffkit.pruning.spec.PruningSpec`, or None."""
        state = getattr(self, "_diffkit_pruning", None)
        return None if state is None else state["spec"]
