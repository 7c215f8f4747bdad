"""AdvUnlearn and DoCo cost on the full-size SD 1.5 architecture (random weights): seconds per step, peak memory.

The issue's setting (as ``benchmarks/erasure_gpu.py`` for ESD/SalUn): bf16 (accelerate mixed precision:
bf16 compute, float32 master weights and Adam state), 512 px, batch 1, gradient checkpointing on,
50 DDIM steps of the frozen model to reach x_t (reference setting). Jobs:

* ``advunlearn``      the paper's default: 30-step Adam prefix attack every step (no warm-up, so every
                      measured step pays for the attack), text encoder trained, gamma 0.3 on 5 retain prompts;
* ``advunlearn-fast`` the fast variant (one gradient-sign attack step);
* ``doco``            PatchGAN discriminator step + generator step on cross-attention K/V, with the
                      concept-preserving gradient surgery (two backward passes) and the prior-preservation
                      images generated up front (included in ``prepare_s``); no discriminator warm-up.

Figures come from the engine's metrics (``erasure.json``) measured in this run; peak memory is
``torch.cuda.max_memory_allocated`` over the whole job (reset between jobs). Target: each fits 24 GB.

    python benchmarks/erasure_gpu_part2.py            # CUDA -> benchmarks/results/erasure_gpu_part2.json
    python benchmarks/erasure_gpu_part2.py --smoke    # tiny pipeline on CPU, logic check only
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import erasure_gpu  # noqa: E402  (part 1: the runner, the table and the JSON)

from diffkit.erasure import ErasureConfig  # noqa: E402

RETAIN = ["a blue circle", "a green square", "a photo of a dog", "a house", "a tree"]


def jobs(smoke: bool, steps: int) -> dict[str, ErasureConfig]:
    common = dict(concept="a red star", steps=steps, seed=0, batch_size=1, checkpoint_every=10_000,
                  mixed_precision="no" if smoke else "bf16", gradient_checkpointing=not smoke,
                  resolution=None if smoke else 512, sample_steps=2 if smoke else 50, retain_prompts=RETAIN)
    adv = dict(warmup_steps=0, retain_batch=2 if smoke else 5)
    return {
        "advunlearn": ErasureConfig(method="advunlearn", options={**adv, "attack": "adam",
                                                                  "attack_steps": 2 if smoke else 30}, **common),
        "advunlearn-fast": ErasureConfig(method="advunlearn", options={**adv, "attack": "sign"}, **common),
        "doco": ErasureConfig(method="doco", anchor="a blue circle", num_images=1 if smoke else 2,
                              options={"discriminator_warmup": 0}, **common),
    }


def main(argv=None) -> int:
    return erasure_gpu.main(argv, job_factory=jobs, name="erasure_gpu_part2", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
