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
        (["generate", "x", "--guidance", "cfgpp", "--guidance-scale", "2"],
         "--guidance-scale must be in [0, 1] with --guidance cfgpp (CFG++'s lambda), got 2.0"),
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


# --- hardening: everything below is refused before a model loads, or keeps the outputs consistent ---


@pytest.fixture
def no_load(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a model was loaded for a refused command line")

    monkeypatch.setattr("diffkit.cli.load_pipeline", fail)


def test_prompts_file_that_is_not_utf8(tmp_path, capsys, no_load):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("a caf\u00e9 sign\n".encode("latin-1"))
    for argv in (["generate"], ["prune", "--target-reduction", "0.2"]):
        rc, _, err = run(capsys, *argv, "--prompts-file", str(bad), "--out", str(tmp_path / "o"))
        assert rc == 2
        assert err == f"diffkit: error: cannot read prompts file {str(bad)!r}: not UTF-8 text (byte 0xe9 at offset 5)\n"
    assert not (tmp_path / "o").exists()


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_safetensors_is_a_one_line_error(tiny_paths, load_tiny, tmp_path, capsys):
    from diffkit.erasure import ErasureConfig, erase
    from diffkit.pruning import find_units, save_pruning

    pipe = load_tiny("sd15")
    save_pruning(tmp_path / "spec", pipe.unet, {u.name: list(range(0, u.size, 2)) for u in find_units(pipe.unet)},
                 macs=False)
    artifact = erase(pipe, ErasureConfig(concept="red", steps=1, sample_steps=1), tmp_path / "erase",
                     progress=False).path
    _truncate(tmp_path / "spec" / "pruned.safetensors")
    _truncate(next(artifact.glob("*.safetensors")))
    capsys.readouterr()
    base = ["generate", "a red star", "--model", str(tiny_paths["sd15"]), "--steps", "1", "--quiet"]
    for flag, path, what in (("--pruning", tmp_path / "spec", "pruning spec"),
                             ("--erasure", artifact, "erasure artifact")):
        rc, _, err = run(capsys, *base, flag, str(path), "--out", str(tmp_path / "o"))
        assert rc == 2 and err.startswith(f"diffkit: error: cannot load {what} {str(path)!r}: "), err
        assert err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_attach_features_reports_raw_safetensor_errors(tmp_path):
    """Whatever the loader raises for a corrupt file (safetensors' own error, OSError, ValueError): one line."""
    from types import SimpleNamespace

    from safetensors import SafetensorError

    from diffkit.cli import CLIError, attach_features

    for error in (SafetensorError("Error while deserializing header: incomplete metadata"), OSError("boom"),
                  ValueError("not an artifact\nsecond line")):
        def load(path, error=error):
            raise error

        pipe = SimpleNamespace(load_pruning=load, load_erasure=load)
        args = SimpleNamespace(pruning=None, erasure="x", deepcache=0, deepcache_branch=0)
        with pytest.raises(CLIError, match=r"^cannot load erasure artifact 'x': [^\n]+$"):
            attach_features(pipe, args)


@pytest.mark.parametrize("extra", [["--guidance-scale", "nan"], ["--guidance-scale", "inf"], ["--seed", "-1"],
                                   ["--seed", "18446744073709551616"], ["--steps", "100000"], ["--out", "FILE"]])
def test_refused_before_loading_and_writing(tmp_path, capsys, no_load, monkeypatch, extra):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "FILE").write_text("x")
    rc, _, err = run(capsys, "generate", "x", *extra)
    assert rc == 2 and err.startswith(f"diffkit: error: {extra[0]} must be ") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]  # no outputs/, no images.jsonl


def test_steps_beyond_the_schedulers_timesteps(tiny_paths, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_paths["sd15"], model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 50}))
    rc, _, err = run(capsys, "generate", "x", "--model", str(model), "--steps", "60", "--quiet",
                     "--out", str(tmp_path / "o"))
    assert rc == 2
    assert err == "diffkit: error: --steps must be at most 50 (this scheduler's num_train_timesteps), got 60\n"
    assert not (tmp_path / "o").exists()


def test_rerun_rewrites_images_jsonl(tiny_paths, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["generate", "--model", str(tiny_paths["sd15"]), "--steps", "1", "--quiet", "--out", str(out)]
    assert run(capsys, *base, "first", "second", "third")[0] == 0
    (out / "00002_seed2.png").unlink()  # a file removed by hand: its line goes too
    assert run(capsys, *base, "again")[0] == 0  # overwrites 00000_seed0.png
    records = [json.loads(line) for line in (out / "images.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in records] == [("00001_seed1.png", "second"), ("00000_seed0.png", "again")]
    assert sorted(p.name for p in out.iterdir()) == ["00000_seed0.png", "00001_seed1.png", "images.jsonl"]
    assert run(capsys, *base, "x", "--seed", "7")[0] == 0  # other names: the old lines stay
    files = [json.loads(line)["file"] for line in (out / "images.jsonl").read_text().splitlines()]
    assert files == ["00001_seed1.png", "00000_seed0.png", "00000_seed7.png"]
    assert all((out / f).is_file() for f in files)


@pytest.mark.parametrize("kind, scale", [("cfg", 7.5), ("apg", 15.0), ("cfgpp", 0.6)])
def test_guidance_scale_default_follows_the_guidance(tiny_paths, tmp_path, capsys, kind, scale):
    rc, _, err = run(capsys, "generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "2", "--quiet",
                     "--guidance", kind, "--out", str(tmp_path / "o"))
    assert rc == 0, err
    record = json.loads((tmp_path / "o" / "images.jsonl").read_text())
    assert record["guidance"] == kind and record["guidance_scale"] == scale


def test_quiet_hides_the_loading_bars(tiny_paths, tmp_path, capfd):
    from diffusers.utils import logging as dlogging

    assert main(["generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "o")]) == 0
    captured = capfd.readouterr()
    assert captured.out == "" and "Loading" not in captured.err and "%|" not in captured.err, captured.err
    assert dlogging.is_progress_bar_enabled()  # restored after the command


def test_float16_on_cpu_warns_once(tiny_paths, tmp_path, capfd, monkeypatch):
    monkeypatch.setattr("diffkit.cli._WARNED", set())
    assert main(["generate", "x", "--model", str(tiny_paths["sd15"]), "--steps", "1", "--quiet", "--dtype",
                 "float16", "--out", str(tmp_path / "o")]) == 0
    err = capfd.readouterr().err
    assert err.count("diffkit: warning: --dtype float16 on cpu") == 1
    assert "Pipelines loaded with" not in err and "should be kept in float32" not in err, err


def test_version(capsys):
    import diffkit

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"diffkit {diffkit.__version__}"


def test_usage_errors_are_one_line(capsys):
    for argv, message in ((["generate", "x", "--guidance", "nope"], "--guidance must be one of cfg, apg, cfgpp, pag"),
                          (["nosuch"], "COMMAND: invalid choice: 'nosuch'"),
                          (["generate", "--steps"], "--steps: expected one argument")):
        rc, out, err = run(capsys, *argv)
        assert rc == 2 and out == "" and err.startswith("diffkit: error: ") and message in err, err
        assert err.count("\n") == 1
