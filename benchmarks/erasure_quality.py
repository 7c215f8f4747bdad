"""Erasure quality on the reference model: ESD and SalUn erasing one object, one color and one style.

For each (concept, method): train with the engine (the job's concept list is the concept's forget
words, ``diffkit.zoo.shapes.forget_words``; its evaluation-only synonym is never shown), then measure
with the oracle (``diffkit.evaluation.erasure_report``):

* UA on forget-word prompts and UA on evaluation-only-synonym prompts (share of images *not* showing
  the concept), IRA (other concepts of the same factor still generated), CRA (other factors intact),
  KID of the erased model's retain images against the original's (oracle features);
* attack success on forget prompts, judged by the oracle (``diffkit.erasure.attack``): ``--attack
  unlearndiffatk`` (default; the discrete-token attack the papers report) and/or ``soft-prompt`` (the stronger
  continuous one); each with its n and 95% Wilson interval;
* the non-text probes (``diffkit.erasure.probes``, ``--probes noise-search completion``): the rate at which
  an initial-noise search over the same prompts, and a completion of the original model's concept images
  noised to ``--probe-strengths`` under the neutral prompt "", bring the concept back (n, Wilson interval);
* wall time of the erasure, the artifact's size, the process's peak RSS (cumulative over the run, CPU) and the exact
  training-state bytes (trained weights, their gradients, Adam's two moments, the frozen copy ESD keeps,
  SalUn's mask).

ESD uses anchor "" (the paper's equation) and eta 1; SalUn maps the concept to the next concept of the
same factor (the reference code's "next class" substitute) with beta 0.5 on retain prompts of the
other concepts. Targets (issue 6), judged on 95% intervals (``quality_targets``): UA >= 95% on forget words
(Wilson); SalUn's IRA and CRA at least ESD's (paired bootstrap over the same images). Every rate is stored with
its n and interval, the per-image outcomes in ``details``; the table is ``benchmarks/report.py``'s
``erasure_quality`` (with the original model's rows, measured on the same prompts and seeds).

    python benchmarks/erasure_quality.py              # reference model -> results/erasure_quality.json + grid
    python benchmarks/erasure_quality.py --smoke      # tiny random pipeline + untrained oracle: logic only
    python benchmarks/erasure_quality.py --attack unlearndiffatk soft-prompt --probes noise-search completion

UnlearnDiffAtk's budget flags default to its reference values (``--attack-tokens 5``,
``--attack-iterations 40`` per timestep, ``--attack-timesteps 50``, lr 0.01); its images, like every other
image here, use ``--inference-steps`` DDIM steps (the reference samples 50 LMS steps).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, environment, print_table, write_json  # noqa: E402

from diffkit.erasure import ErasureConfig, erase, make_accelerator, read_sidecar  # noqa: E402
from diffkit.erasure.attack import ATTACKS, AttackConfig, attack_success_rate  # noqa: E402
from diffkit.erasure.probes import CompletionConfig, NoiseSearchConfig, completion_probe, noise_search_probe  # noqa: E402
from diffkit.erasure.unlearndiffatk import UnlearnDiffAtkConfig  # noqa: E402

PROBES = ("noise-search", "completion")

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "docs" / "images" / "erasure_grid.png"
DEFAULT_CONCEPTS = ("star", "red", "striped")


def load_models(smoke: bool, model: str | None = None, classifier: str | None = None):
    """(original, to-be-erased, oracle): two copies of the pipeline so the original stays untouched."""
    if model is not None:
        import diffkit
        from diffkit.zoo.classifier import load_classifier, load_reference_classifier

        pipes = [diffkit.DiffusionPipeline.from_pretrained(model) for _ in range(2)]
        oracle = load_classifier(classifier) if classifier else load_reference_classifier()
    elif smoke:
        import diffkit
        from diffkit.zoo import build_tiny_pipeline
        from diffkit.zoo.classifier import ClassifierConfig, ShapesClassifier
        from diffkit.zoo.shapes import FACTORS, vocabulary

        pipes = [diffkit.to_diffkit(build_tiny_pipeline("sd15", words=vocabulary())) for _ in range(2)]
        torch.manual_seed(0)
        oracle = ShapesClassifier(ClassifierConfig(factors=dict(FACTORS))).eval()
    else:
        from diffkit.zoo import load_reference_classifier, load_reference_pipeline

        pipes = [load_reference_pipeline() for _ in range(2)]
        oracle = load_reference_classifier()
    for p in pipes:
        p.set_progress_bar_config(disable=True)
    return pipes[0], pipes[1], oracle


def job_config(method: str, concept: str, args) -> ErasureConfig:
    from diffkit.evaluation import shapes_erasure_prompts
    from diffkit.zoo.shapes import FACTORS, factor_of, forget_words

    factor = factor_of(concept)
    # Each forget word bare (as ESD's reference jobs) and in the training captions' context
    # ("a <word>" for objects, "a <word> shape" when the object is left unsaid).
    words = [p for w in forget_words(concept) for p in (w, f"a {w}" if factor == "object" else f"a {w} shape")]
    if method == "esd":
        return ErasureConfig(method="esd", concept=words, anchor="", eta=1.0, steps=args.esd_steps,
                             lr=args.esd_lr, batch_size=1, sample_steps=args.sample_steps, seed=0)
    rivals = FACTORS[factor_of(concept)]
    substitute = rivals[(rivals.index(concept) + 1) % len(rivals)]
    retain = [s.prompt for s in shapes_erasure_prompts(concept, n=8, seed=1)["retain"]]  # not the eval prompts
    return ErasureConfig(method="salun", concept=words, anchor=substitute, retain_prompts=retain,
                         steps=args.salun_steps, lr=args.salun_lr, batch_size=args.salun_batch,
                         num_images=args.salun_images, sample_steps=args.sample_steps, beta=0.5, seed=0)


def training_state_bytes(metrics: dict, method: str) -> int:
    """Exact bytes the training adds for its trained weights (float32): grad + 2 Adam moments
    (+ ESD's frozen copy; + SalUn's bool mask per candidate weight)."""
    n = metrics["trained_weights"]
    extra = n * 4 if method == "esd" else metrics.get("candidate_weights", 0)
    return n * 4 * 3 + extra


@torch.no_grad()
def attack_instances(prompts: list[str], copies: int) -> tuple[list[str], list[int]]:
    """The attacked (prompt, seed) pairs: every prompt ``copies`` times, prompt i of copy k seeded
    100 + k * len(prompts) + i (its concept image's sampling). An attack and a probe draw by the instance's index
    (``config.seed + index``), so every copy is attacked with its own draws and generation seed, and copy 0 is
    the one-seed protocol's instances unchanged."""
    return prompts * copies, list(range(100, 100 + copies * len(prompts)))


def concept_latents(pipe, prompts, seeds, steps: int, guidance: float) -> torch.Tensor:
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance,
                output_type="latent").images.float()


@torch.no_grad()
def images(pipe, prompts, seed: int, steps: int, guidance: float) -> np.ndarray:
    gens = [torch.Generator().manual_seed(seed) for _ in prompts]
    out = pipe(list(prompts), generator=gens, num_inference_steps=steps, guidance_scale=guidance, output_type="np")
    return (np.clip(out.images, 0, 1) * 255).round().astype(np.uint8)


def save_grid(cells: list[list[np.ndarray]], row_labels, col_labels, path: Path, scale: int = 2,
              max_bytes: int | None = 300_000) -> int:
    """Rows x columns of images with labels, as an optimised PNG (a 256-colour palette where it would be over
    ``max_bytes``); returns its size in bytes."""
    from PIL import Image, ImageDraw

    h, w = cells[0][0].shape[:2]
    h, w = h * scale, w * scale
    left, top = 120, 28
    canvas = Image.new("RGB", (left + w * len(col_labels), top + h * len(row_labels)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(col_labels):
        draw.text((left + j * w + 4, 8), label, fill=(0, 0, 0))
    for i, label in enumerate(row_labels):
        draw.text((4, top + i * h + h // 2 - 12), label, fill=(0, 0, 0))
        for j, img in enumerate(cells[i]):
            tile = Image.fromarray(img).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (left + j * w, top + i * h))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    canvas.save(tmp, format="PNG", optimize=True)
    if max_bytes is not None and tmp.stat().st_size > max_bytes:  # the README budget: a 256-colour palette
        canvas.quantize(256).save(tmp, format="PNG", optimize=True)
    tmp.replace(path)
    return path.stat().st_size


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (0 attack seeds would attack nothing and fail later, obscurely)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def protocol_parser(doc: str, methods, **defaults) -> argparse.ArgumentParser:
    """The flags both erasure benchmarks share: models, concepts, ESD / SalUn training, evaluation and attack
    (``defaults`` overrides any of them by its dest name, e.g. ``esd_steps=30``); ``--methods`` chooses from
    ``methods``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random pipeline and untrained oracle (logic check)")
    ap.add_argument("--model", default=None, help="pipeline folder instead of the shipped reference model")
    ap.add_argument("--classifier", default=None, help="oracle folder instead of the shipped one")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--note", default="", help="free text stored with the results (e.g. which weights)")
    ap.add_argument("--concepts", nargs="+", default=list(DEFAULT_CONCEPTS), help="canonical shapes words")
    ap.add_argument("--methods", nargs="+", default=list(methods), choices=methods)
    ap.add_argument("--esd-steps", type=int, default=300)
    ap.add_argument("--esd-lr", type=float, default=5e-4)
    ap.add_argument("--salun-steps", type=int, default=100)
    ap.add_argument("--salun-lr", type=float, default=2e-4)
    ap.add_argument("--salun-batch", type=int, default=4)
    ap.add_argument("--salun-images", type=int, default=16)
    ap.add_argument("--sample-steps", type=int, default=10, help="DDIM steps of the original model's sampling")
    ap.add_argument("--n-prompts", type=int, default=12, help="evaluation prompts per group")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--inference-steps", type=int, default=15)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--attack-prompts", type=int, default=4)
    ap.add_argument("--attack-seeds", type=positive_int, default=1,
                    help="each attack prompt attacked this many times, each with its own target image, attack draws "
                         "and generation seed (the rates' n is prompts x seeds)")
    ap.add_argument("--attack", nargs="+", default=["unlearndiffatk"], choices=ATTACKS,
                    help="attacks whose success is reported (the first fills the table's ASR column)")
    ap.add_argument("--attack-steps", type=int, default=20, help="soft-prompt: Adam steps")
    ap.add_argument("--attack-tokens", type=int, default=5, help="unlearndiffatk: adversarial tokens (reference 5)")
    ap.add_argument("--attack-iterations", type=int, default=40,
                    help="unlearndiffatk: optimisation steps per timestep (reference 40)")
    ap.add_argument("--attack-timesteps", type=int, default=50,
                    help="unlearndiffatk: timesteps, one generation + judgement after each (reference 50)")
    ap.add_argument("--probes", nargs="*", default=[], choices=PROBES, help="non-text probes to report")
    ap.add_argument("--probe-candidates", type=int, default=16, help="noise search: initial noises per prompt")
    ap.add_argument("--probe-strengths", type=float, nargs="+", default=[0.5, 0.75],
                    help="completion: fractions of the schedule re-noised")
    ap.add_argument("--resume", action="store_true",
                    help="continue a killed run: keep the finished jobs of its partial JSON (same settings, checked)")
    ap.set_defaults(**defaults)
    return ap


def smoke_settings(args) -> None:
    """Two of everything: enough to run every code path of a benchmark in seconds."""
    for name in ("esd_steps", "salun_steps", "adv_steps", "doco_steps", "salun_images", "salun_batch",
                 "doco_images", "doco_batch", "sample_steps", "n_prompts", "inference_steps", "attack_steps",
                 "attack_iterations", "attack_timesteps", "attack_tokens", "probe_candidates"):
        if hasattr(args, name):
            setattr(args, name, 2)
    args.seeds, args.attack_prompts = [0], 1


def parse_settings(ap, argv):
    """Parse the flags; ``--smoke`` shrinks every setting."""
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_settings(args)
    return args


def load_for(args, script: str):
    """(original, to-be-erased, oracle), or None after a message when the reference model is not available."""
    try:
        return load_models(args.smoke, args.model, args.classifier)
    except FileNotFoundError as e:
        print(f"{script}: the reference model is not available ({e}); nothing measured.")
        return None


def parse_and_load(ap, argv, script: str):
    """Parse the flags and load the models (:func:`parse_settings`, :func:`load_for`)."""
    args = parse_settings(ap, argv)
    return args, load_for(args, script)


# -- n and 95% intervals of every rate, per-image comparisons and the targets (issues 16, 17) -------------------

#: Recorded in each erasure JSON whose rows carry n and intervals (benchmarks/report.py renders files without it as
#: stale); ``asr_half``: how "AdvUnlearn's ASR <= half of ESD's" is judged.
STATS = dict(confidence=0.95, rates="Wilson score interval (UA, UA synonym, IRA, attack and probe rates)",
             cra="percentile bootstrap over images (2000 resamples) of the pooled share of other factors read right",
             differences="paired bootstrap over the same images (prompts x seeds), 2000 resamples",
             asr_half="paired bootstrap over the attack prompts of ASR_adv - 0.5 ASR_esd (target <= 0)")
#: The rates of an erasure report, each with its n and interval in the rows.
RATES = ("ua", "ua_synonyms", "ira", "cra")
NAMES = {"esd": "ESD", "salun": "SalUn", "advunlearn": "AdvUnlearn", "doco": "DoCo", "original": "original"}
WORDS = {"ua": "UA forget", "ua_synonyms": "UA synonym", "ira": "IRA", "cra": "CRA"}


def rate_columns(name: str, r) -> dict:
    """A :class:`diffkit.evaluation.Rate` as flat row fields: ``name``, ``name_ci95``, ``name_n``."""
    return {name: r.value, f"{name}_ci95": [r.low, r.high], f"{name}_n": r.n}


def _pairs(outcomes: dict, key: str) -> np.ndarray:
    """Per image (correct, scored) of ``key``: UA / IRA hits as (h, 1), (0, 0) where not scored; CRA as stored."""
    if key == "cra":
        return np.asarray(outcomes[key], dtype=np.float64).reshape(-1, 2)
    return np.array([(0, 0) if h is None else (h, 1) for h in outcomes[key]], dtype=np.float64).reshape(-1, 2)


def rate_fields(report: dict) -> dict:
    """The rows' fields for an ``erasure_report``: the images of each group (``n_images``), and of each rate its
    n (images scored) and 95% interval (``report["ci95"]``: Wilson; CRA bootstrapped over images)."""
    out = {"n_images": report["n_images"]}
    for key in RATES:
        out[f"{key}_n"] = int((_pairs(report["outcomes"], key)[:, 1] > 0).sum())
        if key in report["ci95"]:
            out[f"{key}_ci95"] = list(report["ci95"][key])
    return out


def paired_rate_difference(a: dict, b: dict, key: str) -> dict:
    """rate_A - rate_B of ``key`` (UA, UA synonym, IRA, CRA) from two reports' per-image ``outcomes`` on the same
    prompts and seeds, over the images both score, with the paired bootstrap interval (the images resampled
    together): the per-image differences for UA / IRA, the difference of the pooled CRA shares for CRA.
    JSON: {"difference", "ci95", "n"}; None where no image is scored by both."""
    from diffkit.evaluation import bootstrap_interval, paired_difference

    pa, pb = _pairs(a, key), _pairs(b, key)
    keep = (pa[:, 1] > 0) & (pb[:, 1] > 0)
    pa, pb = pa[keep], pb[keep]
    if not len(pa):
        return None
    if key != "cra":
        return paired_difference(pa[:, 0], pb[:, 0]).to_json()

    def diff(ix):
        ix = ix.astype(int)
        return pa[ix, 0].sum() / pa[ix, 1].sum() - pb[ix, 0].sum() / pb[ix, 1].sum()

    index = np.arange(len(pa), dtype=np.float64)
    return {"difference": float(diff(index)), "ci95": list(bootstrap_interval(index, diff)), "n": len(pa)}


def _judged(entry: dict, label: str, target: float, direction: str, kind: str) -> dict:
    from diffkit.evaluation import verdict

    lo, hi = entry["ci95"]
    return dict(label=label, kind=kind, **entry, target=f"{direction} {target:g}",
                verdict=verdict(lo, hi, target, direction))


def bar_target(row: dict, key: str, bar: float) -> dict:
    """A row's rate against a bar, judged on its interval."""
    label = f"{NAMES.get(row['method'], row['method'])} {WORDS[key]} >= {100 * bar:g}%"
    if row.get(f"{key}_ci95") is None:
        return not_applicable(label, "no image scored")
    return _judged(dict(estimate=row[key], ci95=row[f"{key}_ci95"], n=row[f"{key}_n"]), label, bar, ">=", "rate")


def paired_target(details: dict, concept: str, a: str, b: str, key: str, margin: float = 0.0) -> dict:
    """Method ``a``'s rate ``key`` at least ``b``'s + ``margin``, judged on the paired interval of the difference."""
    d = paired_rate_difference(details[f"{a}-{concept}"]["report"]["outcomes"],
                               details[f"{b}-{concept}"]["report"]["outcomes"], key)
    plus = f" + {100 * margin:g} points" if margin else ""
    label = f"{NAMES[a]} {WORDS[key]} >= {NAMES[b]}'s{plus} ({NAMES[a]} - {NAMES[b]}, paired)"
    if d is None:
        return not_applicable(label, "no image scored by both")
    return _judged(dict(estimate=d["difference"], ci95=d["ci95"], n=d["n"]), label, margin, ">=", "difference")


def asr_half_target(details: dict, concept: str, a: str, b: str) -> dict:
    """``a``'s attack success at most half of ``b``'s (UnlearnDiffAtk where it ran, else the first attack), judged
    on the bootstrap over the attack prompts (both methods attacked on the same prompts) of
    mean(hit_a - 0.5 hit_b) = ASR_a - 0.5 ASR_b against 0."""
    from diffkit.evaluation import paired_difference

    attacks = details[f"{a}-{concept}"]["attack"]
    name = "unlearndiffatk" if "unlearndiffatk" in attacks else next(iter(attacks))
    ha = [float(h) for h in attacks[name]["success"]]
    hb = [0.5 * float(h) for h in details[f"{b}-{concept}"]["attack"][name]["success"]]
    d = paired_difference(ha, hb).to_json()
    label = f"{NAMES[a]} {name} ASR <= half of {NAMES[b]}'s (ASR_{a} - 0.5 ASR_{b} <= 0)"
    return _judged(dict(estimate=d["difference"], ci95=d["ci95"], n=d["n"]), label, 0.0, "<=", "difference")


def not_applicable(label: str, reason: str) -> dict:
    return dict(label=label, kind="n/a", verdict="n/a", reason=reason)


def quality_targets(rows: list[dict], details: dict, concepts) -> dict:
    """Issue 6's targets per concept: each method's UA on the forget words >= 95%; SalUn's IRA and CRA at least
    ESD's (paired)."""
    out = {}
    for concept in concepts:
        by = {r["method"]: r for r in rows if r["concept"] == concept}
        t = {f"{m}_ua_ge_95": bar_target(by[m], "ua", 0.95) for m in by}
        if {"esd", "salun"} <= set(by):
            for key in ("ira", "cra"):
                t[f"salun_{key}_ge_esd"] = paired_target(details, concept, "salun", "esd", key)
        out[concept] = t
    return out


def robustness(args, erased, prompts, judge, score, targets) -> dict:
    """Each attack of ``args.attack`` and probe of ``args.probes`` on ``erased``: {"asr", "pre_attack" (the first
    attack's), "columns" (per attack / probe, and the first attack's pre-attack rate: rate, n and 95% Wilson
    interval, flat for the rows, :func:`rate_columns`), "details" (per prompt hits included)}."""
    from diffkit.evaluation.stats import rate

    columns, details, first = {}, {}, None
    for name in args.attack:
        if name == "soft-prompt":
            cfg = AttackConfig(steps=args.attack_steps, guidance_scale=args.guidance,
                               num_inference_steps=args.inference_steps)
        else:
            cfg = UnlearnDiffAtkConfig(prefix_tokens=args.attack_tokens, iterations=args.attack_iterations,
                                       timesteps=args.attack_timesteps, guidance_scale=args.guidance,
                                       num_inference_steps=args.inference_steps,
                                       batch_size=len(prompts))  # one batch: a prompt's result is its own alone
        rep = attack_success_rate(erased, prompts, judge, targets, cfg, attack=name)
        r = rate(rep.hits)
        key = name.replace("-", "_")
        if first is None:
            first = rep
            columns.update(rate_columns("pre_attack", rate(rep.pre_attack)))
        columns.update(rate_columns(f"asr_{key}", r))
        details[name] = {**rep.to_dict(), "rate": r.to_json(), "pre_attack_rate": rate(rep.pre_attack).to_json()}
    call = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    for name in args.probes:
        if name == "noise-search":
            rep = noise_search_probe(erased, prompts, judge, score,
                                     NoiseSearchConfig(candidates=args.probe_candidates, **call))
        else:
            rep = completion_probe(erased, targets, judge, CompletionConfig(strengths=tuple(args.probe_strengths),
                                                                            **call))
        r = rate(rep.hits)
        key = name.replace("-", "_")
        columns.update(rate_columns(f"probe_{key}", r))
        details[name] = {**rep.to_dict(), "rate": r.to_json(),
                         "level_rates": {k: rate(h).to_json() for k, h in rep.levels.items()}}
    return dict(asr=first.asr, pre_attack=first.pre_attack_rate, columns=columns, details=details)


def run_jobs(args, original, erased, oracle, config_for, state_bytes, after_job=None, originals=None, done=(),
             cells_dir: Path | None = None, reused_cells: Path | None = None, reused=()):
    """For each concept and method of ``args``: erase, measure (oracle report, attacks, probes), unload.

    ``config_for(method, concept, args)`` builds the job; ``state_bytes(metrics, method)`` counts its training
    state; ``after_job(rows, details)`` runs after every job (partial results). Each row has every rate with its
    n and 95% interval (:func:`rate_fields`, :func:`rate_columns`); ``details`` keep the per-image outcomes
    (``report["outcomes"]``) and per-prompt attack and probe hits. With a list ``originals``, the original
    model's row per concept (same prompts and seeds) is appended to it and its report kept in
    ``details["original-<concept>"]``. Returns (rows, details, grid rows, grid row labels); a grid row is the
    original's forget / synonym / retain images, then each method's. ``done``: the (concept, method) jobs, and
    (concept, "original") rows, a killed run finished (not run again); ``cells_dir``: where each job's grid images
    are kept (``<method>-<concept>.npy``), so that a resumed run still draws the whole grid. ``reused``: methods
    measured by an earlier run (not run here), whose grid images are taken from that run's ``reused_cells`` folder
    (the same grid prompts, seed and sampling: the settings were checked), blank where it has none.
    """
    from diffkit.evaluation import erasure_report, shapes_erasure_prompts
    from diffkit.zoo.shapes import factor_of

    acc = make_accelerator("no")
    call = dict(num_inference_steps=args.inference_steps, guidance_scale=args.guidance)
    rows, details, grid_rows, grid_labels = [], {}, [], []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in args.concepts:
            factor = factor_of(concept)
            groups = shapes_erasure_prompts(concept, n=args.n_prompts, seed=0)
            attack_prompts, attack_seeds = attack_instances([s.prompt for s in groups["forget"][: args.attack_prompts]],
                                                            args.attack_seeds)
            targets = concept_latents(original, attack_prompts, attack_seeds, args.inference_steps, args.guidance)
            show = [groups["forget"][0].prompt, groups["synonyms"][0].prompt, groups["retain"][0].prompt]

            def cells(pipe, key, show=show, kept_only=False, folder=cells_dir):
                path = None if folder is None else folder / f"{key}.npy"
                if path is not None and path.is_file():  # cells_dir is emptied when a run starts afresh
                    return list(np.load(path))
                if kept_only:  # a finished job of a killed run whose images were not kept
                    return None
                out = images(pipe, show, 0, args.inference_steps, args.guidance)
                if path is not None:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, out)
                return list(out)

            grid = cells(original, f"original-{concept}")
            if originals is not None and (concept, "original") not in done:
                # erased_pipe is original_pipe: one generation of the three groups
                report = erasure_report(original, original, oracle, factor, concept, groups["forget"],
                                        groups["synonyms"], groups["retain"], seeds=args.seeds, progress=False,
                                        **call)
                originals.append(dict(concept=concept, factor=factor, method="original",
                                      **{k: report[k] for k in RATES}, **rate_fields(report)))
                details[f"original-{concept}"] = dict(report=report)

            def judge(batch, factor=factor, concept=concept):
                return [lab == concept for lab in oracle.classify(batch, value_range=(0, 1)).labels[factor]]

            def score(batch, factor=factor, concept=concept):  # the noise search's ranking
                index = list(oracle.factors[factor]).index(concept)
                return oracle.classify(batch, value_range=(0, 1)).probs[factor][:, index]

            for method in args.methods:
                if method in reused:
                    kept = cells(erased, f"{method}-{concept}", kept_only=True, folder=reused_cells)
                    grid += [np.zeros_like(grid[0])] * len(show) if kept is None else kept
                    continue
                if (concept, method) in done:
                    kept = cells(erased, f"{method}-{concept}", kept_only=True)
                    grid += [np.zeros_like(grid[0])] * len(show) if kept is None else kept  # blank if not kept
                    continue
                cfg = config_for(method, concept, args)
                t0 = time.perf_counter()
                result = erase(erased, cfg, Path(tmp) / f"{method}-{concept}", accelerator=acc, progress=True)
                train_s = time.perf_counter() - t0
                m = result.sidecar["metrics"]
                report = erasure_report(original, erased, oracle, factor, concept, groups["forget"],
                                        groups["synonyms"], groups["retain"], seeds=args.seeds, progress=False,
                                        **call)
                robust = robustness(args, erased, attack_prompts, judge, score, targets)
                grid += cells(erased, f"{method}-{concept}")
                erased.unload_erasure()
                row = dict(concept=concept, factor=factor, method=method, ua=report["ua"],
                           ua_synonyms=report["ua_synonyms"], ira=report["ira"], cra=report["cra"], kid=report["kid"],
                           kid_std=report.get("kid_std"),
                           asr=robust["asr"], train_s=train_s, state_mib=state_bytes(m, method) / 2**20,
                           storage_kib=read_sidecar(result.path)["storage_bytes"] / 1024,
                           peak_rss_gib=m["peak_memory_bytes"] / 2**30, **rate_fields(report), **robust["columns"])
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                details[f"{method}-{concept}"] = dict(report=report, attack=robust["details"], config=cfg.to_dict(),
                                                      metrics={k: v for k, v in m.items() if k != "losses"},
                                                      loss_first=m["losses"][0], loss_last=m["losses"][-1])
                if after_job is not None:
                    after_job(rows, details)
            grid_rows.append(grid)
            grid_labels.append(f"{concept} ({factor})")
    return rows, details, grid_rows, grid_labels


#: The settings every row of a method depends on besides its own training flags: a row reused from another run
#: (:func:`reuse_rows`) must have been measured with these equal.
PROTOCOL = ("smoke", "model", "classifier", "n_prompts", "seeds", "inference_steps", "guidance", "sample_steps",
            "attack", "attack_prompts", "attack_seeds", "attack_steps", "attack_tokens", "attack_iterations",
            "attack_timesteps", "probes", "probe_candidates", "probe_strengths")
#: Each reusable method's training flags.
TRAINING = {"esd": ("esd_steps", "esd_lr"), "salun": ("salun_steps", "salun_lr", "salun_batch", "salun_images"),
            "advunlearn": ("adv_steps", "adv_lr", "adv_attack", "adv_retain_batch")}
#: Protocol settings a reused run may have measured more of than this run asks: its attacks must begin with this
#: run's (the first fills the tables' attack column), its probes must include this run's. The rows keep the
#: source's extra columns.
MEASURED_MORE = {"attack": lambda there, here: (there or [])[:len(here or [])] == (here or []),
                 "probes": lambda there, here: set(here or []) <= set(there or [])}


#: Settings added after files were written, with the value those files were measured at.
SETTING_DEFAULTS = {"attack_seeds": 1, "doco_adv_weight": 1.0}


def differing_settings(old: dict, args, keys, more: dict | None = None) -> list[str]:
    """The ``keys`` whose value in ``args`` differs from a results file's ``setting`` (compared as the JSON
    stores them: tuples become lists; a setting the file predates at :data:`SETTING_DEFAULTS`); ``more``:
    key -> check(there, here) used instead of equality."""
    same = {**{k: lambda there, here: there == here for k in keys}, **(more or {})}
    return [k for k in keys if not same[k](old.get(k, SETTING_DEFAULTS.get(k)),
                                           json.loads(json.dumps(getattr(args, k, None))))]


def reuse_rows(path: Path, args, methods, rename: dict[str, str] | None = None) -> tuple[list[dict], dict, str]:
    """The rows and details of ``methods`` for every concept of ``args``, from a finished run's JSON (``path``,
    e.g. ``erasure_quality.json``) measured with the same protocol and training settings: the same jobs, prompts
    and seeds give the same figures, so they need not be trained and measured again. The source may have run
    more attacks and probes (:data:`MEASURED_MORE`). ``rename``: a method's name here -> its name in the source
    (``{"esd-full": "esd"}``); the rows and details come back under the names here. ValueError naming every
    setting that differs, or the method / concept missing."""
    rename = rename or {}
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not data.get("complete"):
        raise ValueError(f"{path}: a partial run; its rows cannot be reused")
    old = data["setting"]
    there = {m: rename.get(m, m) for m in methods}
    keys = PROTOCOL + tuple(k for m in methods for k in TRAINING[there[m]])
    diff = [f"{k} ({old.get(k, SETTING_DEFAULTS.get(k))!r} there, {getattr(args, k)!r} here)"
            for k in differing_settings(old, args, keys, MEASURED_MORE)]
    if diff:
        raise ValueError(f"{path} was measured with other settings: {', '.join(diff)}")
    found = {(r["method"], r["concept"]): r for r in data["results"]}
    missing = [f"{there[m]}-{c}" for c in args.concepts for m in methods if (there[m], c) not in found]
    if missing:
        raise ValueError(f"{path} has no row for {', '.join(missing)}")
    rows = [dict(found[there[m], c], method=m) for c in args.concepts for m in methods]
    details = {f"{m}-{c}": data["details"][f"{there[m]}-{c}"] for c in args.concepts for m in methods}
    return rows, details, Path(path).name


def reuse_flag(args, methods, script: str, rename: dict[str, str] | None = None) -> tuple[list, dict, str] | None:
    """``--reuse FILE``'s rows (:func:`reuse_rows`), None without the flag; exit status 2 after a message naming
    the problem when FILE cannot be reused. Call it before the models load: a wrong file fails in a second."""
    if args.reuse is None:
        return None
    try:
        return reuse_rows(args.reuse, args, methods, rename=rename)
    except (OSError, ValueError) as e:
        print(f"{script}: --reuse: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def resumed_jobs(path: Path, args) -> tuple[list[dict], dict, list[dict]]:
    """(rows, details, original rows) of the jobs a killed run of the same settings finished, from its partial
    JSON at ``path`` (nothing if there is none, or if it is a finished run of other settings); SystemExit naming
    the settings that differ when it is a partial run of other settings (its jobs would be lost). Rows it reused
    from another run (``--reuse``) are not among them: they are reused again."""
    if not path.is_file():
        return [], {}, []
    old = json.loads(path.read_text(encoding="utf-8"))
    diff = sorted(differing_settings(old["setting"], args, (set(vars(args)) | set(old["setting"])) - {"resume"}))
    if diff and old.get("complete"):  # a finished run of other settings (e.g. on earlier weights): start afresh
        print(f"--resume: {path.name} is a finished run of other settings ({', '.join(diff)}); starting afresh")
        return [], {}, []
    if diff:
        raise SystemExit(f"--resume: {path.name} was measured with other settings ({', '.join(diff)}); "
                         "run without --resume to start afresh")
    reused = set(old.get("reused", {}).get("methods", []))
    rows = [r for r in old["results"] if r["method"] not in reused]
    originals = old.get("originals", [])
    keys = {f"{r['method']}-{r['concept']}" for r in rows} | {f"original-{o['concept']}" for o in originals}
    return rows, {k: v for k, v in old["details"].items() if k in keys}, originals


def run_and_write(args, models, benchmark: str, config_for, state_bytes, targets_for, grid: Path | None = None,
                  targets_key: str = "targets", originals: bool = False,
                  prior: tuple[list, dict, str] | None = None) -> int:
    """An erasure benchmark's run: the jobs (:func:`run_jobs`; with ``originals`` also the original model's rows),
    the JSON (``benchmarks/results/<benchmark>[_smoke]<tag>.json``, rewritten after every job with
    ``complete=False``): rows with n and intervals, ``stats``, ``targets_for(rows, details, concepts)`` under
    ``targets_key``, the per-image outcomes in ``details``; the before/after ``grid`` (smoke or tagged runs: in
    the temporary folder); then its table as ``benchmarks/report.py`` renders it. ``prior``: (rows, details,
    source file) of methods measured by an earlier run (:func:`reuse_rows`), not run again (their grid images come
    from that run's kept ones).
    With ``args.resume`` the finished jobs of a killed run's partial JSON (:func:`resumed_jobs`) are kept."""
    import report

    original, erased, oracle = models
    name = f"{benchmark}{'_smoke' if args.smoke else ''}{args.tag}.json"
    work = RESULTS / ".work" / Path(name).stem  # each job's grid images, for a resumed run's grid
    kept_rows, kept_details, kept_originals = resumed_jobs(RESULTS / name, args) if args.resume else ([], {}, [])
    if not args.resume and work.exists():
        shutil.rmtree(work)
    first = list(kept_originals) if originals else None
    done = {(r["concept"], r["method"]) for r in kept_rows} | {(o["concept"], "original") for o in kept_originals}

    prior_rows, prior_details, source = prior or ([], {}, None)
    reused = sorted({r["method"] for r in prior_rows})
    order = {(c, m): i for i, (c, m) in enumerate((c, m) for c in args.concepts for m in args.methods)}

    def payload(rows, details, complete, **extra):
        rows = sorted(prior_rows + kept_rows + rows, key=lambda r: order[r["concept"], r["method"]])
        details = {**prior_details, **kept_details, **details}
        out = dict(benchmark=benchmark, smoke=args.smoke, complete=complete, environment=environment(), stats=STATS,
                   setting=dict(vars(args)), results=rows, **({} if first is None else {"originals": first}),
                   **({"reused": dict(methods=reused, source=source)} if reused else {}))
        return dict(out, **{targets_key: targets_for(rows, details, args.concepts)}, **extra, details=details)

    def write_partial(rows, details):  # an interrupted run still leaves the figures of its finished jobs
        write_json(name, payload(rows, details, False))

    rows, details, grid_rows, grid_labels = run_jobs(
        args, original, erased, oracle, config_for, state_bytes, after_job=write_partial, originals=first, done=done,
        cells_dir=work, reused=reused, reused_cells=RESULTS / ".work" / Path(source).stem if source else None)
    extra, shown = {}, ""
    if grid is not None:
        cols = [f"{who}: {what}" for who in ["original", *args.methods] for what in ("forget", "synonym", "retain")]
        path = Path(tempfile.gettempdir()) / f"{grid.stem}{args.tag}.png" if args.smoke or args.tag else grid
        # only the docs' grid has the README's size budget: a smoke or tagged run's keeps its exact pixels
        size = save_grid(grid_rows, grid_labels, cols, path, max_bytes=300_000 if path == grid else None)
        extra["grid"] = dict(path=str(path.relative_to(ROOT)) if path == grid else str(path), bytes=size,
                             columns=cols, rows=grid_labels)
        shown = f" and {path} ({size} bytes)"
    data = payload(rows, details, True, **extra)
    print_table(data["results"])
    print(getattr(report, benchmark)(data))
    print(f"wrote {write_json(name, data)}{shown}")
    return 0


def main(argv=None) -> int:
    ap = protocol_parser(__doc__, methods=("esd", "salun"))
    args, models = parse_and_load(ap, argv, "erasure_quality")
    if models is None:
        return 3
    return run_and_write(args, models, "erasure_quality", job_config, training_state_bytes, quality_targets, GRID,
                         originals=True)


if __name__ == "__main__":
    sys.exit(main())
