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

Targets (issue 7): AdvUnlearn's ASR <= half of ESD's; DoCo's synonym UA > ESD's; both keep IRA and CRA
within 5 points of ESD's.

    python benchmarks/erasure_methods.py              # reference model -> results/erasure_methods.json
    python benchmarks/erasure_methods.py --smoke      # tiny random pipeline + untrained oracle: logic only
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402
from erasure_quality import (  # noqa: E402  (part 1)
    job_config,
    parse_and_load,
    protocol_parser,
    run_jobs,
    save_grid,
)
from erasure_quality import markdown_table as part1_table  # noqa: E402

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
                             options={"discriminator_warmup": args.doco_steps // 4})
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def training_state_bytes(metrics: dict, method: str) -> int:
    """Exact float32 bytes the training adds: grad + 2 Adam moments of the trained weights, the frozen copy
    (ESD, AdvUnlearn, DoCo), SalUn's bool mask per candidate weight, DoCo's discriminator (weights, grad,
    2 moments)."""
    n = metrics["trained_weights"]
    extra = {"salun": metrics.get("candidate_weights", 0)}.get(method, n * 4)
    return n * 4 * 3 + extra + 16 * metrics.get("discriminator_weights", 0)


def check_targets(rows: list[dict], concepts) -> dict:
    out = {}
    for concept in concepts:
        by = {r["method"]: r for r in rows if r["concept"] == concept}
        t = {}
        if "esd" in by and "advunlearn" in by:
            t["advunlearn_asr_le_half_esd"] = by["advunlearn"]["asr"] <= 0.5 * by["esd"]["asr"]
        if "esd" in by and "doco" in by:
            t["doco_synonym_ua_gt_esd"] = by["doco"]["ua_synonyms"] > by["esd"]["ua_synonyms"]
        for m in ("advunlearn", "doco"):
            if "esd" in by and m in by:
                t[f"{m}_ira_within_5pt"] = by[m]["ira"] >= by["esd"]["ira"] - 0.05
                t[f"{m}_cra_within_5pt"] = by[m]["cra"] >= by["esd"]["cra"] - 0.05
        out[concept] = t
    return out


def markdown_table(rows: list[dict]) -> str:
    return part1_table(rows, tail=(("state MiB", "{state_mib:.1f}"), ("peak RSS GiB", "{peak_rss_gib:.2f}")))

def add_advunlearn_flags(ap) -> None:
    """AdvUnlearn's training flags (``method_config`` reads them); shared with ``erasure_lora.py``."""
    ap.add_argument("--adv-steps", type=int, default=30)
    ap.add_argument("--adv-lr", type=float, default=3e-4)
    ap.add_argument("--adv-attack", default="sign", choices=("sign", "adam"))
    ap.add_argument("--adv-retain-batch", type=int, default=2)


def main(argv=None) -> int:
    # part 1's flags, with this script's defaults (the documented run passes part 1's values explicitly)
    ap = protocol_parser(__doc__, METHODS, esd_steps=30, esd_lr=3e-4, salun_steps=30, salun_lr=3e-4, salun_images=8,
                         n_prompts=8, seeds=[0], inference_steps=10, attack_steps=15)
    add_advunlearn_flags(ap)
    ap.add_argument("--doco-steps", type=int, default=30)
    ap.add_argument("--doco-lr", type=float, default=3e-4)
    ap.add_argument("--doco-batch", type=int, default=2)
    ap.add_argument("--doco-images", type=int, default=8)
    args, models = parse_and_load(ap, argv, "erasure_methods")
    if models is None:
        return 3
    original, erased, oracle = models
    for p in (original, erased):
        p.to(dtype=torch.float32)  # a folder given by --model may hold half-precision weights
    name = f"erasure_methods{'_smoke' if args.smoke else ''}{args.tag}.json"

    def write_partial(rows, details):  # an interrupted run still leaves the figures of its finished jobs
        write_json(name, dict(benchmark="erasure_methods", smoke=args.smoke, complete=False, environment=environment(),
                              setting=dict(vars(args)), results=rows, targets=check_targets(rows, args.concepts),
                              details=details))

    rows, details, grid_rows, grid_labels = run_jobs(args, original, erased, oracle, method_config,
                                                     training_state_bytes, after_job=write_partial)
    print_table(rows)
    print(markdown_table(rows))
    targets_met = check_targets(rows, args.concepts)
    print("targets:", targets_met)
    cols = [f"{who}: {what}" for who in ["original", *args.methods] for what in ("forget", "synonym", "retain")]
    grid_path = Path(tempfile.gettempdir()) / f"erasure_methods_grid{args.tag}.png" if args.smoke or args.tag else GRID
    grid_bytes = save_grid(grid_rows, grid_labels, cols, grid_path)
    payload = dict(benchmark="erasure_methods", smoke=args.smoke, complete=True, environment=environment(),
                   setting={k: v for k, v in vars(args).items()}, results=rows, targets=targets_met,
                   grid=dict(path=str(grid_path.relative_to(ROOT)) if grid_path == GRID else str(grid_path),
                             bytes=grid_bytes, columns=cols, rows=grid_labels),
                   details=details)
    path = write_json(name, payload)
    print(f"wrote {path} and {grid_path} ({grid_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
