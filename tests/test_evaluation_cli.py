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
        (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
        (["--guidance-scale", "-2"], "--guidance-scale must be >= 0, got -2.0"),
        (["--words", "fancy"], "--words must be one of canonical, eval_only, got 'fancy'"),
        (["--erased", "x"], "--erased needs --concept"),
        (["--factor", "color"], "--factor needs --concept"),
        (["--concept", "maroon"], "--concept: concept must be a canonical word of the shapes world"),
        (["--concept", "red", "--factor", "object"], "--factor 'object' does not match --concept 'red', which is a"),
        (["--concept", "gray"], "--concept 'gray' is a background; only objects, colors and styles can be erased"),
        (["--concept", "red", "--erased", "/no/such/dir"], "erasure artifact '/no/such/dir' is not a directory"),
        (["--out", "/no/such/dir/r.json"], "--out must be in an existing folder; '/no/such/dir' does not exist"),
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


def _no_load(monkeypatch):
    monkeypatch.setattr("diffkit.cli.load_pipeline", lambda *a, **k: pytest.fail("a model was loaded"))


def test_eval_out_folder_is_refused_before_the_run(tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    assert main(["eval", "--out", "reports"]) == 2
    assert capsys.readouterr().err == "diffkit: error: --out must be a file path, but 'reports' is a folder\n"
    assert [p.name for p in tmp_path.iterdir()] == ["reports"] and not list((tmp_path / "reports").iterdir())


def test_write_json_atomic_leaves_no_temp_file(tmp_path):
    from diffkit.evaluation.cli import write_json_atomic

    (tmp_path / "d").mkdir()
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "d", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
    write_json_atomic(tmp_path / "r.json", {"a": float("nan")})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None}


@pytest.mark.parametrize("argv, message", [
    (["--guidance-scale", "nan"], "--guidance-scale must be a finite number >= 0, got 'nan'"),
    (["--guidance-scale", "inf"], "--guidance-scale must be a finite number >= 0, got 'inf'"),
    (["--seed", "9223372036854775808"], "--seed must be an integer in [0, 2**63), got 9223372036854775808"),
    (["--seed", "9223372036854775807"], "--seed 9223372036854775807 with 4 image(s) needs seeds up to"),
    (["--steps", "1001"], "--steps must be in [1, 1000], got 1001"),
    (["--n", "nan"], "--n must be a positive integer, got 'nan'"),
])
def test_eval_refuses_numbers_before_loading(argv, message, capsys, monkeypatch):
    _no_load(monkeypatch)
    assert main(["eval", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffkit: error: {message}") and err.count("\n") == 1


def _fake_artifact(path, concept):
    from diffkit.erasure.artifact import FORMAT, SIDECAR_FILE

    path.mkdir()
    (path / SIDECAR_FILE).write_text(json.dumps({"format": FORMAT, "concept": concept, "method": "esd"}))
    return path


def test_eval_concept_must_match_the_artifact(tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    red = _fake_artifact(tmp_path / "red", ["red"])
    assert main(["eval", "--concept", "star", "--erased", str(red)]) == 2
    err = capsys.readouterr().err
    assert err == (f"diffkit: error: --concept 'star' does not match the erasure artifact {str(red)!r}, which erased "
                   "['red'] (its erasure.json); pass the concept it erased\n")


def test_eval_concept_matching_a_word_of_the_artifact_passes_the_check(tmp_path):
    from diffkit.evaluation.cli import _check_artifact_concept

    _check_artifact_concept(str(_fake_artifact(tmp_path / "a", ["red star", "crimson"])), "star")
    _check_artifact_concept(str(_fake_artifact(tmp_path / "b", "Red")), "red")
    _check_artifact_concept(str(tmp_path / "missing"), "red")  # unreadable: left to the loading


def test_eval_truncated_artifact_is_a_one_line_error(load_tiny, tmp_path, capsys):
    from diffkit.erasure import ErasureConfig, erase

    artifact = erase(load_tiny("sd15"), ErasureConfig(concept="red", steps=1, sample_steps=1), tmp_path / "a",
                     progress=False).path
    tensors = next(artifact.glob("*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[:100])
    capsys.readouterr()
    code = main(["eval", "--model", "zoo:sd15", "--concept", "red", "--erased", str(artifact), "--n", "1",
                 "--seeds-per-prompt", "1", "--steps", "1", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"diffkit: error: could not load erasure {str(artifact)!r}: ")
    assert err.count("\n") == 1


def test_eval_raw_safetensor_error_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    """The loader's own SafetensorError (a truncated erasure.safetensors) is reported, not raised."""
    from safetensors import SafetensorError

    import diffkit.pipelines.classes as classes

    def corrupt(self, path):
        raise SafetensorError("Error while deserializing header: incomplete metadata, file not fully covered")

    for klass in {k for cls in classes.PIPELINES.values() for k in cls.__mro__ if "load_erasure" in vars(k)}:
        monkeypatch.setattr(klass, "load_erasure", corrupt)
    artifact = _fake_artifact(tmp_path / "red", ["red"])
    code = main(["eval", "--model", "zoo:sd15", "--concept", "red", "--erased", str(artifact), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == (f"diffkit: error: could not load erasure {str(artifact)!r}: Error while "
                                       "deserializing header: incomplete metadata, file not fully covered\n")
