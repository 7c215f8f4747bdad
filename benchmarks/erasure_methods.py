"""The four erasure methods side by side on the reference model: ESD, SalUn, AdvUnlearn, DoCo.

Same protocol as ``benchmarks/erasure_quality.py`` (whose helpers this imports): for one object, one
color and one style, each method erases the concept's forget words (its evaluation-only synonym is never
shown); the oracle (``diffkit.evaluation.erasure_report``) measures UA on forget-word prompts, UA on
evaluation-only-synonym prompts, IRA, CRA and KID vs the original model; part 1's soft-prompt attack
(``diffkit.erasure.attack``) gives the ASR. Per job also: wall time, the exact training-state bytes
(trained weights' gradients and Adam moments, ESD/AdvUnlearn/DoCo's frozen copy, SalUn's mask, DoCo's
discriminator with its gradient and Adam state) and the process's peak RSS (cumulative over the run).

Settings: ESD (anchor "", eta 1, ESD-x) and SalUn (substitute = next concept of the factor, beta 0.5)
exactly as ``erasure_quality.job_config``; AdvUnlearn (text encoder, gamma 0.3, retain prompts as SalUn's,
the fast one-step sign attack — the CPU budget does not allow 30 attack steps per training step — with
20% warm-up); DoCo (cross-attention K/V, anchor = SalUn's substitute, discriminator warm-up a quarter of
the steps, concept-preserving gradient against prior preservation on the same retain prompts). Step
counts, learning rates and image counts are flags; the values used are recorded in the JSON.

Targets (issues 7, 17), each judged on a 95% interval (``check_targets``; met / missed / not resolved at this
n): AdvUnlearn's UnlearnDiffAtk success <= half of ESD's (bootstrap over the attack prompts of
ASR_adv - 0.5 ASR_esd); DoCo's synonym UA >= ESD's + 5 points where ESD's is below 95%; SalUn's IRA and CRA
>= ESD's (paired bootstraps over the same images); every method's UA >= 90% on the forget words, IRA >= 80%,
CRA >= 90%. The table is ``benchmarks/report.py``'s ``erasure_methods``.

    python benchmarks/erasure_methods.py              # reference model -> results/erasure_methods.json
    python benchmarks/erasure_methods.py --smoke      # tiny random pipeline + untrained oracle: logic only
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from erasure_quality import (  # noqa: E402  (part 1)
    asr_half_target,
    bar_target,
    job_config,
    load_for,
    not_applicable,
    paired_target,
    parse_settings,
    protocol_parser,
    reuse_flag,
    run_and_write,
)

from diffkit.erasure import ErasureConfig  # noqa: E402

METHODS = ("esd", "salun", "advunlearn", "doco")
ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "images" / "erasure_methods_grid.png"


def substitute_and_retain(concept: str) -> tuple[str, list[str]]:
    """SalUn's substitute (the next concept of the factor) and retain prompts, shared by AdvUnlearn and DoCo."""
    from diffkit.evaluation import shapes_erasure_prompts
    from diffkit.zoo.shapes import FACTORS, factor_of

    rivals = FACTORS[factor_of(concept)]
    retain = [s.prompt for s in shapes_erasure_prompts(concept, n=8, seed=1)["retain"]]  # not the eval prompts
    return rivals[(rivals.index(concept) + 1) % len(rivals)], retain


def method_config(method: str, concept: str, args) -> ErasureConfig:
    if method in ("esd", "salun"):
        return job_config(method, concept, args)
    from diffkit.zoo.shapes import forget_words

    words = list(forget_words(concept))
    substitute, retain = substitute_and_retain(concept)
    if method == "advunlearn":
        return ErasureConfig(method="advunlearn", concept=words, anchor="", eta=1.0, retain_prompts=retain,
                             steps=args.adv_steps, lr=args.adv_lr, batch_size=1, sample_steps=args.sample_steps,
                             seed=0, options={"attack": args.adv_attack, "gamma": 0.3,
                                              "retain_batch": args.adv_retain_batch})
    if method == "doco":
        return ErasureConfig(method="doco", concept=words, anchor=substitute, retain_prompts=retain,
                             steps=args.doco_steps, lr=args.doco_lr, batch_size=args.doco_batch,
                             num_images=args.doco_images, sample_steps=args.sample_steps, seed=0,
                             options={"discriminator_warmup": args.doco_steps // 4,
                                      "adversarial_weight": args.doco_adv_weight})
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def training_state_bytes(metrics: dict, method: str) -> int:
    """Exact float32 bytes the training adds: grad + 2 Adam moments of the trained weights, the frozen copy
    (ESD, AdvUnlearn, DoCo), SalUn's bool mask per candidate weight, DoCo's discriminator (weights, grad,
    2 moments)."""
    n = metrics["trained_weights"]
    extra = {"salun": metrics.get("candidate_weights", 0)}.get(method, n * 4)
    return n * 4 * 3 + extra + 16 * metrics.get("discriminator_weights", 0)


#: Issue 17's bars, for every method: (rate, bar).
BARS = (("ua", 0.90), ("ira", 0.80), ("cra", 0.90))
#: DoCo's synonym target applies where ESD's synonym UA (point estimate) is below this (else: no headroom).
DOCO_HEADROOM = 0.95


def check_targets(rows: list[dict], details: dict, concepts) -> dict:
    """Issue 17's targets per concept, each judged on an interval: AdvUnlearn's ASR <= half of ESD's (bootstrap
    over the attack prompts of ASR_adv - 0.5 ASR_esd); DoCo's synonym UA >= ESD's + 5 points where ESD's is below
    95%, SalUn's IRA and CRA >= ESD's (paired bootstraps over the same images); every method's UA >= 90%, IRA >=
    80%, CRA >= 90% (Wilson; CRA: bootstrap over images)."""
    out = {}
    for concept in concepts:
        by = {r["method"]: r for r in rows if r["concept"] == concept}
        t = {}
        if {"esd", "advunlearn"} <= set(by):
            t["advunlearn_asr_le_half_esd"] = asr_half_target(details, concept, "advunlearn", "esd")
        if {"esd", "doco"} <= set(by):
            esd = by["esd"]["ua_synonyms"]
            t["doco_synonym_ua_ge_esd_5pt"] = (
                paired_target(details, concept, "doco", "esd", "ua_synonyms", 0.05) if esd < DOCO_HEADROOM else
                not_applicable("DoCo UA synonym >= ESD's + 5 points (DoCo - ESD, paired)",
                               f"no headroom: ESD's is {100 * esd:.1f}% (>= {100 * DOCO_HEADROOM:g}%)"))
        if {"esd", "salun"} <= set(by):
            for key in ("ira", "cra"):
                t[f"salun_{key}_ge_esd"] = paired_target(details, concept, "salun", "esd", key)
        for m in METHODS:
            for key, bar in BARS:
                if m in by:
                    t[f"{m}_{key}_ge_{100 * bar:g}"] = bar_target(by[m], key, bar)
        out[concept] = t
    return out


def add_advunlearn_flags(ap) -> None:
    """AdvUnlearn's training flags (``method_config`` reads them); shared with ``erasure_lora.py``."""
    ap.add_argument("--adv-steps", type=int, default=30)
    ap.add_argument("--adv-lr", type=float, default=3e-4)
    ap.add_argument("--adv-attack", default="sign", choices=("sign", "adam"))
    ap.add_argument("--adv-retain-batch", type=int, default=2)


def parser():
    """Part 1's flags, with this script's defaults (the documented run passes part 1's values explicitly)."""
    ap = protocol_parser(__doc__, METHODS, esd_steps=30, esd_lr=3e-4, salun_steps=30, salun_lr=3e-4, salun_images=8,
                         n_prompts=8, seeds=[0], inference_steps=10, attack_steps=15)
    add_advunlearn_flags(ap)
    ap.add_argument("--doco-steps", type=int, default=30)
    ap.add_argument("--doco-lr", type=float, default=3e-4)
    ap.add_argument("--doco-batch", type=int, default=2)
    ap.add_argument("--doco-images", type=int, default=8)
    ap.add_argument("--doco-adv-weight", type=float, default=1.0,
                    help="DoCo's adversarial_weight (the generator's adversarial loss; the reference's is 1)")
    ap.add_argument("--reuse", default=None, metavar="JSON",
                    help="take the ESD and SalUn rows from this finished erasure_quality run (same protocol and "
                    "training flags, checked) instead of training and measuring them again")
    return ap


def main(argv=None) -> int:
    args = parse_settings(parser(), argv)
    prior = reuse_flag(args, [m for m in args.methods if m in ("esd", "salun")], "erasure_methods")
    models = load_for(args, "erasure_methods")
    if models is None:
        return 3
    original, erased, oracle = models
    for p in (original, erased):
        p.to(dtype=torch.float32)  # a folder given by --model may hold half-precision weights
    return run_and_write(args, models, "erasure_methods", method_config, training_state_bytes, check_targets, GRID,
                         prior=prior)


if __name__ == "__main__":
    sys.exit(main())
