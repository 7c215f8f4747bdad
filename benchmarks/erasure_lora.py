"""LoRA-parametrised erasure (ranks 4 and 16) against full fine-tuning, for ESD and AdvUnlearn.

Same protocol and job settings as ``benchmarks/erasure_methods.py`` (whose helpers this imports): for each
concept, each method is trained three ways on the same data, seeds and steps -- ``full`` (the selected
tensors themselves: ESD-x's cross-attention, AdvUnlearn's text encoder), ``r4`` and ``r16``
(``parametrization: lora`` on the same layers, alpha = rank) -- and measured by the oracle on the same
prompts and seeds: UA (forget words), UA (evaluation-only synonym), IRA, CRA, each with its 95% interval
(Wilson; CRA: bootstrap over images), the attack success rate of the first ``--attack``, the artifact's
size and the training time. Each LoRA setting is compared with full fine-tuning of the same method by the
paired bootstrap interval of the difference over the same images (``diffkit.evaluation.paired_difference``).

Claim checked (issue 20): a rank-16 LoRA erases as well as full fine-tuning -- the interval of
UA(r16) - UA(full) lies above -5 points -- at a fraction of the artifact size.

    python benchmarks/erasure_lora.py                 # reference model -> results/erasure_lora.json
    python benchmarks/erasure_lora.py --smoke         # tiny random pipeline + untrained oracle: logic only
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402
from erasure_methods import add_advunlearn_flags, method_config, training_state_bytes  # noqa: E402
from erasure_quality import parse_and_load, protocol_parser, run_jobs  # noqa: E402

from diffkit.evaluation import paired_difference, verdict  # noqa: E402

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
    base, rank = split(name)
    cfg = method_config(base, concept, args)
    return cfg if rank is None else cfg.replace(parametrization="lora", lora_rank=rank, lora_alpha=None)


def state_bytes(metrics: dict, name: str) -> int:
    return training_state_bytes(metrics, split(name)[0])


def _values(outcomes: dict, key: str) -> list[float]:
    if key == "cra":  # per image share of the other factors read right (images that score none: 0 of 0 -> skip)
        return [c / s if s else float("nan") for c, s in outcomes[key]]
    return [float("nan") if h is None else float(h) for h in outcomes[key]]


def comparisons(details: dict, concepts, methods) -> dict:
    """Per concept and LoRA setting: the paired difference to full fine-tuning of UA, UA synonyms, IRA, CRA."""
    out = {}
    for concept in concepts:
        for name in methods:
            base, rank = split(name)
            full = f"{base}-full"
            if rank is None or full not in methods:
                continue
            a = details[f"{name}-{concept}"]["report"]["outcomes"]
            b = details[f"{full}-{concept}"]["report"]["outcomes"]
            entry = {}
            for key in ("ua", "ua_synonyms", "ira", "cra"):
                va, vb = _values(a, key), _values(b, key)
                pairs = [(x, y) for x, y in zip(va, vb) if x == x and y == y]  # both scored (NaN != NaN)
                if pairs:
                    entry[key] = paired_difference([x for x, _ in pairs], [y for _, y in pairs]).to_json()
            if "ua" in entry:
                lo, hi = entry["ua"]["ci95"]
                entry["verdict_ua_within_5pt"] = verdict(lo, hi, UA_MARGIN, ">=")
            out[f"{name}-{concept}"] = entry
    return out


def add_intervals(rows: list[dict], details: dict) -> None:
    for r in rows:
        ci = details[f"{r['method']}-{r['concept']}"]["report"]["ci95"]
        for key in ("ua", "ua_synonyms", "ira", "cra"):
            if key in ci:
                r[f"{key}_ci95"] = ci[key]
        r["n_images"] = details[f"{r['method']}-{r['concept']}"]["report"]["n_images"]


def markdown_table(rows: list[dict], comps: dict) -> str:
    def pct(r, key):
        lo, hi = r.get(f"{key}_ci95", (float("nan"),) * 2)
        return f"{100 * r[key]:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}]"

    heads = ["concept", "method", "n forget", "UA forget [95% CI]", "UA synonym", "IRA", "CRA", "ASR",
             "UA - full [95% CI]", "verdict (>= -5 pt)", "artifact KiB", "train s"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        comp = comps.get(f"{r['method']}-{r['concept']}", {})
        diff = comp.get("ua")
        cells = [f"{r['concept']} ({r['factor']})", r["method"], str(r["n_images"]["forget"]), pct(r, "ua"),
                 pct(r, "ua_synonyms"), pct(r, "ira"), pct(r, "cra"), f"{100 * r['asr']:.0f}%",
                 "—" if diff is None else f"{100 * diff['difference']:+.0f} [{100 * diff['ci95'][0]:+.0f}, "
                                          f"{100 * diff['ci95'][1]:+.0f}]",
                 comp.get("verdict_ua_within_5pt", "—"), f"{r['storage_kib']:.0f}", f"{r['train_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = protocol_parser(__doc__, METHODS, esd_steps=30, esd_lr=3e-4, n_prompts=32, seeds=[0, 1, 2, 3],
                         inference_steps=10, attack_prompts=32)
    add_advunlearn_flags(ap)
    args, models = parse_and_load(ap, argv, "erasure_lora")
    if models is None:
        return 3
    original, erased, oracle = models
    for p in (original, erased):
        p.to(dtype=torch.float32)
    name = f"erasure_lora{'_smoke' if args.smoke else ''}{args.tag}.json"

    def payload(rows, details, complete):
        add_intervals(rows, details)
        comps = comparisons(details, args.concepts, args.methods) if complete else {}
        return dict(benchmark="erasure_lora", smoke=args.smoke, complete=complete, environment=environment(),
                    setting=dict(vars(args)), results=rows, comparisons=comps, details=details)

    def write_partial(rows, details):  # an interrupted run still leaves the figures of its finished jobs
        write_json(name, payload(rows, details, False))

    rows, details, _, _ = run_jobs(args, original, erased, oracle, lora_config, state_bytes, after_job=write_partial)
    data = payload(rows, details, True)
    print_table(rows)
    print(markdown_table(rows, data["comparisons"]))
    path = write_json(name, data)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
