"""SIGKILL mid-job, restart: at most one checkpoint interval lost, the same artifact as without the kill."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import torch

from diffkit.cli import main
from diffkit.erasure import ErasureConfig, erase, read_artifact

JOB = dict(method="esd", concept=["red star", "red"], steps=12, sample_steps=3, checkpoint_every=3, lr=1e-3,
           batch_size=2, seed=7)


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the killed subprocess runs with one thread: same float reductions
    try:
        yield
    finally:
        torch.set_num_threads(n)


def test_sigkill_and_resume_give_the_uninterrupted_artifact(tiny_paths, tmp_path, load_tiny, capsys):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "diffkit.cli", "erase", "--model", str(tiny_paths["sd15"]),
                             "--config", str(job), "--out", str(out)], stderr=log, stdout=subprocess.DEVNULL, env=env)
    pointer = out / "checkpoint" / "checkpoint.json"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            if pointer.is_file() and '"step": 6' in pointer.read_text():
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert not (out / "erasure.json").exists()
    import json

    saved = json.loads(pointer.read_text())["step"]
    shown = [int(n) for n in re.findall(r"(\d+)/12", (tmp_path / "stderr.txt").read_text())]
    assert 6 <= saved < 12 and max(shown) <= saved + JOB["checkpoint_every"]

    with _one_thread():
        assert main(["erase", "--model", str(tiny_paths["sd15"]), "--config", str(job), "--out", str(out),
                     "--quiet"]) == 0
        assert f"resumed at step {saved})" in capsys.readouterr().out
        reference = erase(load_tiny("sd15"), ErasureConfig(**JOB), tmp_path / "straight", progress=False)
    resumed, straight = read_artifact(out), read_artifact(reference.path)
    assert resumed.sidecar["resumed_from"] == saved and straight.sidecar["resumed_from"] is None
    assert sorted(resumed.tensors) == sorted(straight.tensors)
    assert all(torch.equal(resumed.tensors[k], straight.tensors[k]) for k in straight.tensors)
    assert resumed.sidecar["metrics"]["losses"] == straight.sidecar["metrics"]["losses"]
    assert not (out / "checkpoint").exists()


def test_checkpoint_of_another_job_is_refused(tiny_paths, tmp_path, load_tiny, interrupted_erase):
    from diffkit.erasure.checkpoint import read_checkpoint
    from diffkit.erasure.esd import ESD

    cfg = ErasureConfig(**{**JOB, "steps": 4, "checkpoint_every": 2})
    out = tmp_path / "j"
    interrupted_erase(cfg, out, ESD, at=3)  # after the checkpoint of step 2
    info, tensors = read_checkpoint(out / "checkpoint")
    assert info["step"] == 2 and "rng/loop" in tensors
    assert any(k.startswith("adam/") and k.endswith("/exp_avg") for k in tensors)
    import pytest

    with pytest.raises(ValueError, match="belongs to a different job \\(config_hash differs\\); remove it"):
        erase(load_tiny("sd15"), cfg.replace(lr=2e-3), out, progress=False)
    import diffkit
    from diffkit.zoo import save_tiny_pipeline

    other = diffkit.DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "seed1", "sd15", seed=1))
    with pytest.raises(ValueError, match="belongs to a different job \\(base_fingerprint differs\\)"):
        erase(other, cfg, out, progress=False)
    result = erase(load_tiny("sd15"), cfg, out, progress=False)
    assert result.status == "resumed" and result.resumed_from == 2
