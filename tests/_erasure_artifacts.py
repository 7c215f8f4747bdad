"""Erasure artifacts made by hand for the composition tests (no training), and the same patch applied by hand."""

from __future__ import annotations

import torch

from diffkit.artifacts import fingerprint
from diffkit.erasure.artifact import write_artifact


def make_artifact(pipe, out, names, seed=0, scale=0.05):
    """Write an ESD-style artifact at ``out`` holding the named tensors plus ``scale`` x N(0, 1) noise; return
    the trained values by qualified name (``unet.…`` / ``text_encoder.…``)."""
    comps = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    g = torch.Generator().manual_seed(seed)
    originals = {q: comps[q.split(".", 1)[0]].get_parameter(q.split(".", 1)[1]).detach().clone() for q in names}
    trained = {q: v + scale * torch.randn(v.shape, generator=g) for q, v in originals.items()}
    write_artifact(out, trained, {"method": "esd", "concept": ["red"], "anchor": "",
                                  "base_model": fingerprint(comps, originals)})
    return trained


def patch_by_hand(pipe, trained):
    """Copy the trained values into ``pipe``'s tensors directly (the independent computation of a load);
    return ``pipe``."""
    with torch.no_grad():
        for q, v in trained.items():
            comp, _, name = q.partition(".")
            getattr(pipe, comp).get_parameter(name).copy_(v)
    return pipe
