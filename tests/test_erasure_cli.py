"""``diffkit erase`` and ``diffkit erase-batch``: outputs, skipping, failures, error messages."""

from __future__ import annotations

import json

import pytest

from diffkit.cli import main
from diffkit.erasure.batch import parse_batch, slug, summary_table


def _flags(tiny, out, *extra):
    return ["erase", "--model", str(tiny), "--out", str(out), "--steps", "2", "--sample-steps", "2", "--quiet",
            *extra]


def test_erase_writes_an_artifact_and_skips_when_done(tiny_paths, tmp_path, capsys):
    out = tmp_path / "red"
    assert main(_flags(tiny_paths["sd15"], out, "--method", "esd", "--concept", "red", "--concept", "red star",
                       "--anchor", "blue", "--eta", "2", "--parameters", "esd-x-strict")) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"trained: esd erasing ['red', 'red star'] -> {out} (2 steps, final loss")
    side = json.loads((out / "erasure.json").read_text())
    assert side["anchor"] == "blue" and side["hyperparameters"]["eta"] == 2.0
    assert side["hyperparameters"]["parameters"] == "esd-x-strict"
    assert main(_flags(tiny_paths["sd15"], out, "--method", "esd", "--concept", "red", "--concept", "red star",
                       "--anchor", "blue", "--eta", "2", "--parameters", "esd-x-strict")) == 0
    assert capsys.readouterr().out.startswith("skipped: esd erasing")


def test_erase_config_file_and_flag_precedence(tiny_paths, tmp_path, capsys):
    job = tmp_path / "job.yaml"
    job.write_text("method: salun\nconcept: red\nretain_prompts: [green square]\nnum_images: 2\nbatch_size: 2\n"
                   "steps: 5\nsaliency_fraction: 0.25\n")
    out = tmp_path / "s"
    assert main(_flags(tiny_paths["sd15"], out, "--config", str(job))) == 0  # --steps 2 wins over 5
    side = json.loads((out / "erasure.json").read_text())
    assert side["method"] == "salun" and side["hyperparameters"]["steps"] == 2
    assert side["metrics"]["salient_fraction"] == pytest.approx(0.25, abs=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "concept must name at least one prompt or word to erase, got none"),
        (["--concept", "red", "--method", "uce"],
         "method must be one of ['advunlearn', 'doco', 'esd', 'salun'], got 'uce'"),
        (["--concept", "red", "--method", "salun"], "method 'salun' needs retain_prompts when beta > 0"),
        (["--concept", "red", "--eta", "-1"], "eta must be > 0, got -1.0"),
        (["--concept", "red", "--parameters", "attn"], "parameters must be one of"),
        (["--concept", "red", "--mixed-precision", "fp8"], "mixed_precision must be one of"),
        (["--concept", "red", "--config", "/nonexistent/job.yaml"], "cannot read job file '/nonexistent/job.yaml'"),
    ],
)
def test_erase_errors(tiny_paths, tmp_path, capsys, extra, message):
    assert main(_flags(tiny_paths["sd15"], tmp_path / "e", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffkit: error: ") and message in err


def test_erase_bad_model_path(tmp_path, capsys):
    assert main(["erase", "--model", str(tmp_path / "nope"), "--concept", "red", "--out", str(tmp_path / "o")]) == 2
    assert "model path" in capsys.readouterr().err


BATCH = """
model: {model}
defaults: {{steps: 2, sample_steps: 2, checkpoint_every: 1, retain_prompts: [green square], num_images: 2,
            batch_size: 2}}
methods: [esd, salun]
per_method: {{esd: {{parameters: esd-x-strict, batch_size: 1}}}}
concepts:
  - red
  - {{concept: [blue star, star], name: star, anchor: circle}}
jobs:
  - {{method: esd, concept: green, parameters: ['nothing.*'], name: broken}}
"""


def test_erase_batch_runs_skips_and_reports_failures(tiny_paths, tmp_path, capsys):
    jobs = tmp_path / "jobs.yaml"
    jobs.write_text(BATCH.format(model=tiny_paths["sd15"]))
    out = tmp_path / "out"
    assert main(["erase-batch", str(jobs), "--out", str(out), "--quiet"]) == 1  # one job fails
    text = capsys.readouterr().out
    assert "[5/5] broken: FAILED: ValueError: parameters ['nothing.*'] select no tensor of this pipeline" in text
    table = text[text.index("job "):].splitlines()
    assert table[0].split() == ["job", "method", "concept", "status", "steps", "final", "loss", "seconds"]
    rows = {r.split()[0]: r for r in table[2:]}
    assert set(rows) == {"esd-red", "salun-red", "esd-star", "salun-star", "broken"}
    assert "failed: parameters ['nothing.*'] select no tensor" in rows["broken"]
    assert sorted(p.name for p in out.iterdir()) == ["esd-red", "esd-star", "salun-red", "salun-star"]
    for name in ("esd-red", "salun-red"):
        assert (out / name / "erasure.json").is_file()
    side = json.loads((out / "esd-red" / "erasure.json").read_text())
    assert side["hyperparameters"]["parameters"] == "esd-x-strict" and side["hyperparameters"]["batch_size"] == 1
    # Second run: the finished jobs are skipped, the broken one fails again.
    assert main(["erase-batch", str(jobs), "--out", str(out), "--quiet"]) == 1
    text = capsys.readouterr().out
    assert text.count(": skipped") == 4 and "broken: FAILED" in text
    star = json.loads((out / "salun-star" / "erasure.json").read_text())
    assert star["concept"] == ["blue star", "star"] and star["anchor"] == "circle"


def test_batch_names_and_job_expansion(tiny_paths):
    data = {"methods": ["esd", "salun"], "defaults": {"retain_prompts": ["x"]},
            "concepts": ["Van Gogh style", {"concept": "red", "name": "r"}]}
    data["jobs"] = [{"concept": "x", "name": "esd-r"}]
    with pytest.raises(ValueError, match="two jobs are named 'esd-r'"):
        parse_batch(data)
    data["concepts"][1] = {"concept": "red"}
    del data["jobs"]
    model, jobs = parse_batch(data)
    assert model is None
    assert [j.name for j in jobs] == ["esd-van-gogh-style", "salun-van-gogh-style", "esd-red", "salun-red"]
    assert jobs[1].config.retain_prompts == ("x",) and jobs[1].config.method == "salun"
    assert slug("  A/B c ") == "a-b-c"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"methods": ["esd"]}, "defines no jobs"),
        ({"concepts": ["red"]}, "concepts are given but no methods"),
        ({"methodz": ["esd"]}, "unknown key(s) ['methodz']"),
        ({"methods": ["esd"], "concepts": ["red"], "defaults": {"steps": 0}}, "job 'esd-red': steps must be"),
        ({"jobs": [{"concept": "red", "name": "a b"}]}, "job name 'a b' must be letters"),
        ({"jobs": [{"concept": "red", "mixed_precision": "bf16", "name": "a"}, {"concept": "b", "name": "b"}]},
         "all jobs of a batch must share mixed_precision"),
        ({"jobs": [{"concept": "red"}], "model": 3}, "model must be a string"),
    ],
)
def test_batch_file_errors(tmp_path, capsys, data, message):
    import yaml

    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["erase-batch", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffkit: error: batch file") and message in err


def test_summary_table_lists_every_job():
    from diffkit.erasure import ErasureConfig
    from diffkit.erasure.batch import JobOutcome

    cfg = ErasureConfig(concept="red", steps=3)
    table = summary_table([JobOutcome("esd-red", cfg, "trained", 1.25, 0.5),
                           JobOutcome("esd-x", cfg, "failed", 0.1, error="boom")]).splitlines()
    assert table[0].split()[:4] == ["job", "method", "concept", "status"]
    assert table[2].split() == ["esd-red", "esd", "red", "trained", "3", "0.5", "1.2"]
    assert table[3].split() == ["esd-x", "esd", "red", "failed:", "boom", "3", "-", "0.1"]


def test_erase_help_names_every_method(capsys):
    from diffkit.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    text = next(c.help for c in sub._choices_actions if c.dest == "erase")
    assert all(m in text for m in ("ESD", "SalUn", "AdvUnlearn", "DoCo")), text


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63), got -1"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got 'inf'"),
    (["--saliency-fraction", "0"], "--saliency-fraction must be in (0, 1], got 0.0"),
    (["--resolution", "60"], "--resolution must be a multiple of 8 >= 8, got 60"),
    (["--sample-steps", "5000"], "--sample-steps must be in [1, 1000], got 5000"),
    (["--concept", ""], "--concept must be non-blank text"),
])
def test_erase_refuses_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr("diffkit.cli.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["erase", "--concept", "red", "--out", str(tmp_path / "e"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffkit: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "e").exists()


def test_erase_out_is_a_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("diffkit.cli.load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "f").write_text("x")
    for argv in (["erase", "--concept", "red"], ["erase-batch", str(tmp_path / "f")]):
        assert main([*argv, "--out", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err
        assert err == f"diffkit: error: --out must be a folder, but {str(tmp_path / 'f')!r} is a file\n"
