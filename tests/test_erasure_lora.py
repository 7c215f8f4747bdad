"""LoRA-parametrised erasure (``parametrization: lora``): the job trains peft LoRA layers, the artifact is
diffusers' LoRA file, plain diffusers loads and dials it, and diffkit's ``load_erasure`` merges it.

Independent computations: peft's own ``get_delta_weight`` for the merged delta, the LoRA file's matrices
merged by hand for the loaded weights, and a process that imports only diffusers for the diffusers side.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import diffkit
from diffkit.artifacts import BaseModelMismatch
from diffkit.cli import main
from diffkit.erasure import ESD, ErasureConfig, erase, read_artifact
from diffkit.erasure.artifact import SIDECAR_FILE, TENSORS_FILE
from diffkit.erasure.lora_param import LORA_FILE, lora_delta
from diffkit.zoo import save_tiny_pipeline

STEPS = 4


def _cfg(**kw):
    base = dict(method="esd", concept="red star", steps=3, sample_steps=2, lr=5e-2, parameters="esd-x-strict",
                parametrization="lora", lora_rank=2)
    return ErasureConfig(**{**base, **kw})


def latents(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red star", num_inference_steps=STEPS, generator=g, output_type="latent").images


def weights(pipe):
    return {f"{c}.{k}": v.detach().clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def merged_by_hand(base: dict, lora_file, scaling: float) -> dict:
    """The base weights plus scaling * B @ A of every module in the LoRA file (Linear layers)."""
    sd = load_file(str(lora_file))
    out = dict(base)
    for key in sd:
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            a, b = sd[key], sd[f"{module}.lora_B.weight"]
            w = base[f"{module}.weight"]
            out[f"{module}.weight"] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


@pytest.fixture(scope="module")
def trained(tiny_paths, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "esd-r2"
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.set_progress_bar_config(disable=True)
    base_w, base_lat = weights(pipe), latents(pipe)
    result = erase(pipe, _cfg(), out, progress=False)
    return dict(out=out, result=result, pipe=pipe, base_w=base_w, base_lat=base_lat, erased_lat=latents(pipe),
                erased_w=weights(pipe))


# --- config -------------------------------------------------------------------------------------------
def test_config_checks_rank_alpha_parametrization_and_method():
    with pytest.raises(ValueError, match=r"lora_rank must be an integer >= 1, got 0"):
        _cfg(lora_rank=0)
    with pytest.raises(ValueError, match=r"lora_alpha must be > 0, got -1"):
        _cfg(lora_alpha=-1)
    with pytest.raises(ValueError, match=r"parametrization must be one of \('full', 'lora'\), got 'dora'"):
        _cfg(parametrization="dora")
    with pytest.raises(ValueError, match=r"method 'salun' cannot be LoRA-parametrised: its saliency mask"):
        ErasureConfig(method="salun", concept="red", retain_prompts=["a tree"], parametrization="lora")
    assert _cfg(lora_rank=8).lora_alpha == 8.0  # alpha defaults to the rank: scaling 1


def test_hash_full_jobs_unchanged_lora_jobs_distinct():
    # (the full-rank hashes of earlier releases are pinned in test_erasure_config.py)
    full = ErasureConfig(method="esd", concept="red star")
    assert full.config_hash() == ErasureConfig(method="esd", concept="red star", lora_rank=16).config_hash()
    hashes = {full.config_hash(), _cfg().config_hash(), _cfg(lora_rank=4).config_hash(),
              _cfg(lora_alpha=4).config_hash()}
    assert len(hashes) == 4


# --- the merged delta ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", [torch.nn.Linear(6, 5), torch.nn.Conv2d(3, 4, 3)])
def test_lora_delta_equals_peft_delta_weight(layer):
    from peft import LoraConfig, inject_adapter_in_model

    model = torch.nn.Sequential(layer)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=3, target_modules=["0"]), model, adapter_name="a")
    lora = model[0]
    torch.manual_seed(0)
    with torch.no_grad():
        lora.lora_B["a"].weight.normal_()
    want = lora.get_delta_weight("a")
    got = lora_delta(lora.lora_A["a"].weight, lora.lora_B["a"].weight, 1.5)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# --- training -----------------------------------------------------------------------------------------
def test_artifact_is_a_diffusers_lora_file_with_the_sidecar(trained):
    out = trained["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted([LORA_FILE, SIDECAR_FILE])
    assert not (out / TENSORS_FILE).exists()
    side = json.loads((out / SIDECAR_FILE).read_text())
    pipe = trained["pipe"]
    targets = sorted(f"unet.{n}" for n, _ in pipe.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v")))
    assert side["lora"] == {"rank": 2, "alpha": 2.0, "scaling": 1.0, "targets": targets, "file": LORA_FILE}
    assert side["tensor_names"] == sorted(f"{t}.weight" for t in targets)
    assert set(side["encoding"].values()) == {"lora"}
    assert sorted(side["base_model"]["tensors"]) == side["tensor_names"]
    sd = load_file(str(out / LORA_FILE))
    assert sorted(sd) == sorted(k for t in targets for k in (f"{t}.lora_A.weight", f"{t}.lora_B.weight"))
    width = {t: pipe.unet.get_submodule(t.split(".", 1)[1]) for t in targets}
    for t, m in width.items():
        assert tuple(sd[f"{t}.lora_A.weight"].shape) == (2, m.in_features)
        assert tuple(sd[f"{t}.lora_B.weight"].shape) == (m.out_features, 2)
    m = side["metrics"]
    assert m["trained_weights"] == sum(2 * (x.in_features + x.out_features) for x in width.values())
    assert m["trained_tensors"] == 2 * len(targets)
    assert side["storage_bytes"] == (out / LORA_FILE).stat().st_size


def test_job_leaves_the_modules_its_own_and_the_weights_merged(trained):
    from peft.tuners.lora import LoraLayer

    pipe = trained["pipe"]
    assert not any(isinstance(m, LoraLayer) for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert not hasattr(pipe.unet, "peft_config")
    assert sorted(trained["erased_w"]) == sorted(trained["base_w"])  # the same parameter names as before
    want = merged_by_hand(trained["base_w"], trained["out"] / LORA_FILE, 1.0)
    changed = [q for q in want if not torch.equal(want[q], trained["base_w"][q])]
    assert len(changed) == len(json.loads((trained["out"] / SIDECAR_FILE).read_text())["tensor_names"])
    for q in want:
        torch.testing.assert_close(trained["erased_w"][q], want[q], rtol=0, atol=1e-6)
    assert not torch.equal(trained["erased_lat"], trained["base_lat"])  # the erasure changes the output
    assert [e.path for e in pipe.loaded_erasures] == [str(trained["out"])]


def test_unload_is_bit_identical_and_load_erasure_gives_the_same_weights(trained, tiny_paths):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.set_progress_bar_config(disable=True)
    side = pipe.load_erasure(trained["out"])
    assert side["method"] == "esd" and side["lora"]["rank"] == 2
    w = weights(pipe)
    assert all(torch.equal(w[q], trained["erased_w"][q]) for q in w)
    assert torch.equal(latents(pipe), trained["erased_lat"])
    assert pipe.unload_erasure() == 1
    w = weights(pipe)
    assert all(torch.equal(w[q], trained["base_w"][q]) for q in w)


def test_rerun_loads_the_finished_lora_artifact(trained, tiny_paths):
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    result = erase(pipe, _cfg(), trained["out"], progress=False)
    assert result.status == "skipped"
    w = weights(pipe)
    assert all(torch.equal(w[q], trained["erased_w"][q]) for q in w)


def test_another_base_model_is_refused(trained, tmp_path):
    other = diffkit.DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "other", "sd15", seed=1))
    before = weights(other)
    with pytest.raises(BaseModelMismatch):
        other.load_erasure(trained["out"])
    assert all(torch.equal(v, before[q]) for q, v in weights(other).items())


def test_a_corrupt_lora_file_is_refused(trained, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(trained["out"], bad)
    sd = load_file(str(bad / LORA_FILE))
    key = next(k for k in sd if k.endswith("lora_A.weight"))
    sd[key] = torch.zeros(3, sd[key].shape[1])  # rank 3, the sidecar says 2
    save_file(sd, str(bad / LORA_FILE))
    with pytest.raises(ValueError, match="does not have the shape"):
        read_artifact(bad)


def test_non_linear_targets_are_refused(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    before = weights(pipe)
    with pytest.raises(ValueError, match=r"parametrization 'lora' adapts Linear and Conv2d layers; .* a GroupNorm"):
        erase(pipe, _cfg(parameters=[r"unet\.down_blocks\.0\.resnets\.0\.norm1\.weight"]), tmp_path / "x",
              progress=False)
    assert all(torch.equal(v, before[q]) for q, v in weights(pipe).items())


def test_interrupted_lora_job_restores_the_pipeline_and_resumes_to_the_same_adapters(
        load_tiny, tmp_path, monkeypatch, trained):
    cfg = _cfg(checkpoint_every=1)
    out = tmp_path / "resumed"
    pipe = load_tiny("sd15")
    real, calls = ESD.loss, []

    def flaky(self, ctx):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, ctx)

    with monkeypatch.context() as m:
        m.setattr(ESD, "loss", flaky)
        with pytest.raises(KeyboardInterrupt):
            erase(pipe, cfg, out, progress=False)
    from peft.tuners.lora import LoraLayer

    assert not any(isinstance(x, LoraLayer) for x in pipe.unet.modules())
    assert all(torch.equal(v, trained["base_w"][q]) for q, v in weights(pipe).items())
    result = erase(pipe, cfg, out, progress=False)
    assert (result.status, result.resumed_from) == ("resumed", 2)
    got, want = load_file(str(out / LORA_FILE)), load_file(str(trained["out"] / LORA_FILE))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)  # a resumed job equals an uninterrupted one


@pytest.mark.parametrize("method,extra", [
    ("advunlearn", dict(retain_prompts=["a tree"], options={"attack": "sign", "warmup_steps": 0, "retain_batch": 1})),
    ("doco", dict(anchor="blue circle", retain_prompts=["a tree"], batch_size=2, num_images=2,
                  options={"discriminator_warmup": 0})),
])
def test_advunlearn_and_doco_train_lora_adapters(method, extra, load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    base = weights(pipe)
    cfg = ErasureConfig(method=method, concept="red star", steps=2, sample_steps=2, lr=5e-2, parametrization="lora",
                        lora_rank=2, **extra)
    erase(pipe, cfg, tmp_path / method, progress=False)
    side = json.loads((tmp_path / method / SIDECAR_FILE).read_text())
    comp = "text_encoder" if method == "advunlearn" else "unet"
    assert side["lora"]["targets"] and all(t.startswith(comp + ".") for t in side["lora"]["targets"])
    sd = load_file(str(tmp_path / method / LORA_FILE))
    assert all(k.startswith(comp + ".") for k in sd)
    want = merged_by_hand(base, tmp_path / method / LORA_FILE, 1.0)
    live = weights(pipe)
    assert any(not torch.equal(live[q], base[q]) for q in live)
    for q in want:
        torch.testing.assert_close(live[q], want[q], rtol=0, atol=1e-6)
    assert pipe.unload_erasure() == 1
    assert all(torch.equal(v, base[q]) for q, v in weights(pipe).items())


def test_cli_lora_rank_writes_a_lora_artifact(tiny_paths, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["erase", "--model", str(tiny_paths["sd15"]), "--concept", "red star", "--steps", "1",
               "--sample-steps", "2", "--parameters", "esd-x-strict", "--lora-rank", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    side = json.loads((out / SIDECAR_FILE).read_text())
    assert side["lora"]["rank"] == 3 and side["hyperparameters"]["parametrization"] == "lora"
    capsys.readouterr()
    assert main(["erase", "--model", str(tiny_paths["sd15"]), "--concept", "x", "--lora-rank", "0", "--out",
                 str(tmp_path / "y")]) == 2
    assert "--lora-rank must be a positive integer, got 0" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# --- plain diffusers ----------------------------------------------------------------------------------
PLAIN = textwrap.dedent("""
    import sys, torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file
    base, lora, out, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    def run():
        g = torch.Generator().manual_seed(0)
        return pipe("a red star", num_inference_steps=steps, generator=g, output_type="latent").images
    res = {"base": run()}
    pipe.load_lora_weights(lora, adapter_name="erasure")
    res["w1"] = run()
    pipe.set_adapters(["erasure"], adapter_weights=[0.0])
    res["w0"] = run()
    pipe.set_adapters(["erasure"], adapter_weights=[0.5])
    res["w05"] = run()
    assert "diffkit" not in sys.modules, sorted(m for m in sys.modules if m.startswith("diffkit"))
    save_file({k: v.contiguous() for k, v in res.items()}, out)
""")


def test_plain_diffusers_loads_and_dials_the_erasure_lora(trained, tiny_paths, tmp_path):
    out = tmp_path / "plain.safetensors"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(tiny_paths["sd15"]), str(trained["out"]), str(out),
                           str(STEPS), str(torch.get_num_threads())],
                          capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = load_file(str(out))
    assert torch.equal(got["base"], trained["base_lat"])
    assert torch.equal(got["w0"], got["base"])  # adapter weight 0: the base model, bit for bit
    assert not torch.equal(got["w1"], got["base"])
    # weight 1: diffkit's merged erasure (unfused LoRA vs merged weights: float round-off only)
    torch.testing.assert_close(got["w1"], trained["erased_lat"], rtol=1e-4, atol=1e-4)
    d_half = (got["w05"] - got["base"]).abs().mean()
    d_full = (got["w1"] - got["base"]).abs().mean()
    assert 0 < d_half < d_full  # the dial: half the adapter moves the output less than all of it


# --- the LoRA-vs-full benchmark's comparison (benchmarks/erasure_lora.py) ------------------------------
def test_benchmark_pairs_each_lora_setting_with_full_fine_tuning():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    import erasure_lora as bench

    from diffkit.evaluation import paired_difference

    assert bench.split("esd-r16") == ("esd", 16) and bench.split("advunlearn-full") == ("advunlearn", None)
    full = {"ua": [1, 1, 1, 1, 0, 1, 1, 1], "ua_synonyms": [1] * 8, "ira": [1, None, 0, 1, 1, 1, None, 1],
            "cra": [[2, 2], [1, 2], [2, 2], [0, 0], [2, 2], [2, 2], [1, 2], [2, 2]]}
    r4 = {"ua": [1, 0, 1, 1, 0, 1, 0, 1], "ua_synonyms": [1] * 8, "ira": [1, 1, None, 1, 0, 1, 1, 1],
          "cra": [[2, 2], [2, 2], [2, 2], [0, 0], [1, 2], [2, 2], [2, 2], [2, 2]]}
    details = {"esd-full-red": {"report": {"outcomes": full}}, "esd-r4-red": {"report": {"outcomes": r4}}}
    comps = bench.comparisons(details, ["red"], ["esd-full", "esd-r4"])
    c = comps["esd-r4-red"]
    assert c["ua"] == paired_difference(r4["ua"], full["ua"]).to_json()
    assert c["ua"]["difference"] == pytest.approx(-2 / 8)
    both = [i for i in range(8) if full["ira"][i] is not None and r4["ira"][i] is not None]  # pairs scored twice
    assert c["ira"]["n"] == len(both) == 5
    assert c["cra"]["n"] == 7  # the image that scores no other factor is left out
    lo, hi = c["ua"]["ci95"]
    assert c["verdict_ua_within_5pt"] == ("met" if lo >= -0.05 else "missed" if hi < -0.05 else
                                         "not resolved at this n")
    assert "esd-full-red" not in comps
