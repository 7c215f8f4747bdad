"""``diffkit prune``: end to end on a tiny zoo model, re-binarization from logits, and every error path."""

from __future__ import annotations

import json
import re

import pytest
import torch

import diffkit
from diffkit.cli import main
from diffkit.pruning import find_units, unet_parameters
from diffkit.zoo import build_tiny_pipeline

BASE = ["prune", "--model", "zoo:sd15", "a red star", "a blue circle", "--steps", "2", "--epochs", "1", "--quiet"]


def test_prune_learns_writes_a_loadable_spec_and_rebinarizes(tmp_path, capsys):
    out = tmp_path / "spec"
    rc = main([*BASE, "--keep-heads", "0.5", "--keep-ffn", "0.75", "--keep-channels", "0.5", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["checkpoint", "logits.safetensors", "pruned.safetensors", "spec.json"]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["config"]["keep"] == {"heads": 0.5, "ffn": 0.75, "channels": 0.5}
    assert spec["config"]["learning"]["num_inference_steps"] == 2
    frac = spec["stats"]["kept_fraction"]
    assert frac["heads"] == pytest.approx(0.5, abs=0.1) and frac["ffn"] == pytest.approx(0.75, abs=0.1)  # rounding
    pipe = diffkit.to_diffkit(build_tiny_pipeline("sd15"))
    full = unet_parameters(pipe.unet)
    pipe.load_pruning(out)
    assert unet_parameters(pipe.unet) == spec["stats"]["params_after"] < full
    for name, kept in spec["kept"].items():
        width = spec["units"][name]["width"]
        assert (len(kept) * width) % 8 == 0 or len(kept) == spec["units"][name]["size"]

    # re-binarize the learned logits for another budget, without learning
    out2 = tmp_path / "spec30"
    rc = main(["prune", "--model", "zoo:sd15", "--logits", str(out / "logits.safetensors"),
               "--target-reduction", "0.3", "--out", str(out2)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "U-Net parameters" in printed and "MACs" in printed
    stats = json.loads((out2 / "spec.json").read_text())["stats"]
    assert stats["param_reduction"] >= 0.3 and stats["macs_after"] < stats["macs_before"]


def test_prune_resumes_from_its_checkpoint(tmp_path):
    out = tmp_path / "spec"
    one_prompt = [a for a in BASE if a != "a blue circle"]
    assert main([*one_prompt, "--target-reduction", "0.1", "--out", str(out)]) == 0
    state = json.loads((out / "checkpoint" / "masks.json").read_text())
    assert state["step"] == 1
    # two more epochs: resumes at step 1 and runs to 3
    argv = [*one_prompt, "--target-reduction", "0.1", "--out", str(out)]
    argv[argv.index("--epochs") + 1] = "3"
    assert main(argv) == 0
    state = json.loads((out / "checkpoint" / "masks.json").read_text())
    assert [h["step"] for h in state["history"]] == [1, 2, 3]


@pytest.mark.parametrize("extra,msg", [
    (["--keep-heads", "0.5", "--target-reduction", "0.2"], "either --keep-heads/--keep-ffn/--keep-channels or"),
    ([], "say how much to prune"),
    (["--keep-ffn", "1.5"], r"--keep-ffn must be in \[0, 1\], got 1.5"),
    (["--target-reduction", "1.0"], r"--target-reduction must be in \[0, 1\), got 1.0"),
    (["--target-reduction", "0.2", "--kinds", "heads,neurons"], "--kinds must be a comma list of heads, ffn, channels"),
    (["--keep-channels", "0.5", "--kinds", "heads,ffn"], "--keep-channels given but channels is not in --kinds"),
    (["--target-reduction", "0.2", "--scheduler", "dpm"], "--scheduler must be one of keep, ddim, euler"),
    (["--target-reduction", "0.2", "--multiple", "0"], "--multiple must be a positive integer, got 0"),
    (["--target-reduction", "0.2", "--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--target-reduction", "0.2", "--logits", "/nonexistent/l.safetensors"],
     "--logits file '/nonexistent/l.safetensors' does not exist"),
    (["--target-reduction", "0.2", "--penalty", "l2"], "penalty must be one of"),
    (["--target-reduction", "0.2", "--model", "/nonexistent/model"], "model path '/nonexistent/model' does not exist"),
])
def test_prune_errors(tmp_path, capsys, extra, msg):
    rc = main([*BASE, "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("diffkit: error: ") and err.count("\n") == 1
    assert re.search(msg, err), err


def test_prune_needs_prompts_and_matching_logits(tmp_path, capsys):
    rc = main(["prune", "--model", "zoo:sd15", "--target-reduction", "0.2", "--out", str(tmp_path / "o")])
    assert rc == 2 and "no prompts" in capsys.readouterr().err
    from safetensors.torch import save_file

    save_file({"nothing": torch.zeros(2)}, str(tmp_path / "l.safetensors"))
    rc = main(["prune", "--model", "zoo:sd15", "--logits", str(tmp_path / "l.safetensors"), "--target-reduction",
               "0.2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    unit = find_units(build_tiny_pipeline("sd15").unet)[0].name
    assert rc == 2 and f"has no logits for module {unit}" in err


def _no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded for a refused command line")

    monkeypatch.setattr("diffkit.cli.load_pipeline", fail)


def test_prune_truncated_logits_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    _no_load(monkeypatch)
    path = tmp_path / "l.safetensors"
    save_file({"x": torch.zeros(64)}, str(path))
    path.write_bytes(path.read_bytes()[:40])
    rc = main(["prune", "--model", "zoo:sd15", "--logits", str(path), "--target-reduction", "0.2",
               "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"diffkit: error: cannot read --logits {str(path)!r}: ") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("extra, msg", [
    (["--guidance-scale", "-1"], "--guidance-scale must be >= 0, got -1.0"),
    (["--height", "-64"], "--height must be a multiple of 8 >= 8, got -64"),
    (["--height", "7"], "--height must be a multiple of 8 >= 8, got 7"),
    (["--width=-8"], "--width must be a multiple of 8 >= 8, got -8"),
    (["--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*63\), got -1"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got 'nan'"),
    (["--keep-heads", "inf"], "--keep-heads must be a finite number in"),
    (["--out", __file__], "--out must be a folder, but .* is a file"),
])
def test_prune_refuses_before_loading(tmp_path, capsys, monkeypatch, extra, msg):
    _no_load(monkeypatch)
    rc = main([*BASE, "--target-reduction", "0.2", "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and re.search("^diffkit: error: " + msg, err), err
    assert not (tmp_path / "o").exists()
