"""LoRA-parametrised erasure (ranks 4 and 16) against full fine-tuning, for ESD and AdvUnlearn.

Same protocol and job settings as ``benchmarks/erasure_methods.py`` (whose helpers this imports): for each
concept, each method is trained three ways on the same data, seeds and steps -- ``full`` (the selected
tensors themselves: ESD-x's cross-attention, AdvUnlearn's text encoder), ``r4`` and ``r16``
(``parametrization: lora`` on the same layers, alpha = rank) -- and measured by the oracle on the same
prompts and seeds: UA (forget words), UA (evaluation-only synonym), IRA, CRA, each with its 95% interval
(Wilson; CRA: bootstrap over images), the attack success rate of the first ``--attack``, the artifact's
size and the training time. Each LoRA setting is compared with full fine-tuning of the same method by the
paired bootstrap interval of the difference over the same images (``erasure_quality.paired_rate_difference``;
CRA: the difference of the pooled shares). The table is ``benchmarks/report.py``'s ``erasure_lora``.

Claim checked (issue 20): a rank-16 LoRA erases as well as full fine-tuning -- the interval of
UA(r16) - UA(full) lies above -5 points -- at a fraction of the artifact size.

    python benchmarks/erasure_lora.py                 # reference model -> results/erasure_lora.json
    python benchmarks/erasure_lora.py --smoke         # tiny random pipeline + untrained oracle: logic only

``--reuse erasure_methods.json`` takes the full fine-tuning rows (``esd-full``, ``advunlearn-full``) from a
finished ``erasure_methods`` run measured with the same protocol and training flags (checked; that run's ESD and
AdvUnlearn are the same jobs), so only the LoRA settings are trained. The documented run
(``report.LORA_COMMAND``, shown in the table's caption) passes erasure_methods' settings and does this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from erasure_methods import add_advunlearn_flags, method_config, training_state_bytes  # noqa: E402
from erasure_quality import (  # noqa: E402
    RATES,
    load_for,
    paired_rate_difference,
    parse_settings,
    protocol_parser,
    reuse_flag,
    run_and_write,
)

from diffkit.evaluation import verdict  # noqa: E402

BASES = ("esd", "advunlearn")
SETTINGS = ("full", "r4", "r16")
METHODS = tuple(f"{b}-{s}" for b in BASES for s in SETTINGS)
#: The claim: UA(r16) - UA(full) >= -5 points.
UA_MARGIN = -0.05


def split(name: str) -> tuple[str, int | None]:
    """``"esd-r4"`` -> ("esd", 4); ``"esd-full"`` -> ("esd", None)."""
    base, _, setting = name.rpartition("-")
    return base, None if setting == "full" else int(setting[1:])


def lora_config(name: str, concept: str, args):
    """The method's job (``erasure_methods.method_config``); for a LoRA setting on the same layers with
    alpha = rank, at ``--lora-lr-scale`` times the method's learning rate (default: the same)."""
    base, rank = split(name)
    cfg = method_config(base, concept, args)
    if rank is None:
        return cfg
    scale = 1.0 if args.lora_lr_scale is None else args.lora_lr_scale
    return cfg.replace(parametrization="lora", lora_rank=rank, lora_alpha=None, lr=cfg.lr * scale)


def state_bytes(metrics: dict, name: str) -> int:
    return training_state_bytes(metrics, split(name)[0])


def comparisons(details: dict, concepts, methods) -> dict:
    """Per concept and LoRA setting: the paired difference to full fine-tuning of UA, UA synonyms, IRA, CRA over the
    images both score (``erasure_quality.paired_rate_difference``), and the claim's verdict on the UA interval.
    Jobs not finished yet (a partial run) are left out."""
    out = {}
    for concept in concepts:
        for name in methods:
            base, rank = split(name)
            a, b = details.get(f"{name}-{concept}"), details.get(f"{base}-full-{concept}")
            if rank is None or a is None or b is None:
                continue
            a, b = a["report"]["outcomes"], b["report"]["outcomes"]
            entry = {}
            for key in RATES:
                d = paired_rate_difference(a, b, key)
                if d is not None:
                    entry[key] = d
            if "ua" in entry:
                lo, hi = entry["ua"]["ci95"]
                entry["verdict_ua_within_5pt"] = verdict(lo, hi, UA_MARGIN, ">=")
            out[f"{name}-{concept}"] = entry
    return out


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (a scale of 0 would train nothing, a negative one away from the target)."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def parser():
    ap = protocol_parser(__doc__, METHODS, esd_steps=30, esd_lr=3e-4, n_prompts=32, seeds=[0, 1, 2, 3],
                         inference_steps=10, attack_prompts=32)
    add_advunlearn_flags(ap)
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="take the full fine-tuning rows (esd-full, advunlearn-full) from this finished "
                    "erasure_methods run (same protocol and training flags, checked) instead of training them again")
    # None (not 1.0) by default: a results file from before this flag resumes with the same settings
    ap.add_argument("--lora-lr-scale", type=positive_float, default=None,
                    help="LoRA settings train at this multiple of the method's learning rate (default 1)")
    return ap


def main(argv=None) -> int:
    args = parse_settings(parser(), argv)
    full = [m for m in args.methods if split(m)[1] is None]
    prior = reuse_flag(args, full, "erasure_lora", rename={m: split(m)[0] for m in full})
    models = load_for(args, "erasure_lora")
    if models is None:
        return 3
    for p in models[:2]:
        p.to(dtype=torch.float32)
    return run_and_write(args, models, "erasure_lora", lora_config, state_bytes,
                         lambda rows, details, concepts: comparisons(details, concepts, args.methods),
                         targets_key="comparisons", prior=prior)


if __name__ == "__main__":
    sys.exit(main())
