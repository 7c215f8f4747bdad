"""Peak bytes of tensors alive at once while a function runs, on any device (CPU included).

CPU memory has no ``max_memory_allocated``; resident-set figures are blurred by the allocator keeping
freed pages. Here a ``TorchDispatchMode`` sees every tensor an op creates, counts its storage once,
and uncounts it when the storage is freed (storages keep one Python object while alive, so a weakref
finalizer fires exactly then). Tensors that existed before the call (weights) are not counted: the
figure is the working memory of the call, e.g. activations kept for backward.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[tuple[str, int]] = set()

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in tree_flatten(out)[0]:
            if isinstance(x, torch.Tensor) and x.device.type != "meta":
                st = x.untyped_storage()
                key = (str(x.device), st.data_ptr())
                if key[1] and key not in self._seen:
                    self._seen.add(key)
                    self.live += st.nbytes()
                    weakref.finalize(st, self._free, key, st.nbytes())
                    self.peak = max(self.peak, self.live)
        return out


def peak_live_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes of tensors created by ``fn`` alive at once, ``fn``'s result)."""
    mode = LiveTensorBytes()
    with mode:
        result = fn(*args, **kwargs)
    return mode.peak, result
