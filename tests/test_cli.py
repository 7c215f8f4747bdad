"""The `diffkit generate` command: outputs, help, and every error path (message + exit status)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from diffkit.cli import build_parser, main


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_writes_pngs_and_json_lines(tiny_paths, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na blue circle\n\n")
    rc, out, _ = run(capsys, "generate", "a red star", "--prompts-file", str(prompts), "--model",
                     str(tiny_paths["sd15"]), "--steps", "2", "--seed", "5", "--out", str(tmp_path / "o"))
    assert rc == 0 and "wrote 2 image(s)" in out
    records = [json.loads(line) for line in (tmp_path / "o" / "images.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red star", "a blue circle"]
    assert [r["seed"] for r in records] == [5, 6]
    assert records[0]["steps"] == 2 and records[0]["guidance_scale"] == 7.5 and records[0]["seconds"] > 0
    assert Image.open(tmp_path / "o" / records[1]["file"]).size == (64, 64)
    assert not list((tmp_path / "o").glob("*.tmp"))


def test_generate_with_guidance_and_deepcache(tiny_paths, tmp_path, capsys):
    """--guidance / --deepcache reach the pipeline (other images than plain CFG) and the JSON lines say so."""
    base = ["generate", "a red star", "--model", str(tiny_paths["sd15"]), "--steps", "4", "--quiet"]
    runs = {"cfg": [], "apg": ["--guidance", "apg", "--guidance-scale", "5"],
            "cfgpp": ["--guidance", "cfgpp", "--guidance-scale", "0.6"], "deepcache": ["--deepcache", "2"]}
    png = {}
    for name, extra in runs.items():
        rc, _, err = run(capsys, *base, "--out", str(tmp_path / name), *extra)
        assert rc == 0, err
        png[name] = (tmp_path / name / "00000_seed0.png").read_bytes()
        record = json.loads((tmp_path / name / "images.jsonl").read_text())
        assert record["guidance"] == (name if name in ("apg", "cfgpp") else "cfg")
        assert record.get("deepcache") == ({"interval": 2, "branch": 0} if name == "deepcache" else None)
    assert len(set(png.values())) == 4


def test_generate_with_pruning_and_erasure(tiny_paths, load_tiny, tmp_path, capsys):
    """--pruning loads a spec folder and --erasure an artifact before generating; the JSON lines name them."""
    from diffkit.erasure import ErasureConfig, erase
    from diffkit.pruning import find_units, save_pruning

    pipe = load_tiny("sd15")
    save_pruning(tmp_path / "spec", pipe.unet, {u.name: list(range(0, u.size, 2)) for u in find_units(pipe.unet)},
                 macs=False)
    artifact = erase(load_tiny("sd15"), ErasureConfig(concept="red", steps=2, sample_steps=2, lr=1e-2),
                     tmp_path / "erase", progress=False).path
    base = ["generate", "a red star", "--model", str(tiny_paths["sd15"]), "--steps", "3", "--quiet"]
    png = {}
    for name, extra in {"plain": [], "pruning": ["--pruning", str(tmp_path / "spec")],
                        "erasure": ["--erasure", str(artifact)]}.items():
        rc, _, err = run(capsys, *base, "--out", str(tmp_path / name), *extra)
        assert rc == 0, err
        png[name] = (tmp_path / name / "00000_seed0.png").read_bytes()
        record = json.loads((tmp_path / name / "images.jsonl").read_text())
        assert record.get(name) == (extra[1] if extra else None)
    assert len(set(png.values())) == 3


def test_generate_is_deterministic_by_seed(tiny_paths, tmp_path, capsys):
    for name in ("a", "b"):
        run(capsys, "generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "2", "--out",
            str(tmp_path / name), "--quiet")
    assert (tmp_path / "a" / "00000_seed0.png").read_bytes() == (tmp_path / "b" / "00000_seed0.png").read_bytes()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "x", "--steps", "0"], "--steps must be a positive integer, got 0"),
        (["generate", "x", "--steps", "-3"], "--steps must be a positive integer, got -3"),
        (["generate", "x", "--guidance-scale", "-1"], "--guidance-scale must be >= 0, got -1.0"),
        (["generate", "x", "--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
        (["generate", "x", "--prompts-file", "/no/such/file.txt"],
         "cannot read prompts file '/no/such/file.txt': No such file or directory"),
        (["generate"], "no prompts: give PROMPT arguments or --prompts-file"),
        (["generate", "x", "--device", "tpu"], "unknown device 'tpu'; use one of cpu, cuda, mps"),
        (["generate", "x", "--dtype", "int8"], "unknown dtype 'int8'; use one of"),
        (["generate", "x", "--deepcache", "-1"], "--deepcache must be >= 0 (0: off), got -1"),
        (["generate", "x", "--deepcache-branch", "1"], "--deepcache-branch needs --deepcache N (DeepCache is off)"),
        (["generate", "x", "--guidance", "cfgpp"], "--guidance cfgpp: scale must be in [0, 1], got 7.5"),
        (["generate", "x", "--model", "zoo:sd15", "--pruning", "/no/such"],
         "cannot load pruning spec '/no/such': no pruning spec at /no/such (missing spec.json)"),
        (["generate", "x", "--model", "zoo:sd15", "--erasure", "/no/such"],
         "cannot load erasure artifact '/no/such': erasure artifact '/no/such' is not a directory"),
        (["generate", "x", "--model", "zoo:sd15", "--deepcache", "2", "--deepcache-branch", "9"],
         "--deepcache: branch must be in [0, 8] for this U-Net (9 skip connections), got 9"),
    ],
)
def test_generate_errors(capsys, argv, message):
    rc, out, err = run(capsys, *argv)
    assert rc == 2
    assert err.startswith("diffkit: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_cuda_requested_without_cuda(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    rc, _, err = run(capsys, "generate", "x", "--device", "cuda")
    assert rc == 2 and "device 'cuda' requested but CUDA is not available" in err


def test_unreadable_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, "generate", "x", "--model", str(tmp_path / "empty"))
    assert rc == 2 and err.startswith(f"diffkit: error: could not load model '{tmp_path / 'empty'}'")


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--prompts-file", "--seed", "--steps", "--guidance-scale", "--out", "--device", "--dtype"):
        assert flag in text
    assert main([]) == 2  # no command: prints help, exits 2
    assert "generate" in capsys.readouterr().out
    names = set(build_parser()._subparsers._group_actions[0].choices)
    assert "generate" in names


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "diffkit.cli", "generate", "x", "--steps", "0"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "diffkit: error: --steps must be a positive integer, got 0"
