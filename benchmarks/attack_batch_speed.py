"""UnlearnDiffAtk with its prompts in batches against one prompt at a time, interleaved in one run (CPU).

The baseline is the reference code's way: ``batch_size=1`` (one U-Net call per prompt per optimisation step).
The batched arms attack ``B`` prompts per U-Net call (``unlearndiffatk_batch``). The work is held equal: the
judge never reports the concept, so every prompt runs every step (early stop would change a batch's size
as prompts leave it). Each repeat times every arm once, alternating their order; the figure is the median
over repeats of the per-repeat ratio ``time(batch 1) / time(batch B)`` with a 95% bootstrap interval. The
run also checks that every arm gives each prompt the same adversarial tokens.

Setting: the reference model on 2 threads, the first forget prompts of "star" (``shapes_erasure_prompts``),
targets made by the model itself, 5 tokens, 10 iterations x 2 timesteps, 15-step generations.

    python benchmarks/attack_batch_speed.py            # ~4 min -> results/attack_batch_speed.json
    python benchmarks/attack_batch_speed.py --smoke    # tiny random pipeline: logic only
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, interleaved, print_table, write_json  # noqa: E402

from diffkit.evaluation import bootstrap_interval  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random pipeline, two repeats (logic check)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16], help="batch sizes against batch 1")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    import diffkit
    from diffkit.erasure.unlearndiffatk import UnlearnDiffAtkConfig, unlearndiffatk_batch
    from diffkit.evaluation import shapes_erasure_prompts
    from diffkit.zoo import build_tiny_pipeline, load_reference_pipeline
    from diffkit.zoo.shapes import vocabulary

    if args.smoke:
        args.prompts, args.batches, args.repeats = 4, [2, 4], 2
        pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15", words=vocabulary()))
    else:
        pipe = load_reference_pipeline("cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = [s.prompt for s in shapes_erasure_prompts("star", n=args.prompts, seed=0)["forget"][:args.prompts]]
    gens = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    with torch.no_grad():
        targets = pipe(prompts, generator=gens, num_inference_steps=15, output_type="latent").images.float()
    steps = dict(prefix_tokens=5, iterations=2 if args.smoke else 10, timesteps=2,
                 num_inference_steps=2 if args.smoke else 15)
    tokens = {}

    def arm(b):
        def run():
            results = unlearndiffatk_batch(pipe, prompts, lambda im: [False] * len(im), targets,
                                           UnlearnDiffAtkConfig(batch_size=b, **steps))
            tokens[b] = [r.adversarial_ids for r in results]
        return run

    sizes = [1, *args.batches]
    times = interleaved({b: arm(b) for b in sizes}, "cpu", args.repeats, warmup=0)
    rows = []
    for b in args.batches:
        ratios = [one / many for one, many in zip(times[1], times[b])]
        lo, hi = bootstrap_interval(ratios, statistics.median)
        rows.append(dict(batch_size=b, baseline="batch_size=1", n=len(ratios), speedup=statistics.median(ratios),
                         ci95=[lo, hi], s_per_prompt=statistics.median(times[b]) / len(prompts),
                         baseline_s_per_prompt=statistics.median(times[1]) / len(prompts),
                         same_tokens=tokens[b] == tokens[1]))
    print_table(rows)
    payload = dict(benchmark="attack_batch_speed", smoke=args.smoke, environment=environment(),
                   setting=dict(prompts=len(prompts), repeats=args.repeats, **steps), results=rows,
                   raw_seconds={str(b): t for b, t in times.items()})
    print(f"wrote {write_json('attack_batch_speed_smoke.json' if args.smoke else 'attack_batch_speed.json', payload)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
