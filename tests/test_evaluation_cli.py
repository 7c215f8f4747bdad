"""``diffkit eval``: every bad input is a one-line error with exit status 2; a tiny run writes its JSON."""

from __future__ import annotations

import json

import pytest

from diffkit.cli import main


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n", "0"], "--n must be a positive integer, got 0"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--guidance-scale", "-2"], "--guidance-scale must be >= 0, got -2.0"),
        (["--words", "fancy"], "--words must be one of canonical, eval_only, got 'fancy'"),
        (["--erased", "x"], "--erased needs --concept"),
        (["--factor", "color"], "--factor needs --concept"),
        (["--concept", "maroon"], "--concept: concept must be a canonical word of the shapes world"),
        (["--concept", "red", "--factor", "object"], "--factor 'object' does not match --concept 'red', which is a"),
        (["--concept", "gray"], "--concept 'gray' is a background; only objects, colors and styles can be erased"),
        (["--concept", "red", "--erased", "/no/such/dir"], "erasure artifact '/no/such/dir' is not a directory"),
        (["--out", "/no/such/dir/r.json"], "--out folder '/no/such/dir' does not exist"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--classifier", "/no/such/oracle"], "has no config.json; train one with"),
        (["--model", "/no/such/model"], "model path '/no/such/model' does not exist"),
    ],
)
def test_eval_bad_input(argv, message, capsys):
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffkit: error: ") and message in err and err.count("\n") == 1


def test_eval_erased_needs_load_erasure(tmp_path, capsys, monkeypatch):
    import diffkit.pipelines.classes as classes

    artifact = tmp_path / "erased"
    artifact.mkdir()
    # a pipeline class without load_erasure (as before the erasure feature existed) -> a clear error
    owners = {k for cls in classes.PIPELINES.values() for k in cls.__mro__ if "load_erasure" in vars(k)}
    for klass in owners:
        monkeypatch.delattr(klass, "load_erasure")
    code = main(["eval", "--model", "zoo:sd15", "--concept", "red", "--erased", str(artifact), "--quiet"])
    assert code == 2
    assert "has no load_erasure: the erasure feature of diffkit is not available" in capsys.readouterr().err


def test_eval_erased_artifact_that_does_not_load(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code = main(["eval", "--model", "zoo:sd15", "--concept", "red", "--erased", str(empty), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"could not load erasure {str(empty)!r}: " in err and "is not an erasure artifact" in err


def test_eval_accuracy_run_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["eval", "--model", "zoo:sd15", "--n", "4", "--seeds-per-prompt", "2", "--steps", "2",
                 "--batch-size", "4", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "accuracy" and report["n_images"] == 4 and report["steps"] == 2
    assert set(report["accuracy"]) == {"object", "color", "style"}
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
    assert "object" in capsys.readouterr().out


def test_eval_erasure_baseline_run(tmp_path):
    out = tmp_path / "e.json"
    code = main(["eval", "--model", "zoo:sd15", "--concept", "red", "--n", "2", "--seeds-per-prompt", "1",
                 "--steps", "2", "--out", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["kind"] == "erasure" and report["factor"] == "color" and report["erased"] is None
    assert report["n_images"] == {"forget": 2, "synonyms": 2, "retain": 2}
    # without --erased the "erased" model is the original: identical images, so equal metrics
    for key in ("ua", "ua_synonyms", "ira", "cra"):
        assert report[key] == report["original"][key]
    assert report["identical_retain_images"] == 2 and report["psnr_retain"] is None
