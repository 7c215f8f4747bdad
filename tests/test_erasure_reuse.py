"""erasure_methods --reuse: ESD and SalUn rows taken from a finished erasure_quality run equal the rows a fresh run
measures (same jobs, prompts and seeds), and a run measured with other settings is refused, naming them."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

from erasure_quality import PROTOCOL, attack_instances, reuse_rows  # noqa: E402

#: the measured figures of a row (not its wall time or memory)
FIGURES = ("ua", "ua_synonyms", "ira", "cra", "kid", "asr", "ua_ci95", "ira_ci95", "pre_attack", "asr_unlearndiffatk")


def _run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--smoke", *args], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def runs():
    tag = "_reusetest"
    files = [RESULTS / f"erasure_quality_smoke{tag}.json", RESULTS / f"erasure_methods_smoke{tag}.json",
             RESULTS / f"erasure_methods_smoke{tag}_fresh.json"]
    try:
        _run("erasure_quality", "--tag", tag, "--concepts", "star", "red")
        # erasure_methods' own defaults for ESD / SalUn differ: the documented run passes part 1's values
        same = ("--esd-lr", "5e-4", "--salun-lr", "2e-4", "--concepts", "star", "red")
        _run("erasure_methods", "--tag", tag, "--reuse", str(files[0]), "--methods", "esd", "salun", "advunlearn",
             *same)
        _run("erasure_methods", "--tag", f"{tag}_fresh", "--methods", "esd", "salun", *same)
        yield [json.loads(f.read_text()) for f in files]
    finally:
        for f in files:
            f.unlink(missing_ok=True)
            shutil.rmtree(RESULTS / ".work" / f.stem, ignore_errors=True)


def test_reused_rows_equal_a_fresh_run(runs):
    quality, reused, fresh = runs
    assert reused["reused"] == {"methods": ["esd", "salun"], "source": "erasure_quality_smoke_reusetest.json"}
    # rows in the order concept x method, reused ones beside the run ones
    assert [(r["concept"], r["method"]) for r in reused["results"]] == [
        (c, m) for c in ("star", "red") for m in ("esd", "salun", "advunlearn")]
    fresh_rows = {(r["concept"], r["method"]): r for r in fresh["results"]}
    for r in reused["results"]:
        if r["method"] == "advunlearn":
            continue
        for key in FIGURES:
            assert r.get(key) == fresh_rows[r["concept"], r["method"]].get(key), (r["concept"], r["method"], key)
        key = f"{r['method']}-{r['concept']}"
        assert reused["details"][key]["report"]["outcomes"] == fresh["details"][key]["report"]["outcomes"]
    # the targets that compare methods see the reused rows
    assert "advunlearn_asr_le_half_esd" in reused["targets"]["star"]


def test_reused_methods_are_in_the_grid_from_the_source_runs_images(runs):
    """The grid shows every method, in the columns a fresh run draws them: the reused ones' tiles are the source
    run's kept images (``.work/<source>/<method>-<concept>.npy``), pixel for pixel."""
    import numpy as np
    from PIL import Image

    _, reused, fresh = runs
    methods = ("esd", "salun", "advunlearn")
    whats = ("forget", "synonym", "retain")
    assert reused["grid"]["columns"] == [f"{who}: {what}" for who in ("original", *methods) for what in whats]
    assert fresh["grid"]["columns"] == reused["grid"]["columns"][:9]
    grid = np.asarray(Image.open(reused["grid"]["path"]).convert("RGB"))
    source = RESULTS / ".work" / "erasure_quality_smoke_reusetest"
    for i, concept in enumerate(("star", "red")):
        for k, method in enumerate(("esd", "salun")):
            cells = np.load(source / f"{method}-{concept}.npy")
            h, w = 2 * cells.shape[1], 2 * cells.shape[2]  # save_grid's scale 2, 120 px labels, 28 px header
            for j, cell in enumerate(cells):
                x, y = 120 + (3 * (k + 1) + j) * w, 28 + i * h
                tile = np.asarray(Image.fromarray(cell).resize((w, h), Image.NEAREST))
                assert np.array_equal(grid[y:y + h, x:x + w], tile), (concept, method, j)
            assert cells.std() > 0  # images, not blanks


def _finished(tmp_path: Path, **setting) -> Path:
    base = {k: None for k in PROTOCOL} | dict(n_prompts=64, seeds=[0, 1], attack=["unlearndiffatk"],
                                              esd_steps=300, esd_lr=5e-4, salun_steps=100, salun_lr=2e-4,
                                              salun_batch=4, salun_images=16, concepts=["star"])
    rows = [dict(concept="star", method="esd", ua=1.0), dict(concept="star", method="salun", ua=0.9)]
    data = dict(complete=True, setting=base | setting, results=rows,
                details={"esd-star": {"report": {}}, "salun-star": {"report": {}}})
    path = tmp_path / "erasure_quality.json"
    path.write_text(json.dumps(data))
    return path


def _args(**kw) -> argparse.Namespace:
    base = {k: None for k in PROTOCOL} | dict(n_prompts=64, seeds=[0, 1], attack=["unlearndiffatk"],
                                              esd_steps=300, esd_lr=5e-4, salun_steps=100, salun_lr=2e-4,
                                              salun_batch=4, salun_images=16, concepts=["star"])
    return argparse.Namespace(**(base | kw))


def test_reuse_rows_checks_every_setting(tmp_path):
    path = _finished(tmp_path)
    rows, details, source = reuse_rows(path, _args(), ["esd"])
    assert [r["method"] for r in rows] == ["esd"] and list(details) == ["esd-star"] and source == path.name
    with pytest.raises(ValueError, match=r"other settings: n_prompts \(64 there, 12 here\), esd_lr \(0.0005 there, "
                                         r"0.0003 here\)"):
        reuse_rows(path, _args(n_prompts=12, esd_lr=3e-4), ["esd"])
    # SalUn's training flags only matter when SalUn is reused
    assert reuse_rows(path, _args(salun_lr=1e-3), ["esd"])[0][0]["method"] == "esd"
    with pytest.raises(ValueError, match=r"salun_lr \(0.0002 there, 0.001 here\)"):
        reuse_rows(path, _args(salun_lr=1e-3), ["esd", "salun"])
    with pytest.raises(ValueError, match=r"has no row for esd-red"):
        reuse_rows(path, _args(concepts=["star", "red"]), ["esd"])
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(data, complete=False)))
    with pytest.raises(ValueError, match="a partial run; its rows cannot be reused"):
        reuse_rows(path, _args(), ["esd"])


def test_a_file_from_before_attack_seeds_was_measured_with_one(tmp_path):
    path = _finished(tmp_path)
    data = json.loads(path.read_text())
    del data["setting"]["attack_seeds"]  # written before the flag existed
    path.write_text(json.dumps(data))
    assert reuse_rows(path, _args(attack_seeds=1), ["esd"])[0][0]["method"] == "esd"
    with pytest.raises(ValueError, match=r"other settings: attack_seeds \(1 there, 2 here\)"):
        reuse_rows(path, _args(attack_seeds=2), ["esd"])


def test_attack_instances_repeat_each_prompt_with_its_own_seed():
    prompts = ["a star", "a pentagram", "star shape"]
    assert attack_instances(prompts, 1) == (prompts, [100, 101, 102])  # the one-seed protocol, unchanged
    got, seeds = attack_instances(prompts, 2)
    assert got == prompts + prompts and seeds == [100, 101, 102, 103, 104, 105]
    assert len(set(seeds)) == len(seeds)  # every instance its own concept image and (by index) attack draws


def test_reuse_rows_renames_and_takes_a_source_that_measured_more(tmp_path):
    """erasure_lora reuses erasure_methods' ESD / AdvUnlearn rows as its ``-full`` rows: the source may have run
    more attacks (this run's must be its first ones) and more probes, and AdvUnlearn's training flags are
    checked."""
    adv = dict(adv_steps=200, adv_lr=2e-4, adv_attack="sign", adv_retain_batch=2)
    path = _finished(tmp_path, attack=["unlearndiffatk", "soft-prompt"], probes=["noise-search", "completion"],
                     **adv)
    data = json.loads(path.read_text())
    data["results"].append(dict(concept="star", method="advunlearn", ua=0.8))
    data["details"]["advunlearn-star"] = {"report": {"ua": 0.8}}
    path.write_text(json.dumps(data))
    rename = {"esd-full": "esd", "advunlearn-full": "advunlearn"}
    rows, details, _ = reuse_rows(path, _args(probes=[], **adv), list(rename), rename=rename)
    assert [(r["method"], r["ua"]) for r in rows] == [("esd-full", 1.0), ("advunlearn-full", 0.8)]
    assert details == {"esd-full-star": {"report": {}}, "advunlearn-full-star": {"report": {"ua": 0.8}}}
    assert reuse_rows(path, _args(attack=["unlearndiffatk", "soft-prompt"], probes=["completion"], **adv),
                      ["esd-full"], rename=rename)[0][0]["method"] == "esd-full"
    with pytest.raises(ValueError, match=r"other settings: attack \(\['unlearndiffatk', 'soft-prompt'\] there, "
                                         r"\['soft-prompt'\] here\)"):
        reuse_rows(path, _args(attack=["soft-prompt"], **adv), ["esd-full"], rename=rename)
    with pytest.raises(ValueError, match=r"other settings: probes"):
        reuse_rows(path, _args(probes=["inpainting"], **adv), ["esd-full"], rename=rename)
    with pytest.raises(ValueError, match=r"other settings: adv_lr \(0.0002 there, 0.001 here\)"):
        reuse_rows(path, _args(**{**adv, "adv_lr": 1e-3}), list(rename), rename=rename)
    with pytest.raises(ValueError, match=r"has no row for esd-red, advunlearn-red"):  # named as in the source
        reuse_rows(path, _args(concepts=["star", "red"], **adv), list(rename), rename=rename)


def test_erasure_lora_reuse_fails_before_the_models_load(tmp_path, monkeypatch, capsys):
    import erasure_lora

    loaded = []
    monkeypatch.setattr(erasure_lora, "load_for", lambda *a: loaded.append(a))
    with pytest.raises(SystemExit) as stop:
        erasure_lora.main(["--smoke", "--reuse", str(tmp_path / "none.json")])
    assert stop.value.code == 2 and loaded == []
    err = capsys.readouterr().err
    assert err.startswith("erasure_lora: --reuse: ") and "none.json" in err


def test_a_bad_reuse_file_fails_before_the_models_load(tmp_path, monkeypatch, capsys):
    import erasure_methods

    loaded = []
    monkeypatch.setattr(erasure_methods, "load_for", lambda *a: loaded.append(a))
    missing = tmp_path / "none.json"
    with pytest.raises(SystemExit) as stop:
        erasure_methods.main(["--smoke", "--reuse", str(missing)])
    assert stop.value.code == 2 and loaded == []
    err = capsys.readouterr().err
    assert err.startswith("erasure_methods: --reuse: ") and "none.json" in err
    path = tmp_path / "other.json"
    path.write_text(json.dumps(dict(complete=False)))
    with pytest.raises(SystemExit) as stop:
        erasure_methods.main(["--smoke", "--reuse", str(path)])
    assert stop.value.code == 2 and loaded == []
    assert "a partial run; its rows cannot be reused" in capsys.readouterr().err


@pytest.fixture(scope="module")
def resumed():
    """A two-concept smoke run; the same run 'killed' before its last job (its partial JSON without that job),
    then resumed."""
    full, killed = RESULTS / "erasure_quality_smoke_resumetest.json", RESULTS / "erasure_quality_smoke_killtest.json"
    work = RESULTS / ".work" / killed.stem
    try:
        _run("erasure_quality", "--tag", "_resumetest", "--concepts", "star", "red")
        _run("erasure_quality", "--tag", "_killtest", "--concepts", "star", "red")
        data = json.loads(killed.read_text())
        last = data["results"].pop()
        del data["details"][f"{last['method']}-{last['concept']}"]
        (work / f"{last['method']}-{last['concept']}.npy").unlink()
        killed.write_text(json.dumps(dict(data, complete=False)))
        kept = {(r["concept"], r["method"]): r["train_s"] for r in data["results"]}
        _run("erasure_quality", "--tag", "_killtest", "--concepts", "star", "red", "--resume")
        yield json.loads(full.read_text()), json.loads(killed.read_text()), kept, last
    finally:
        full.unlink(missing_ok=True)
        killed.unlink(missing_ok=True)
        for f in (full, killed):
            shutil.rmtree(RESULTS / ".work" / f.stem, ignore_errors=True)


def test_a_resumed_run_keeps_the_finished_jobs_and_equals_an_uninterrupted_one(resumed):
    full, res, kept, last = resumed
    assert res["complete"] is True
    jobs = [(r["concept"], r["method"]) for r in res["results"]]
    assert jobs == [(r["concept"], r["method"]) for r in full["results"]]
    for r in res["results"]:
        key = (r["concept"], r["method"])
        if key in kept:  # kept, not run again: its wall time is the killed run's
            assert r["train_s"] == kept[key]
        else:
            assert key == (last["concept"], last["method"])
        same = next(f for f in full["results"] if (f["concept"], f["method"]) == key)
        for k in FIGURES:
            assert r.get(k) == same.get(k), (key, k)
    assert res["originals"] == full["originals"]
    assert res["targets"] == full["targets"]
    assert res["grid"]["rows"] == full["grid"]["rows"] and res["grid"]["columns"] == full["grid"]["columns"]


def test_resume_refuses_other_settings(resumed, tmp_path):
    path = RESULTS / "erasure_quality_smoke_otherstest.json"
    try:
        path.write_text(json.dumps(dict(complete=False, setting={"n_prompts": 99}, results=[], details={})))
        out = subprocess.run([sys.executable, str(BENCH / "erasure_quality.py"), "--smoke", "--tag", "_otherstest",
                              "--resume"], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode != 0
        assert "--resume: erasure_quality_smoke_otherstest.json was measured with other settings (" in out.stderr
        assert "n_prompts" in out.stderr and "run without --resume to start afresh" in out.stderr
    finally:
        path.unlink(missing_ok=True)


def test_resume_starts_afresh_over_a_finished_run_of_other_settings(tmp_path):
    sys.path.insert(0, str(BENCH))
    from erasure_quality import resumed_jobs

    path = tmp_path / "erasure_quality.json"
    path.write_text(json.dumps(dict(complete=True, setting={"n_prompts": 12}, results=[{"concept": "star"}])))
    assert resumed_jobs(path, argparse.Namespace(n_prompts=64, resume=True)) == ([], {}, [])
    path.write_text(json.dumps(dict(complete=False, setting={"n_prompts": 12}, results=[])))
    with pytest.raises(SystemExit, match=r"was measured with other settings \(n_prompts\)"):
        resumed_jobs(path, argparse.Namespace(n_prompts=64, resume=True))
    assert resumed_jobs(tmp_path / "none.json", argparse.Namespace()) == ([], {}, [])


def test_print_table_shows_rows_with_other_columns(capsys):
    """A reused row carries the source's extra attack columns; the run's own rows do not (erasure_lora's
    final table crashed on this once)."""
    from _common import print_table

    print_table([dict(method="esd-full", ua=1.0, asr_soft_prompt=0.25), dict(method="esd-r4", ua=0.8125)])
    assert capsys.readouterr().out.splitlines() == ["method    ua      asr_soft_prompt",
                                                    "esd-full  1       0.25           ",
                                                    "esd-r4    0.8125  —              "]
