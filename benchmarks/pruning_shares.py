"""Parameter shares of the full-size SD 1.5 and SDXL U-Nets by prunable unit kind, and MACs (meta device, CPU).

    python benchmarks/pruning_shares.py        # a few seconds; writes results/pruning_shares.json

Shares: what pruning every unit of a kind could remove (attention heads: q/k/v rows and to_out columns;
FFN: GEGLU rows and the second linear's columns; resnet channels: conv1/time_emb_proj rows, norm2,
conv2 columns), plus whole ResnetBlock2D modules (EcoDiff's convention). MACs: one U-Net evaluation,
batch 1, 77 text tokens, at the architecture's native latent size. Also, for random unit scores
binarized at 10/20/30% fewer parameters (one global ranking, widths multiple of 8), the MAC reduction
and kept fraction per kind that follow (what the GPU speed benchmark slices).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from _common import environment, print_table, write_json  # noqa: E402

from diffkit.pruning import binarize, find_units, kept_fractions, parameter_shares, prune_unet, unet_macs  # noqa: E402
from diffkit.zoo import build_full_unet  # noqa: E402


def main() -> int:
    rows = []
    for arch in ("sd15", "sdxl"):
        unet = build_full_unet(arch, device="meta")
        shares = parameter_shares(unet)
        rows.append(dict(arch=arch, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in shares.items()},
                         gmacs=round(unet_macs(unet) / 1e9, 2)))
    print_table(rows)
    cuts = []
    for arch in ("sd15", "sdxl"):
        unet = build_full_unet(arch, device="meta")
        units = find_units(unet)
        g = torch.Generator().manual_seed(0)
        scores = {u.name: torch.rand(u.size, generator=g) for u in units}
        macs0, params0 = unet_macs(unet), sum(p.numel() for p in unet.parameters())
        for target in (0.1, 0.2, 0.3):
            kept = binarize(scores, units, target_reduction=target, unet=unet)
            slim = build_full_unet(arch, device="meta")
            prune_unet(slim, units, kept)
            frac = kept_fractions(kept, units)
            cuts.append(dict(arch=arch, target=target,
                             param_reduction=round(1 - sum(p.numel() for p in slim.parameters()) / params0, 4),
                             mac_reduction=round(1 - unet_macs(slim) / macs0, 4),
                             **{f"kept_{k}": round(v, 3) for k, v in frac.items()}))
    print_table(cuts)
    path = write_json("pruning_shares.json", dict(benchmark="pruning_shares", environment=environment(), rows=rows,
                                                  random_mask_cuts=cuts))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
