"""Batched, seeded image generation for evaluation, sharded across processes when launched with accelerate.

Every image has its own ``torch.Generator`` seeded with its own seed, and diffusers draws each image's
initial latents from its own generator, so image i's noise depends only on seed_i, and its content only on
(prompt_i, seed_i): not on its position in a batch or on the other prompts. The pixels can still differ by
one uint8 level in a few pixels between *batch sizes* (batched convolutions and matmuls round differently);
for a fixed ``batch_size`` they are bit-identical.

Under ``accelerate launch --multi_gpu --num_processes K`` (or ``torchrun --nproc_per_node K``; on a machine
without CUDA the processes talk over gloo) the list is cut into the same batches a single process would
run, the batches are shared out (``PartialState.split_between_processes``) and gathered (``gather_object``),
so every process returns the full, ordered result, bit-identical to a single process with the same
``batch_size``. Each process must hold the pipeline on its own device (``pipe.to(PartialState().device)``).
In a plain ``python`` process it simply runs everything.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .images import to_uint8_images


def _check_inputs(prompts: Sequence[str], seeds: Sequence[int], batch_size: int) -> tuple[list[str], list[int]]:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, got a single string; wrap it in a list")
    prompts, seeds = list(prompts), list(seeds)
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts and seeds must have the same length, got {len(prompts)} and {len(seeds)}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must all be strings")
    if not all(isinstance(s, int | np.integer) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise ValueError("seeds must all be non-negative integers")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return prompts, [int(s) for s in seeds]


def _generate_local(pipe, prompts: list[str], seeds: list[int], batch_size: int, progress: bool,
                    desc: str, call_kwargs: dict) -> np.ndarray:
    device = getattr(pipe, "device", torch.device("cpu"))
    # Generators live on the device the latents are drawn on (CPU generators for CPU / MPS pipelines).
    gen_device = "cuda" if getattr(device, "type", "cpu") == "cuda" else "cpu"
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", disable=not progress):
        batch_p = prompts[start : start + batch_size]
        gens = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds[start : start + batch_size]]
        result = pipe(batch_p, generator=gens, output_type="np", num_images_per_prompt=1, **call_kwargs)
        out.append(to_uint8_images(result.images, value_range=(0, 1)))
    if not out:
        return np.zeros((0, 0, 0, 3), np.uint8)
    return np.concatenate(out)


def _partial_state():
    """accelerate's process state; CPU-only machines (or ``ACCELERATE_USE_CPU``) use the gloo backend."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available())


def generate_images(pipe, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 8, progress: bool = True,
                    desc: str = "generate", **call_kwargs) -> np.ndarray:
    """Generate one image per (prompt, seed) pair; returns uint8 ``(N, H, W, 3)`` in the order given.

    ``call_kwargs`` go to the pipeline call unchanged (``num_inference_steps``, ``guidance_scale``,
    ``guidance=APG(...)``, ``negative_prompt`` ...); ``generator``, ``output_type`` and
    ``num_images_per_prompt`` are set here. The pipeline's own progress bar is left as configured.
    """
    prompts, seeds = _check_inputs(prompts, seeds, batch_size)
    for key in ("generator", "output_type", "num_images_per_prompt", "latents"):
        if key in call_kwargs:
            raise ValueError(f"{key!r} is set by generate_images (one seeded generator per image); do not pass it")
    if not prompts:
        raise ValueError("prompts is empty: nothing to generate")
    state = _partial_state()
    if state.num_processes == 1:
        return _generate_local(pipe, prompts, seeds, batch_size, progress, desc, call_kwargs)

    from accelerate.utils import gather_object

    indices = list(range(len(prompts)))
    # Share whole batches (the ones a single process would run), so each image is computed in the same
    # batch, with the same rounding, however many processes there are.
    batches = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    with state.split_between_processes(batches) as my_batches:
        mine = [i for batch in my_batches for i in batch]
        if mine:
            local = _generate_local(pipe, [prompts[i] for i in mine], [seeds[i] for i in mine], batch_size,
                                    progress and state.is_main_process, f"{desc} [rank {state.process_index}]",
                                    call_kwargs)
        else:  # more processes than batches: this one idles
            local = []
    # gather_object concatenates the per-process lists in rank order, on every process.
    gathered = gather_object([(i, local[k]) for k, i in enumerate(mine)])
    order = sorted(gathered, key=lambda item: item[0])
    if [i for i, _ in order] != indices:
        raise RuntimeError(f"sharded generation returned {len(order)} images for {len(indices)} prompts")
    return np.stack([img for _, img in order])
