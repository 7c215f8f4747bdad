"""Two processes (accelerate launch, CPU, gloo) reproduce the single-process result for the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from diffkit.erasure import ErasureConfig, erase, read_artifact

JOB = dict(method="salun", concept=["red star"], anchor="blue circle", retain_prompts=["green square", "a tree"],
           steps=3, sample_steps=2, num_images=2, batch_size=2, lr=1e-3, seed=11)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_single_process(tiny_paths, tmp_path, load_tiny):
    import yaml

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(JOB))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "diffkit.cli", "erase", "--model",
           str(tiny_paths["sd15"]), "--config", str(job), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trained: salun erasing") == 1  # only the main process reports
    two = read_artifact(out)
    assert two.sidecar["metrics"]["num_processes"] == 2
    torch.set_num_threads(1)  # as the processes (OMP_NUM_THREADS=1): the same float reductions, bit for bit
    one = erase(load_tiny("sd15"), ErasureConfig(**JOB), tmp_path / "single", progress=False)
    single = read_artifact(one.path)
    assert one.sidecar["metrics"]["num_processes"] == 1
    assert sorted(two.names) == sorted(single.names)
    base = load_tiny("sd15")
    moved, total, off, worst = 0.0, 0, 0, 0.0
    for q in single.names:
        ref = base.unet.get_parameter(q[5:]).detach()
        assert torch.equal(two.mask(q), single.mask(q))  # the same saliency mask on both
        v = single.materialize(q, ref)
        moved = max(moved, float((v - ref).abs().max()))
        diff = (two.materialize(q, ref) - v).abs()
        total += diff.numel()
        off += int((diff > 1e-6).sum())
        worst = max(worst, float(diff.max()))
    # Same global batch, same draws: the runs differ only by float round-off in the gradient all-reduce,
    # which Adam's normalisation amplifies for near-zero gradients (measured: 186 of 2.1M weights > 1e-6).
    assert moved > 1e-3  # the comparison is not vacuous: training moved the weights
    assert off <= 1e-3 * total and worst <= 0.05 * moved, (off, total, worst, moved)
    l1, l2 = single.sidecar["metrics"]["losses"], two.sidecar["metrics"]["losses"]
    assert len(l1) == len(l2) == 3 and all(abs(a - b) <= 1e-5 * max(1.0, abs(a)) for a, b in zip(l1, l2))
    assert json.loads((out / "erasure.json").read_text())["config_hash"] == ErasureConfig(**JOB).config_hash()
