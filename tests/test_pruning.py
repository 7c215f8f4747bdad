"""Structural pruning: hard-concrete masks, masking processor/hooks, surgery exactness, binarization, specs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import diffkit
from diffkit.pruning import (
    BaseModelMismatch,
    HardConcrete,
    KeepRatios,
    MaskAttachment,
    MaskedAttnProcessor2_0,
    ZeroAttention,
    ZeroFeedForward,
    ZeroResnet,
    binarize,
    binary_masks,
    find_units,
    kept_fractions,
    make_spec,
    parameter_reduction,
    parameter_shares,
    prune_unet,
    read_spec,
    round_count,
    save_pruning,
    unet_macs,
    unet_parameters,
    unit_param_costs,
)
from diffkit.zoo import build_tiny_pipeline


def unet_inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    kw = {"encoder_hidden_states": torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                   "time_ids": torch.rand(batch, 6, generator=g) * 64}
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor(437), kw


def random_kept(units, seed=0, kinds=("heads", "ffn", "channels"), zero_every=4):
    """Random kept subsets; every ``zero_every``-th module of a kind keeps nothing (zero-unit case)."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for i, u in enumerate(units):
        if u.kind not in kinds:
            continue
        k = 0 if i % zero_every == 0 else int(torch.randint(1, u.size + 1, (1,), generator=g))
        kept[u.name] = sorted(torch.randperm(u.size, generator=g)[:k].tolist())
    return kept


@pytest.fixture(scope="module")
def tiny():
    return {fam: build_tiny_pipeline(fam, seed=0) for fam in ("sd15", "sdxl")}


# ---------------------------------------------------------------- hard concrete


def test_hard_concrete_matches_formula():
    hc = HardConcrete()
    assert (hc.temperature, hc.gamma, hc.zeta, hc.init) == (0.83, -0.1, 1.1, 3.0)
    lam = torch.tensor([-4.0, -0.5, 0.0, 1.0, 3.0])
    u = torch.tensor([0.3, 0.9, 0.5, 0.01, 0.6])
    s = 1 / (1 + torch.exp(-(torch.log(u) - torch.log(1 - u) + lam) / 0.83))
    expected = torch.clamp(s * 1.2 - 0.1, 0, 1)
    torch.testing.assert_close(hc.sample(lam, u), expected)
    torch.testing.assert_close(hc.deterministic(lam), torch.clamp(torch.sigmoid(lam) * 1.2 - 0.1, 0, 1))
    torch.testing.assert_close(hc.expected_l0(lam), torch.sigmoid(lam - 0.83 * math.log(0.1 / 1.1)))
    # exact zeros and ones occur (that is what the stretch is for)
    assert hc.sample(torch.tensor([-4.0]), torch.tensor([0.3])).item() == 0.0
    assert hc.sample(torch.tensor([3.0]), torch.tensor([0.6])).item() == 1.0
    # init 3: every unit is almost surely kept
    assert hc.expected_l0(torch.tensor(3.0)).item() > 0.99


@pytest.mark.parametrize("kw,msg", [({"temperature": 0.0}, "temperature must be > 0"),
                                    ({"gamma": 0.1}, "gamma < 0 < 1 < zeta"), ({"zeta": 0.9}, "gamma < 0 < 1 < zeta")])
def test_hard_concrete_rejects_bad_values(kw, msg):
    with pytest.raises(ValueError, match=msg):
        HardConcrete(**kw)


# ---------------------------------------------------------------- units and masks


def test_find_units_by_name_and_kind(tiny):
    unet = tiny["sd15"].unet
    units = find_units(unet)
    by_kind = {k: [u for u in units if u.kind == k] for k in ("heads", "ffn", "channels")}
    # sd15 tiny: 5 transformer blocks (2 down + 3 up... at two levels) -> attn1 + attn2 each, one FFN each
    n_blocks = sum(1 for n, _ in unet.named_modules() if n.endswith("transformer_blocks.0"))
    assert len(by_kind["heads"]) == 2 * n_blocks and len(by_kind["ffn"]) == n_blocks
    n_res = sum(1 for n, _ in unet.named_modules() if ".resnets." in n and n.split(".")[-2] == "resnets")
    assert len(by_kind["channels"]) == n_res
    for u in units:
        m = unet.get_submodule(u.name)
        if u.kind == "heads":
            assert (u.size, u.width) == (m.heads, m.inner_dim // m.heads)
        elif u.kind == "ffn":
            assert (u.size, u.width) == (m.net[2].in_features, 1)
        else:
            assert (u.size, u.width) == (m.norm2.num_groups, m.norm2.num_channels // m.norm2.num_groups)
    with pytest.raises(ValueError, match="unit kinds must be among"):
        find_units(unet, ("neurons",))


def test_masked_processor_computes_attention_once_and_scales_heads(tiny, monkeypatch):
    unet = copy.deepcopy(tiny["sd15"].unet)
    units = find_units(unet, ("heads",))
    name = units[0].name
    attn = unet.get_submodule(name)
    x = torch.randn(2, 16, attn.to_q.in_features)
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    mask = torch.linspace(0, 1, attn.heads)
    with MaskAttachment(unet, units) as att:
        assert isinstance(attn.processor, MaskedAttnProcessor2_0)
        att.state.masks = {name: mask}
        with torch.no_grad():
            out = attn(x)
    assert len(calls) == 1
    # written out: per-head SDPA, scale head h by mask[h], concatenate, to_out
    h, d = attn.heads, attn.inner_dim // attn.heads
    with torch.no_grad():
        q, k, v = (lin(x).view(2, 16, h, d).transpose(1, 2) for lin in (attn.to_q, attn.to_k, attn.to_v))
        heads = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v  # (2, h, 16, d)
        heads = heads * mask[None, :, None, None]
        expected = attn.to_out[0](heads.transpose(1, 2).reshape(2, 16, h * d))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert type(attn.processor).__name__ == "AttnProcessor2_0"  # restored on detach


def test_ones_masks_and_detach_are_bit_identical(tiny):
    unet = tiny["sdxl"].unet
    units = find_units(unet)
    x, t, kw = unet_inputs(unet)
    with torch.no_grad():
        before = unet(x, t, **kw).sample
        with MaskAttachment(unet, units) as att:
            att.state.masks = {u.name: torch.ones(u.size) for u in units}
            masked_ones = unet(x, t, **kw).sample
        after = unet(x, t, **kw).sample
    assert torch.equal(before, masked_ones) and torch.equal(before, after)
    assert not any(m._forward_pre_hooks for m in unet.modules())


# ---------------------------------------------------------------- surgery exactness


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("kinds", [("heads",), ("ffn",), ("channels",), ("heads", "ffn", "channels")])
def test_pruned_unet_reproduces_binary_masked_unet(tiny, family, kinds):
    unet = tiny[family].unet
    units = find_units(unet)
    kept = random_kept(units, seed=len(kinds), kinds=kinds)
    x, t, kw = unet_inputs(unet)
    with torch.no_grad():
        with MaskAttachment(unet, units) as att:
            att.state.masks = binary_masks(units, kept)
            masked = unet(x, t, **kw).sample
        slim = copy.deepcopy(unet)
        changed = prune_unet(slim, units, kept)
        pruned = slim(x, t, **kw).sample
        full = unet(x, t, **kw).sample
    assert changed, "the test must prune something"
    assert (masked - full).abs().max() > 1e-2  # the masks do change the output
    assert (pruned - masked).abs().max().item() <= 1e-5
    assert unet_parameters(slim) < unet_parameters(unet)
    # slicing updated the attention bookkeeping
    for name, m in changed.items():
        if hasattr(m, "heads"):
            assert m.heads == len(kept[name]) == m.sliceable_head_dim
            assert m.to_q.out_features == m.inner_dim == m.heads * (unet.get_submodule(name).inner_dim
                                                                    // unet.get_submodule(name).heads)


def test_geglu_paired_rows_are_sliced(tiny):
    unet = copy.deepcopy(tiny["sd15"].unet)
    u = next(u for u in find_units(unet) if u.kind == "ffn")
    ff = unet.get_submodule(u.name)
    w = ff.net[0].proj.weight.detach().clone()
    keep = [3, 17, 64, 100]
    prune_unet(unet, [u], {u.name: keep})
    ff = unet.get_submodule(u.name)
    inner = u.size
    assert torch.equal(ff.net[0].proj.weight, w[[*keep, *(k + inner for k in keep)]])
    assert ff.net[2].in_features == 4 and ff.net[0].proj.out_features == 8


def test_zero_unit_modules_return_their_output_bias(tiny):
    unet = copy.deepcopy(tiny["sd15"].unet)
    units = find_units(unet)
    pick = {k: next(u for u in units if u.kind == k) for k in ("heads", "ffn", "channels")}
    originals = {k: copy.deepcopy(unet.get_submodule(u.name)) for k, u in pick.items()}
    changed = prune_unet(unet, units, {u.name: [] for u in pick.values()})
    za, zf, zr = (changed[pick[k].name] for k in ("heads", "ffn", "channels"))
    assert isinstance(za, ZeroAttention) and isinstance(zf, ZeroFeedForward) and isinstance(zr, ZeroResnet)
    h = torch.randn(2, 5, originals["heads"].to_out[0].in_features)
    assert torch.equal(za(h), originals["heads"].to_out[0].bias.expand(2, 5, -1))
    h = torch.randn(2, 5, originals["ffn"].net[0].proj.in_features)
    assert torch.equal(zf(h), originals["ffn"].net[2].bias.expand(2, 5, -1))
    res = originals["channels"]
    xin = torch.randn(2, res.conv1.in_channels, 8, 8)
    short = xin if res.conv_shortcut is None else res.conv_shortcut(xin)
    expected = (short + res.conv2.bias[None, :, None, None]) / res.output_scale_factor
    with torch.no_grad():
        torch.testing.assert_close(zr(xin, torch.randn(2, 128)), expected)
    # and the zero modules hold only the bias (and the shortcut)
    for k, m in (("heads", za), ("ffn", zf), ("channels", zr)):
        fixed, per, empty = unit_param_costs(tiny["sd15"].unet, pick[k])
        assert sum(p.numel() for p in m.parameters()) == empty


def test_unit_param_costs_match_surgery(tiny):
    for fam in ("sd15", "sdxl"):
        unet = tiny[fam].unet
        units = find_units(unet)
        kept = random_kept(units, seed=5)
        costs = {u.name: unit_param_costs(unet, u) for u in units}
        slim = copy.deepcopy(unet)
        prune_unet(slim, units, kept)
        assert unet_parameters(slim) == unet_parameters(unet) - parameter_reduction(kept, units, costs)


def test_prune_unet_rejects_unknown_modules_and_indices(tiny):
    unet = copy.deepcopy(tiny["sd15"].unet)
    units = find_units(unet)
    with pytest.raises(ValueError, match="not prunable units"):
        prune_unet(unet, units, {"conv_in": [0]})
    with pytest.raises(ValueError, match=r"must lie in \[0, 8\)"):
        prune_unet(unet, units, {units[0].name: [0, 8]})


# ---------------------------------------------------------------- binarization


def test_round_count_to_multiples():
    from diffkit.pruning import Unit

    ffn = Unit("ff", "ffn", 1280, 1)
    assert [round_count(k, ffn, 8) for k in (0, 3, 4, 12, 1279)] == [0, 0, 8, 16, 1280]
    head40 = Unit("a", "heads", 8, 40)  # 40-wide heads are always multiples of 8
    assert [round_count(k, head40, 8) for k in (1, 5)] == [1, 5]
    groups10 = Unit("r", "channels", 32, 10)  # 10 channels per group -> steps of 4 groups (40 channels)
    assert [round_count(k, groups10, 8) for k in (1, 2, 5, 31)] == [0, 4, 4, 32]
    assert round_count(7, ffn, 1) == 7
    with pytest.raises(ValueError, match="multiple must be >= 1, got 0"):
        round_count(3, ffn, 0)


def test_binarize_global_topk_per_kind(tiny):
    unet = tiny["sd15"].unet
    units = find_units(unet)
    g = torch.Generator().manual_seed(0)
    scores = {u.name: torch.randn(u.size, generator=g) for u in units}
    keep = KeepRatios(heads=0.5, ffn=0.75, channels=1.0)
    kept = binarize(scores, units, keep, multiple=1)
    for kind, ratio in keep.as_dict().items():
        group = [u for u in units if u.kind == kind]
        n = sum(u.size for u in group)
        assert sum(len(kept[u.name]) for u in group) == round(ratio * n)
        # global: every kept score beats every dropped score of that kind
        kept_s = [scores[u.name][i] for u in group for i in kept[u.name]]
        drop_s = [scores[u.name][i] for u in group for i in set(range(u.size)) - set(kept[u.name])]
        if drop_s:
            assert min(kept_s) >= max(drop_s)
    assert kept_fractions(kept, units) == pytest.approx({"heads": 0.5, "ffn": 0.75, "channels": 1.0}, abs=1e-3)
    kept8 = binarize(scores, units, keep, multiple=8)
    for u in units:
        assert (len(kept8[u.name]) * u.width) % 8 == 0 or len(kept8[u.name]) == u.size


def test_binarize_target_reduction(tiny):
    unet = tiny["sdxl"].unet
    units = find_units(unet)
    g = torch.Generator().manual_seed(1)
    scores = {u.name: torch.randn(u.size, generator=g) for u in units}
    costs = {u.name: unit_param_costs(unet, u) for u in units}
    total = unet_parameters(unet)
    for target in (0.1, 0.2, 0.3):
        kept = binarize(scores, units, target_reduction=target, unet=unet)
        red = parameter_reduction(kept, units, costs) / total
        assert target <= red < target + 0.05
    with pytest.raises(ValueError, match="exactly one of keep"):
        binarize(scores, units)
    with pytest.raises(ValueError, match=r"target_reduction must be in \[0, 1\), got 1.5"):
        binarize(scores, units, target_reduction=1.5, unet=unet)
    with pytest.raises(ValueError, match="unreachable"):
        binarize(scores, [u for u in units if u.kind == "heads"], target_reduction=0.9, unet=unet)
    with pytest.raises(ValueError, match="keep ratio ffn must be in"):
        KeepRatios(ffn=1.2)
    with pytest.raises(ValueError, match="no scores"):
        binarize({}, units, KeepRatios())


# ---------------------------------------------------------------- stats


def test_macs_meta_count_equals_real_count_and_drops(tiny):
    """Meta MACs = MACs counted on a real CPU run + the attention products QK^T and AV (the fused CPU SDPA
    kernel is invisible to FlopCounterMode; on meta SDPA decomposes into counted bmm's)."""
    from diffusers.models.attention_processor import Attention
    from torch.utils.flop_counter import FlopCounterMode

    unet = tiny["sd15"].unet
    x, t, kw = unet_inputs(unet, batch=1)
    kw["encoder_hidden_states"] = torch.randn(1, 77, unet.config.cross_attention_dim)
    attention_macs = []

    def count(module, args, kwargs):
        sq = args[0].shape[1]
        enc = kwargs.get("encoder_hidden_states")
        sk = sq if enc is None else enc.shape[1]
        attention_macs.append(2 * sq * sk * module.inner_dim)  # QK^T and AV, batch 1

    hooks = [m.register_forward_pre_hook(count, with_kwargs=True) for m in unet.modules() if isinstance(m, Attention)]
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, **kw)
    for h in hooks:
        h.remove()
    assert unet_macs(unet) == counter.get_total_flops() // 2 + sum(attention_macs)
    slim = copy.deepcopy(unet)
    units = find_units(unet)
    prune_unet(slim, units, random_kept(units, seed=2))
    assert 0 < unet_macs(slim) < unet_macs(unet)


def test_parameter_shares_of_full_sd15_architecture():
    from diffkit.zoo import build_full_unet

    shares = parameter_shares(build_full_unet("sd15", device="meta"))
    # PAPERS.md (EcoDiff): resnets 62.6%, FFN 17.3%, self-attention 5.8%, cross-attention 5.1%
    assert shares["resnets"] == pytest.approx(0.626, abs=0.001)
    assert shares["ffn"] == pytest.approx(0.173, abs=0.001)
    assert shares["self_attention"] == pytest.approx(0.058, abs=0.001)
    assert shares["cross_attention"] == pytest.approx(0.051, abs=0.001)
    assert shares["total_params"] == 859_520_964


# ---------------------------------------------------------------- spec directory and pipeline


def test_spec_round_trip_load_and_unload(tiny_paths, load_tiny, tmp_path, gen):
    pipe = load_tiny("sd15")
    units = find_units(pipe.unet)
    kept = random_kept(units, seed=3)
    spec = save_pruning(tmp_path / "spec", pipe.unet, kept, config={"note": "test"})
    assert sorted(p.name for p in (tmp_path / "spec").iterdir()) == ["pruned.safetensors", "spec.json"]
    on_disk = json.loads((tmp_path / "spec" / "spec.json").read_text())
    assert on_disk["kept"] == spec.kept and on_disk["format"] == "diffkit.pruning/2"
    assert spec.stats["params_after"] < spec.stats["params_before"]
    assert spec.stats["macs_after"] < spec.stats["macs_before"]
    _, slim = make_spec(pipe.unet, kept, macs=False)
    x, t, kw = unet_inputs(pipe.unet)
    with torch.no_grad():
        full = pipe.unet(x, t, **kw).sample
        expected = slim(x, t, **kw).sample
    full_image = pipe("a red star", num_inference_steps=2, generator=gen(0), output_type="np").images

    fresh = load_tiny("sd15")
    loaded = fresh.load_pruning(tmp_path / "spec")
    assert loaded.kept == spec.kept and fresh.pruning_spec is loaded
    assert unet_parameters(fresh.unet) == spec.stats["params_after"]
    with torch.no_grad():
        assert torch.equal(fresh.unet(x, t, **kw).sample, expected)
    pruned_image = fresh("a red star", num_inference_steps=2, generator=gen(0), output_type="np").images
    assert pruned_image.shape == full_image.shape == (1, 64, 64, 3)
    with pytest.raises(RuntimeError, match="already loaded"):
        fresh.load_pruning(tmp_path / "spec")
    fresh.unload_pruning()
    with torch.no_grad():
        assert torch.equal(fresh.unet(x, t, **kw).sample, full)
    again = fresh("a red star", num_inference_steps=2, generator=gen(0), output_type="np").images
    assert (again == full_image).all()
    with pytest.raises(RuntimeError, match="no pruning spec is loaded"):
        fresh.unload_pruning()
    fresh.load_pruning(tmp_path / "spec", keep_original=False)
    with pytest.raises(RuntimeError, match="keep_original=False"):
        fresh.unload_pruning()


def test_spec_weights_are_loaded_from_safetensors(load_tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    pipe = load_tiny("sd15")
    units = find_units(pipe.unet)
    kept = random_kept(units, seed=4)
    save_pruning(tmp_path, pipe.unet, kept, macs=False)
    tensors = load_file(str(tmp_path / "pruned.safetensors"))
    key = next(k for k in tensors if k.endswith("to_q.weight"))
    tensors[key] = tensors[key] + 1.0  # e.g. a fine-tuned slim model: the file wins over base slices
    save_file(tensors, str(tmp_path / "pruned.safetensors"))
    fresh = load_tiny("sd15")
    fresh.load_pruning(tmp_path)
    module = key[: -len(".to_q.weight")]
    assert torch.equal(fresh.unet.get_submodule(module).to_q.weight, tensors[key])


def test_wrong_base_is_a_clear_error(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    units = find_units(pipe.unet)
    save_pruning(tmp_path, pipe.unet, random_kept(units, seed=6), macs=False)
    with pytest.raises(BaseModelMismatch, match="made for a different base model .*: this pipeline's unet has a "
                       "different architecture"):
        load_tiny("sdxl").load_pruning(tmp_path)
    other = diffkit.to_diffkit(build_tiny_pipeline("sd15", seed=1))  # same architecture, other weights
    with pytest.raises(BaseModelMismatch, match=r"was made for a different base model \(fingerprint [0-9a-f]{16}\): "
                       r"tensor unet\.\S+ differs from the one it was trained from"):
        other.load_pruning(tmp_path)
    # nothing was changed by the failed loads
    assert other.pruning_spec is None and unet_parameters(other.unet) == unet_parameters(pipe.unet)
    with pytest.raises(FileNotFoundError, match="missing spec.json"):
        pipe.load_pruning(tmp_path / "nowhere")
    (tmp_path / "spec.json").write_text(json.dumps({"format": "something/else"}))
    with pytest.raises(ValueError, match=r"spec.json is not a diffkit.pruning file \(format 'something/else'"):
        read_spec(tmp_path)


def test_fp16_base_loads_spec_made_in_fp32(load_tiny, tmp_path):
    pipe = load_tiny("sd15")
    units = find_units(pipe.unet)
    save_pruning(tmp_path, pipe.unet, random_kept(units, seed=7), macs=False)
    half = load_tiny("sd15").to(dtype=torch.float16)
    half.load_pruning(tmp_path)
    assert all(p.dtype == torch.float16 for p in half.unet.parameters())


def test_sd2_all_kinds_exact(load_tiny):
    """SD 2.x (linear projections, per-level head counts, v-prediction) prunes exactly too."""
    unet = load_tiny("sd2").unet
    units = find_units(unet)
    assert {u.kind for u in units} == {"heads", "ffn", "channels"}
    kept = random_kept(units, seed=9)
    x, t, kw = unet_inputs(unet)
    with torch.no_grad():
        with MaskAttachment(unet, units) as att:
            att.state.masks = binary_masks(units, kept)
            masked = unet(x, t, **kw).sample
        prune_unet(unet, units, kept)
        assert (unet(x, t, **kw).sample - masked).abs().max().item() <= 1e-5


def test_parameter_shares_of_full_sdxl_architecture():
    from diffkit.zoo import build_full_unet

    shares = parameter_shares(build_full_unet("sdxl", device="meta"))
    # PAPERS.md (EcoDiff): FFN 47.9%, attention 37.3%, resnets 12.8%
    assert shares["ffn"] == pytest.approx(0.479, abs=0.001)
    assert shares["self_attention"] + shares["cross_attention"] == pytest.approx(0.373, abs=0.002)
    assert shares["resnets"] == pytest.approx(0.128, abs=0.001)


def test_atomic_writes_leave_the_old_file_on_failure(tmp_path):
    from diffkit.pruning.spec import atomic_save_safetensors, atomic_write_json

    atomic_write_json(tmp_path / "spec.json", {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "spec.json", {"a": object()})
    assert json.loads((tmp_path / "spec.json").read_text()) == {"a": 1}
    atomic_save_safetensors(tmp_path / "w.safetensors", {"x": torch.ones(2)})
    with pytest.raises(Exception):  # noqa: B017 - safetensors raises its own error type for non-tensors
        atomic_save_safetensors(tmp_path / "w.safetensors", {"x": "not a tensor"})
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["x"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json", "w.safetensors"]  # no temp files left
