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

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, print_table, write_json  # noqa: E402
from erasure_quality import concept_latents, images, job_config, load_models, save_grid  # noqa: E402  (part 1)

from diffkit.erasure import ErasureConfig, erase, make_accelerator, read_sidecar  # noqa: E402
from diffkit.erasure.attack import AttackConfig, attack_success_rate  # noqa: E402

METHODS = ("esd", "salun", "advunlearn", "doco")
ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "images" / "erasure_methods_grid.png"
DEFAULT_CONCEPTS = ("star", "red", "striped")


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
    head = ("| concept | method | UA forget | UA synonym | IRA | CRA | KID | ASR (pre-attack) | train s | "
            "state MiB | peak RSS GiB |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['concept']} ({r['factor']}) | {r['method']} | {100 * r['ua']:.0f}% | "
                     f"{100 * r['ua_synonyms']:.0f}% | {100 * r['ira']:.0f}% | {100 * r['cra']:.0f}% | "
                     f"{r['kid']:.4f} | {100 * r['asr']:.0f}% ({100 * r['pre_attack']:.0f}%) | {r['train_s']:.0f} | "
                     f"{r['state_mib']:.1f} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random pipeline and untrained oracle (logic check)")
    ap.add_argument("--model", default=None, help="pipeline folder instead of the shipped reference model")
    ap.add_argument("--classifier", default=None, help="oracle folder instead of the shipped one")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--note", default="", help="free text recorded with the results (e.g. which weights)")
    ap.add_argument("--concepts", nargs="+", default=list(DEFAULT_CONCEPTS), help="canonical shapes words")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--esd-steps", type=int, default=30)
    ap.add_argument("--esd-lr", type=float, default=3e-4)
    ap.add_argument("--salun-steps", type=int, default=30)
    ap.add_argument("--salun-lr", type=float, default=3e-4)
    ap.add_argument("--salun-batch", type=int, default=4)
    ap.add_argument("--salun-images", type=int, default=8)
    ap.add_argument("--adv-steps", type=int, default=30)
    ap.add_argument("--adv-lr", type=float, default=3e-4)
    ap.add_argument("--adv-attack", default="sign", choices=("sign", "adam"))
    ap.add_argument("--adv-retain-batch", type=int, default=2)
    ap.add_argument("--doco-steps", type=int, default=30)
    ap.add_argument("--doco-lr", type=float, default=3e-4)
    ap.add_argument("--doco-batch", type=int, default=2)
    ap.add_argument("--doco-images", type=int, default=8)
    ap.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the original model's sampling")
    ap.add_argument("--n-prompts", type=int, default=8, help="evaluation prompts per group")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--inference-steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--attack-prompts", type=int, default=4)
    ap.add_argument("--attack-steps", type=int, default=15)
    args = ap.parse_args(argv)
    if args.smoke:
        args.esd_steps = args.salun_steps = args.adv_steps = args.doco_steps = 2
        args.salun_images, args.salun_batch, args.doco_images, args.doco_batch = 2, 2, 2, 2
        args.sample_steps, args.n_prompts, args.seeds, args.inference_steps = 2, 2, [0], 2
        args.attack_prompts, args.attack_steps = 1, 2
    try:
        original, erased, oracle = load_models(args.smoke, args.model, args.classifier)
    except FileNotFoundError as e:
        print(f"erasure_methods: the reference model is not available ({e}); nothing measured.")
        return 3
    for p in (original, erased):
        p.to(dtype=torch.float32)  # a folder given by --model may hold half-precision weights
    from diffkit.evaluation import erasure_report, shapes_erasure_prompts
    from diffkit.zoo.shapes import factor_of

    acc = make_accelerator("no")
    call = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    rows, details, grid_rows, grid_labels = [], {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            factor = factor_of(concept)
            groups = shapes_erasure_prompts(concept, n=args.n_prompts, seed=0)
            attack_prompts = [s.prompt for s in groups["forget"][: args.attack_prompts]]
            attack_seeds = list(range(100, 100 + len(attack_prompts)))
            targets = concept_latents(original, attack_prompts, attack_seeds, args.inference_steps, args.guidance)

            show = [groups["forget"][0].prompt, groups["synonyms"][0].prompt, groups["retain"][0].prompt]
            grid = list(images(original, show, 0, args.inference_steps, args.guidance))

            def judge(batch, factor=factor, concept=concept):
                return [lab == concept for lab in oracle.classify(batch, value_range=(0, 1)).labels[factor]]

            for method in args.methods:
                cfg = method_config(method, concept, args)
                t0 = time.perf_counter()
                result = erase(erased, cfg, Path(tmp) / f"{method}-{concept}", accelerator=acc, progress=True)
                train_s = time.perf_counter() - t0
                m = result.sidecar["metrics"]
                report = erasure_report(original, erased, oracle, factor, concept, groups["forget"],
                                        groups["synonyms"], groups["retain"], seeds=args.seeds, progress=False,
                                        **call)
                attack = attack_success_rate(erased, attack_prompts, judge, targets,
                                             AttackConfig(steps=args.attack_steps, guidance_scale=args.guidance,
                                                          num_inference_steps=args.inference_steps))
                grid += list(images(erased, show, 0, args.inference_steps, args.guidance))
                erased.unload_erasure()
                row = dict(concept=concept, factor=factor, method=method, ua=report["ua"],
                           ua_synonyms=report["ua_synonyms"], ira=report["ira"], cra=report["cra"], kid=report["kid"],
                           asr=attack.asr, pre_attack=attack.pre_attack_rate, train_s=train_s,
                           state_mib=training_state_bytes(m, method) / 2**20,
                           storage_kib=read_sidecar(result.path)["storage_bytes"] / 1024,
                           peak_rss_gib=m["peak_memory_bytes"] / 2**30)
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                details[f"{method}-{concept}"] = dict(report=report, attack=attack.to_dict(), config=cfg.to_dict(),
                                                      metrics={k: v for k, v in m.items() if k != "losses"},
                                                      loss_first=m["losses"][0], loss_last=m["losses"][-1])
                # A partial result after every job, so an interrupted run still leaves its figures.
                write_json(f"erasure_methods{'_smoke' if args.smoke else ''}{args.tag}.json",
                           dict(benchmark="erasure_methods", smoke=args.smoke, complete=False,
                                environment=environment(), setting=dict(vars(args)), results=rows,
                                targets=check_targets(rows, args.concepts), details=details))
            grid_rows.append(grid)
            grid_labels.append(f"{concept} ({factor})")
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
    path = write_json(f"erasure_methods{'_smoke' if args.smoke else ''}{args.tag}.json", payload)
    print(f"wrote {path} and {grid_path} ({grid_bytes} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
