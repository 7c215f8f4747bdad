"""The shipped reference model: a small Stable Diffusion pipeline trained on the shapes world.

Trained by ``python -m diffkit.zoo.train_vae`` then ``python -m diffkit.zoo.train_reference`` (see
docs/reference_model.md); the weights live in ``diffkit/zoo/reference/pipeline`` (diffusers layout,
safetensors) and are installed as package data.
"""

from __future__ import annotations

from pathlib import Path

import torch

PIPELINE_DIR = Path(__file__).resolve().parent / "reference" / "pipeline"
#: The classifier-free guidance scale at which the shipped weights meet their bar (DDIM, 25 trailing steps):
#: measured over CFG 3-7.5 by ``python benchmarks/reference_model.py --guidance-sweep 3 4 5 6 7.5``
#: (docs/reference_model.md). Higher scales exaggerate the hexagon's corners into a cross's arms.
REFERENCE_GUIDANCE_SCALE = 3.0

_RETRAIN = (
    "python -m diffkit.zoo.train_vae --out runs/ref && python -m diffkit.zoo.train_reference --out runs/ref "
    "--zero-terminal-snr --min-snr-floor 0.01 (docs/reference_model.md), then copy runs/ref/pipeline to {path}"
)


def reference_path() -> Path:
    """Folder of the shipped reference pipeline; FileNotFoundError (with the retraining command) if absent."""
    if not (PIPELINE_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the diffkit reference model is missing from {PIPELINE_DIR}; reinstall diffkit or retrain it: "
            + _RETRAIN.format(path=PIPELINE_DIR)
        )
    return PIPELINE_DIR


def load_reference_pipeline(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load the reference model as a diffkit ``StableDiffusionPipeline`` (offline; progress bar off).

    64x64 images from latents 8x16x16; prompts use the shapes world's words, e.g. "a red striped star
    on a black background" (see ``diffkit.zoo.shapes.prompt_for``).
    """
    from ..pipelines.loading import DiffusionPipeline

    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype, got {dtype!r}")
    pipe = DiffusionPipeline.from_pretrained(reference_path(), torch_dtype=dtype, local_files_only=True)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe
