"""Concept-preserving gradient surgery: the paper's rule on constructed vectors, per-tensor granularity,
the wrapper around any method (engine, config, CLI)."""

from __future__ import annotations

import json

import pytest
import torch

from diffkit.cli import main
from diffkit.erasure import ESD, ErasureConfig, erase, make_accelerator, select_parameters
from diffkit.erasure.engine import OriginalWeights, TrainingContext
from diffkit.erasure.surgery import PreserveGradient, concept_preserving_gradients, project_conflicting


def test_conflicting_component_is_removed_exactly():
    g_u, g_p = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    out, hit = project_conflicting(g_u, g_p)
    # g_u.g_p = -1, ||g_p||^2 = 2: g_u - (-1/2) g_p = (0.5, 0.5)
    assert hit and torch.equal(out, torch.tensor([0.5, 0.5]))
    assert float(out @ g_p) == 0.0  # no component against the preservation gradient is left
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    p = -g + 0.3 * torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    out, hit = project_conflicting(g, p)
    expected = g - (g.flatten() @ p.flatten()) / (p.flatten() @ p.flatten()) * p
    assert hit and out.shape == g.shape and torch.allclose(out, expected, atol=1e-6)
    assert abs(float(out.flatten() @ p.flatten())) < 1e-5


@pytest.mark.parametrize("g_p", [torch.tensor([1.0, 2.0]), torch.tensor([0.0, 3.0]), torch.tensor([0.0, 0.0])])
def test_non_conflicting_and_zero_preservation_gradients_are_untouched(g_p):
    g_u = torch.tensor([1.0, 0.0])  # dot >= 0 (positive, orthogonal) or g_p = 0
    out, hit = project_conflicting(g_u, g_p)
    assert not hit and out is g_u


def test_surgery_is_per_tensor_and_adds_the_weighted_preservation_gradient():
    # Tensor a conflicts, tensor b agrees; concatenated the two would not conflict (1*-1 + 3*1 = 2 > 0).
    g_u = {"a": torch.tensor([1.0]), "b": torch.tensor([3.0])}
    g_p = {"a": torch.tensor([-1.0]), "b": torch.tensor([1.0])}
    out, conflicts = concept_preserving_gradients(g_u, g_p, weight=0.0)
    assert conflicts == 1
    assert torch.equal(out["a"], torch.tensor([0.0])) and torch.equal(out["b"], torch.tensor([3.0]))
    out, _ = concept_preserving_gradients(g_u, g_p, weight=0.5)
    assert torch.equal(out["a"], torch.tensor([-0.5])) and torch.equal(out["b"], torch.tensor([3.5]))


def test_surgery_input_errors():
    with pytest.raises(ValueError, match=r"gradients must have the same shape, got \(2,\) and \(3,\)"):
        project_conflicting(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="unlearn and preserve gradients must name the same tensors"):
        concept_preserving_gradients({"a": torch.zeros(1)}, {"b": torch.zeros(1)})
    with pytest.raises(ValueError, match="weight must be >= 0, got -1"):
        concept_preserving_gradients({"a": torch.zeros(1)}, {"a": torch.zeros(1)}, weight=-1)


def _ctx(pipe, cfg, preset="esd-x"):
    ctx = TrainingContext(pipe, cfg, make_accelerator("no"))
    params = select_parameters(ctx.components, preset)
    ctx.trainable, ctx.original, ctx.pristine = params, OriginalWeights(params), False
    for p in params.values():
        p.requires_grad_(True)
    return ctx, params


def test_wrapper_applies_the_rule_to_the_methods_gradients(load_tiny):
    pipe = load_tiny("sd15")
    cfg = ErasureConfig(method="esd", concept="red star", retain_prompts=["a tree", "blue circle"], steps=1,
                        sample_steps=3, num_images=2, batch_size=2, beta=0.25, preserve_gradient=True)
    ctx, params = _ctx(pipe, cfg)
    wrapped = PreserveGradient(ESD(cfg))
    ctx.pristine = True
    wrapped.prepare(ctx, params)  # generates the preservation images from the original model
    ctx.pristine = False
    with torch.no_grad():  # move away from the original so the gradients are generic
        for p in params.values():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    state = ctx.rng.get_state()
    loss, _ = wrapped.loss(ctx)
    wrapped.backward(ctx, loss)
    got = {q: p.grad.clone() for q, p in params.items()}
    # The same draws, computed separately: g_u from ESD's loss, g_p from the prior-preservation loss.
    ctx.rng.set_state(state)
    for p in params.values():
        p.grad = None
    ESD(cfg).loss(ctx)[0].backward()
    g_u = {q: p.grad.clone() for q, p in params.items()}
    for p in params.values():
        p.grad = None
    wrapped.preservation.loss(ctx).backward()
    g_p = {q: p.grad.clone() for q, p in params.items()}
    conflicting = [q for q in params if float((g_u[q] * g_p[q]).sum()) < 0]
    assert 0 < len(conflicting) < len(params)  # both cases occur on this batch
    for q in params:
        dot, sq = float((g_u[q].double() * g_p[q].double()).sum()), float((g_p[q].double() ** 2).sum())
        expected = (g_u[q] - dot / sq * g_p[q] if dot < 0 else g_u[q]) + 0.25 * g_p[q]
        assert torch.allclose(got[q], expected, atol=1e-7, rtol=1e-5), q
    assert wrapped.conflicts == len(conflicting) and wrapped.tensor_steps == len(params)


def test_preserve_gradient_config_and_hash():
    esd = ErasureConfig(method="esd", concept="red")
    assert esd.preserve_gradient is False
    assert ErasureConfig(method="doco", concept="red").preserve_gradient is True  # DoCo's default
    assert ErasureConfig(method="doco", concept="red", preserve_gradient=False).preserve_gradient is False
    # Jobs that do not use it keep the hash they had before the option existed.
    import hashlib

    d = esd.to_dict()
    d.pop("checkpoint_every"), d.pop("preserve_gradient")
    for key in ("parametrization", "lora_rank", "lora_alpha"):  # a full-rank job's LoRA fields: not hashed
        d.pop(key)
    assert esd.config_hash() == hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]
    assert esd.replace(preserve_gradient=True).config_hash() != esd.config_hash()
    with pytest.raises(ValueError, match="preserve_gradient must be true or false, got 'yes'"):
        ErasureConfig(method="esd", concept="red", preserve_gradient="yes")


def test_cli_preserve_gradient_flag(tiny_paths, tmp_path, capsys):
    out = tmp_path / "esd-pg"
    flags = ["erase", "--model", str(tiny_paths["sd15"]), "--out", str(out), "--steps", "2", "--sample-steps", "2",
             "--quiet", "--method", "esd", "--concept", "red", "--retain", "a tree", "--num-images", "2",
             "--preserve-gradient"]
    assert main(flags) == 0
    side = json.loads((out / "erasure.json").read_text())
    assert side["hyperparameters"]["preserve_gradient"] is True
    assert side["metrics"]["surgery_tensor_steps"] == 2 * side["metrics"]["trained_tensors"]
    out2 = tmp_path / "doco-off"
    assert main(["erase", "--model", str(tiny_paths["sd15"]), "--out", str(out2), "--steps", "1", "--sample-steps",
                 "2", "--quiet", "--method", "doco", "--concept", "red", "--anchor", "blue", "--batch-size", "1",
                 "--num-images", "1", "--no-preserve-gradient"]) == 0
    side = json.loads((out2 / "erasure.json").read_text())
    assert side["hyperparameters"]["preserve_gradient"] is False and "surgery_tensor_steps" not in side["metrics"]
    capsys.readouterr()


def test_surgery_changes_what_a_job_trains(load_tiny, tmp_path):
    cfg = ErasureConfig(method="esd", concept="red star", retain_prompts=["a tree"], steps=3, sample_steps=2,
                        num_images=2, lr=1e-3, preserve_gradient=True)
    a = erase(load_tiny("sd15"), cfg, tmp_path / "a", progress=False)
    b = erase(load_tiny("sd15"), cfg.replace(preserve_gradient=False), tmp_path / "b", progress=False)
    from diffkit.erasure import read_artifact

    ta, tb = read_artifact(a.path).tensors, read_artifact(b.path).tensors
    assert sorted(ta) == sorted(tb) and any(not torch.equal(ta[k], tb[k]) for k in ta)


def test_two_processes_match_one_for_part2_methods(tiny_paths, tmp_path, load_tiny):
    """AdvUnlearn (shared attack prefix), DoCo (discriminator) and the surgery all-reduce explicitly:
    two processes (accelerate launch, CPU, gloo) reproduce the single-process artifacts for the same global batch."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    from diffkit.erasure import read_artifact
    from diffkit.erasure.batch import parse_batch

    batch = {"defaults": {"steps": 2, "sample_steps": 2, "batch_size": 2, "num_images": 2, "lr": 1e-3, "seed": 3,
                          "retain_prompts": ["a tree", "green square"]},
             "jobs": [{"method": "advunlearn", "concept": ["red star", "red"], "name": "adv",
                       "options": {"attack": "adam", "attack_steps": 2, "warmup_steps": 0, "retain_batch": 2}},
                      {"method": "doco", "concept": ["red star", "red"], "anchor": "blue circle", "name": "doco",
                       "options": {"discriminator_warmup": 1}}]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(batch))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "diffkit.cli", "erase-batch", str(path), "--model", str(tiny_paths["sd15"]), "--out",
           str(tmp_path / "ddp"), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, jobs = parse_batch(batch)
    for job in jobs:
        two = read_artifact(tmp_path / "ddp" / job.name)
        assert two.sidecar["metrics"]["num_processes"] == 2
        one = read_artifact(erase(load_tiny("sd15"), job.config, tmp_path / f"one-{job.name}", progress=False).path)
        base = load_tiny("sd15")
        comps = {"unet": base.unet, "text_encoder": base.text_encoder}
        moved = worst = 0.0
        for q in one.names:
            c, n = q.split(".", 1)
            ref = comps[c].get_parameter(n).detach()
            moved = max(moved, float((one.tensors[q] - ref).abs().max()))
            worst = max(worst, float((two.tensors[q] - one.tensors[q]).abs().max()))
        assert moved > 1e-4 and worst <= 0.05 * moved, (job.name, worst, moved)
        l1, l2 = one.sidecar["metrics"]["losses"], two.sidecar["metrics"]["losses"]
        assert l2 == pytest.approx(l1, rel=1e-3, abs=1e-6), job.name
