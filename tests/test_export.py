"""``diffkit export``: a full-rank erasure artifact as plain diffusers components (tiny SD 1.5).

The exported ``unet/`` and ``text_encoder/`` load in a process that imports only diffusers and
transformers and compute bit for bit what diffkit's ``load_erasure`` computes; the base model is checked
first, pruning specs are refused with the reason, and the output folder appears whole or not at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from _erasure_artifacts import make_artifact
from safetensors.torch import load_file

import diffkit
from diffkit.artifacts import BaseModelMismatch
from diffkit.cli import main
from diffkit.erasure.export import EXPORT_FILE, export_erasure
from diffkit.pruning import find_units, save_pruning
from diffkit.zoo import save_tiny_pipeline

STEPS = 4


def latents(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red star", num_inference_steps=STEPS, generator=g, output_type="latent").images


def state(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


@pytest.fixture(scope="module")
def arts(tmp_path_factory, tiny_paths):
    root = tmp_path_factory.mktemp("export")
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    unet_names = [f"unet.{n}.{k}.weight" for n in attn2 for k in ("to_k", "to_v")]
    te_names = [f"text_encoder.{n}" for n, _ in pipe.text_encoder.named_parameters() if "layers.0.mlp" in n]
    both = make_artifact(pipe, root / "both", unet_names + te_names, seed=1)
    make_artifact(pipe, root / "unet-only", unet_names, seed=2)
    kept = {u.name: list(range(0, u.size, 2)) for u in find_units(pipe.unet)}
    save_pruning(root / "spec", pipe.unet, kept, macs=False)
    return dict(root=root, both=root / "both", unet_only=root / "unet-only", spec=root / "spec", trained=both)


NO_DIFFKIT = textwrap.dedent("""
    import sys, torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel
    from safetensors.torch import save_file
    base, exported, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))  # the parent's: the same float reductions, bit for bit
    parts = {}
    import os
    if os.path.isdir(os.path.join(exported, "unet")):
        parts["unet"] = UNet2DConditionModel.from_pretrained(os.path.join(exported, "unet"))
    if os.path.isdir(os.path.join(exported, "text_encoder")):
        parts["text_encoder"] = CLIPTextModel.from_pretrained(os.path.join(exported, "text_encoder"))
    pipe = StableDiffusionPipeline.from_pretrained(base, **parts)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    lat = pipe("a red star", num_inference_steps=steps, generator=g, output_type="latent").images
    assert "diffkit" not in sys.modules, sorted(m for m in sys.modules if m.startswith("diffkit"))
    save_file({"latents": lat.contiguous(), **{f"{c}.{k}": v.contiguous() for c, m in parts.items()
                                                for k, v in m.state_dict().items()}}, out)
""")


def run_without_diffkit(base, exported, out):
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", NO_DIFFKIT, str(base), str(exported), str(out), str(STEPS),
                           str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(out.parent))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


def test_exported_components_load_without_diffkit_and_equal_load_erasure(tiny_paths, arts, tmp_path):
    out = tmp_path / "exported"
    assert main(["export", str(arts["both"]), "--out", str(out), "--model", str(tiny_paths["sd15"]), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(["unet", "text_encoder", EXPORT_FILE])
    got = run_without_diffkit(tiny_paths["sd15"], out, tmp_path / "plain.safetensors")

    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.set_progress_bar_config(disable=True)
    base = latents(pipe)
    pipe.load_erasure(arts["both"])
    erased = latents(pipe)
    assert not torch.equal(erased, base)  # the artifact changes the output
    assert torch.equal(got["latents"], erased)  # plain diffusers computes what load_erasure computes, bit for bit
    live = state(pipe)
    exported = {k: v for k, v in got.items() if k != "latents"}
    assert exported.keys() == live.keys()
    assert all(torch.equal(exported[k], live[k]) for k in live)
    for q, v in arts["trained"].items():  # the artifact's values are the exported ones
        assert torch.equal(exported[q], v)


def test_a_unet_only_artifact_exports_only_the_unet_and_the_pipeline_is_left_as_it_was(tiny_paths, arts, tmp_path):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.set_progress_bar_config(disable=True)
    before, ref = state(pipe), latents(pipe)
    out = export_erasure(pipe, arts["unet_only"], tmp_path / "e")
    assert sorted(p.name for p in out.iterdir()) == ["diffkit_export.json", "unet"]
    assert len(pipe.features) == 0 and torch.equal(latents(pipe), ref)
    assert all(torch.equal(v, before[k]) for k, v in state(pipe).items())
    got = run_without_diffkit(tiny_paths["sd15"], out, tmp_path / "plain.safetensors")
    pipe.load_erasure(arts["unet_only"])
    assert torch.equal(got["latents"], latents(pipe))


def test_a_pruning_spec_is_refused_with_the_reason(tiny_paths, arts, tmp_path, capsys):
    out = tmp_path / "x"
    assert main(["export", str(arts["spec"]), "--out", str(out), "--model", str(tiny_paths["sd15"])]) == 2
    err = capsys.readouterr().err
    assert "is a pruning spec: pruning specs stay diffkit-only, because their slimmed widths do not fit a diffusers " \
           "config" in err
    assert not out.exists()


def test_another_base_model_is_refused_and_nothing_is_written(arts, tmp_path, capsys):
    other = save_tiny_pipeline(tmp_path / "other", "sd15", seed=1)
    out = tmp_path / "x"
    assert main(["export", str(arts["both"]), "--out", str(out), "--model", str(other)]) == 2
    assert "was made for a different base model" in capsys.readouterr().err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["other"]

    pipe = diffkit.DiffusionPipeline.from_pretrained(other)
    with pytest.raises(BaseModelMismatch, match="different base model"):
        export_erasure(pipe, arts["both"], out)
    assert len(pipe.features) == 0


def test_output_is_atomic_a_failure_half_way_leaves_nothing(tiny_paths, arts, tmp_path, monkeypatch):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    before = state(pipe)
    calls = []
    real = type(pipe.text_encoder).save_pretrained

    def failing(self, *a, **k):  # the U-Net is written, then the text encoder fails
        calls.append(1)
        raise OSError("disk full")

    monkeypatch.setattr(type(pipe.text_encoder), "save_pretrained", failing)
    with pytest.raises(OSError, match="disk full"):
        export_erasure(pipe, arts["both"], tmp_path / "out")
    monkeypatch.setattr(type(pipe.text_encoder), "save_pretrained", real)
    assert calls == [1] and list(tmp_path.iterdir()) == []  # no output, no temporary folder
    assert len(pipe.features) == 0 and all(torch.equal(v, before[k]) for k, v in state(pipe).items())


def test_a_non_empty_out_and_an_unreadable_artifact_are_refused_before_the_model_loads(arts, tmp_path, capsys,
                                                                                       monkeypatch):
    import diffkit.cli as cli

    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: pytest.fail("the model must not load"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", str(arts["both"]), "--out", str(full)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "mine"
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_export_refuses_a_pipeline_with_features(tiny_paths, arts, tmp_path):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.enable_deepcache(interval=2)
    with pytest.raises(ValueError, match="export needs the base model without features"):
        export_erasure(pipe, arts["both"], tmp_path / "o")
    assert not (tmp_path / "o").exists()
