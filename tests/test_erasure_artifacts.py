"""erase() end to end on tiny models: artifacts, sidecar, load / unload / stack, fingerprint errors."""

from __future__ import annotations

import json

import pytest
import torch

from diffkit.erasure import ErasureConfig, erase, read_artifact
from diffkit.erasure.artifact import SIDECAR_FILE, tensor_checksum
from diffkit.zoo import save_tiny_pipeline


def _state(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def _esd(**kw):
    return ErasureConfig(**{**dict(method="esd", concept="red star", steps=2, sample_steps=2, lr=1e-3,
                                   checkpoint_every=1), **kw})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_paths):
    """Three ESD artifacts on the sd15 tiny model: esd-x-strict, esd-u (disjoint), esd-x (overlaps)."""
    import diffkit

    root = tmp_path_factory.mktemp("erasure")
    out = {}
    for params in ("esd-x-strict", "esd-u", "esd-x"):
        pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
        out[params] = erase(pipe, _esd(parameters=params), root / params, progress=False)
    return out


def test_artifact_holds_only_the_trained_tensors(artifacts, load_tiny):
    result = artifacts["esd-x-strict"]
    art = read_artifact(result.path)
    pipe = load_tiny("sd15")
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    expected = sorted(f"unet.{n}.{k}.weight" for n in attn2 for k in ("to_k", "to_v"))
    assert sorted(art.tensors) == sorted(art.names) == expected
    assert all(art.encoding(q) == "dense" and art.mask(q) is None for q in expected)
    side = art.sidecar
    assert side["method"] == "esd" and side["concept"] == ["red star"] and side["anchor"] == ""
    assert side["seed"] == 0 and side["hyperparameters"]["eta"] == 1.0
    assert side["hyperparameters"]["parameters"] == "esd-x-strict"
    assert len(side["metrics"]["losses"]) == 2 and side["metrics"]["trained_tensors"] == len(expected)
    assert side["base_model"]["components"].keys() == {"unet"}
    # The fingerprint's checksums are the base model's tensors (float32 / half casts).
    q = expected[0]
    p = pipe.unet.get_parameter(q[5:])
    sums = side["base_model"]["tensors"][q]
    assert sums["float32"] == tensor_checksum(p) and sums["float16"] == tensor_checksum(p.half())
    assert not (result.path / "checkpoint").exists()
    assert side["storage_bytes"] == (result.path / "erasure.safetensors").stat().st_size


def test_training_leaves_pipeline_erased_and_unload_restores(tiny_paths, tmp_path):
    import diffkit

    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    before = _state(pipe)
    result = erase(pipe, _esd(parameters="esd-x-strict"), tmp_path / "a", progress=False)
    art = read_artifact(result.path)
    now = _state(pipe)
    changed = sorted(k for k in before if not torch.equal(before[k], now[k]))
    assert changed == sorted(art.tensors)
    assert all(torch.equal(now[k], art.tensors[k]) for k in art.tensors)
    assert pipe.unload_erasure() == 1
    assert all(torch.equal(before[k], v) for k, v in _state(pipe).items())


def test_load_unload_is_bit_identical_and_stacks(artifacts, load_tiny):
    pipe = load_tiny("sd15")
    before = _state(pipe)
    strict, u, x = (artifacts[k].path for k in ("esd-x-strict", "esd-u", "esd-x"))
    side = pipe.load_erasure(strict)
    assert side["method"] == "esd"
    pipe.load_erasure(u)  # disjoint tensors: stacks
    now = _state(pipe)
    for path in (strict, u):
        art = read_artifact(path)
        assert all(torch.equal(now[k], art.tensors[k]) for k in art.tensors)
    untouched = set(before) - set(read_artifact(strict).tensors) - set(read_artifact(u).tensors)
    assert all(torch.equal(now[k], before[k]) for k in untouched)
    assert [e.path for e in pipe.loaded_erasures] == [str(strict), str(u)]
    n_strict = len(read_artifact(strict).tensors)  # esd-x contains all of esd-x-strict's tensors
    with pytest.raises(ValueError, match=rf"overlaps the loaded erasure .*esd-x-strict.* on {n_strict} tensor\(s\)"):
        pipe.load_erasure(x)
    assert pipe.unload_erasure() == 2
    assert all(torch.equal(before[k], v) for k, v in _state(pipe).items())
    assert pipe.unload_erasure() == 0


def test_images_change_after_load_and_return_after_unload(artifacts, load_tiny, gen):
    pipe = load_tiny("sd15")
    kw = dict(num_inference_steps=2, output_type="np")
    base = pipe("red star", generator=gen(0), **kw).images
    pipe.load_erasure(artifacts["esd-x"].path)
    erased = pipe("red star", generator=gen(0), **kw).images
    pipe.unload_erasure()
    again = pipe("red star", generator=gen(0), **kw).images
    assert abs(base - erased).max() > 0
    assert (base == again).all()


def test_wrong_base_model_is_a_clear_error(artifacts, load_tiny, tmp_path):
    import diffkit

    other = diffkit.DiffusionPipeline.from_pretrained(save_tiny_pipeline(tmp_path / "seed1", "sd15", seed=1))
    with pytest.raises(ValueError, match=r"was made for a different base model \(fingerprint [0-9a-f]{16}\): "
                                         r"tensor unet\..*attn2.to_k.weight differs"):
        other.load_erasure(artifacts["esd-x-strict"].path)
    assert other.loaded_erasures == []
    sd2 = load_tiny("sd2")
    with pytest.raises(ValueError, match="this pipeline's unet has a different architecture"):
        sd2.load_erasure(artifacts["esd-x-strict"].path)


def test_half_precision_pipeline_recognises_its_base(artifacts, load_tiny):
    pipe = load_tiny("sd15").to(torch.float16)
    before = _state(pipe)
    pipe.load_erasure(artifacts["esd-x-strict"].path)
    art = read_artifact(artifacts["esd-x-strict"].path)
    q = sorted(art.tensors)[0]
    assert torch.equal(_state(pipe)[q], art.tensors[q].half())
    pipe.unload_erasure()
    assert all(torch.equal(before[k], v) for k, v in _state(pipe).items())


def test_bad_artifact_folders(tmp_path, load_tiny, artifacts):
    pipe = load_tiny("sd15")
    with pytest.raises(ValueError, match="is not a directory"):
        pipe.load_erasure(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not an erasure artifact: erasure.json is missing"):
        pipe.load_erasure(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / SIDECAR_FILE).write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(ValueError, match=r"erasure.json is not a diffkit.erasure file \(format 'other/9', "
                                         r"expected 'diffkit.erasure/1'\)"):
        pipe.load_erasure(bad)
    (bad / SIDECAR_FILE).write_text((artifacts["esd-u"].path / SIDECAR_FILE).read_text())
    with pytest.raises(ValueError, match="lacks erasure.safetensors"):
        pipe.load_erasure(bad)
    import shutil

    shutil.copy(artifacts["esd-x"].path / "erasure.safetensors", bad / "erasure.safetensors")
    with pytest.raises(ValueError, match="erasure.safetensors and erasure.json disagree on tensors"):
        pipe.load_erasure(bad)
    assert pipe.loaded_erasures == []


def test_finished_job_is_skipped_and_a_different_config_refused(artifacts, load_tiny):
    result = artifacts["esd-u"]
    pipe = load_tiny("sd15")
    again = erase(pipe, _esd(parameters="esd-u"), result.path, progress=False)
    assert again.status == "skipped" and [e.path for e in pipe.loaded_erasures] == [str(result.path)]
    pipe.unload_erasure()
    with pytest.raises(ValueError, match="already holds an erasure artifact with a different job config"):
        erase(pipe, _esd(parameters="esd-u", steps=3), result.path, progress=False)


def test_unsupported_pipelines_and_states(load_tiny, artifacts, tmp_path):
    sdxl = load_tiny("sdxl")  # SDXL runs esd, salun and advunlearn (tests/test_erasure_sdxl.py); not LoRA yet
    with pytest.raises(ValueError, match="parametrization 'lora' does not support SDXL pipelines"):
        erase(sdxl, _esd(parametrization="lora", lora_rank=2), tmp_path / "x", progress=False)
    pipe = load_tiny("sd15")
    pipe.load_erasure(artifacts["esd-u"].path)
    with pytest.raises(ValueError, match=r"has erasures loaded; call pipe.unload_erasure\(\) before"):
        erase(pipe, _esd(), tmp_path / "y", progress=False)
    with pytest.raises(ValueError, match="batch_size must be a multiple of the number of processes"):
        from diffkit.erasure.engine import make_accelerator

        acc = make_accelerator("no")
        acc.state.num_processes = 3  # a stand-in for a 3-process launch
        try:
            erase(load_tiny("sd15"), _esd(batch_size=2), tmp_path / "z", accelerator=acc, progress=False)
        finally:
            acc.state.num_processes = 1


def test_failed_job_restores_the_weights(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    before = _state(pipe)
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    with pytest.raises(ValueError, match=r"parameters \['nothing'\] select no tensor"):
        erase(pipe, _esd(parameters=["nothing"]), tmp_path / "f", progress=False)
    # A failure during training (here: a resolution the VAE cannot make) leaves the base model intact.
    with pytest.raises(ValueError, match="resolution must be a multiple of the VAE factor 8, got 60"):
        erase(pipe, _esd(resolution=60), tmp_path / "g", progress=False)
    assert all(torch.equal(before[k], v) for k, v in _state(pipe).items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_salun_changes_only_salient_weights(load_tiny, tmp_path):
    from diffkit.erasure.engine import TrainingContext, make_accelerator
    from diffkit.erasure.salun import SalUn
    from diffkit.erasure.selection import select_parameters

    cfg = ErasureConfig(method="salun", concept="red star", retain_prompts=["green square"], num_images=2,
                        batch_size=2, sample_steps=2, steps=2, lr=1e-2)
    ref = load_tiny("sd15")
    ctx = TrainingContext(ref, cfg, make_accelerator("no"))
    method = SalUn(cfg)
    masks = method.prepare(ctx, select_parameters(ctx.components, "unet-all"))
    pipe = load_tiny("sd15")
    before = _state(pipe)
    result = erase(pipe, cfg, tmp_path / "salun", progress=False)
    art = read_artifact(result.path)
    assert sorted(art.names) == sorted(masks) == sorted(method.masks)
    trained = _state(pipe)  # erase() leaves the pipeline erased
    changed_total, stored_values = 0, 0
    for q, m in method.masks.items():
        changed = before[q] != trained[q]
        assert not (changed & ~m.cpu()).any(), q  # nothing outside the mask moves
        changed_total += int(changed.sum())
        # Stored: only the masked values and the mask as bits; together with the base they give the weights.
        assert art.encoding(q) == "masked" and torch.equal(art.mask(q), m.cpu())
        assert art.tensors["masked_values/" + q].numel() == int(m.sum())
        assert art.tensors["masked_bits/" + q].numel() == -(-m.numel() // 8)
        assert torch.equal(art.materialize(q, before[q]), trained[q])
        stored_values += int(m.sum())
    weights = sum(before[q].numel() for q in method.masks)
    assert result.sidecar["metrics"]["trained_weights"] == weights
    assert art.sidecar["storage_bytes"] < 0.6 * 4 * weights  # ~ 4 bytes x half + 1 bit each, vs 4 bytes each
    pipe.unload_erasure()
    pipe.load_erasure(result.path)
    assert all(torch.equal(v, trained[k]) for k, v in _state(pipe).items())
    salient = result.sidecar["metrics"]["salient_weights"]
    assert salient == sum(int(m.sum()) for m in method.masks.values())
    assert result.sidecar["metrics"]["salient_fraction"] == pytest.approx(0.5, abs=1e-6)
    assert changed_total > 0.9 * salient
