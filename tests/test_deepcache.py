"""DeepCache on bare U-Nets: the cached step's program, exactness, the deep feature, step indexing, errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers import ControlNetModel, DDIMScheduler, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from diffkit.cache import (
    DeepCacheConfig,
    apply_deepcache,
    branch_plan,
    cached_step_mac_ratio,
    deepcache_config,
    deepcache_stats,
    describe_branch,
    num_branches,
    remove_deepcache,
    reset_deepcache,
    shallow_forward,
    unet_macs,
)
from diffkit.cache.cost import example_inputs
from diffkit.cache.hook import CAPTURE_HOOK_NAME, HOOK_NAME, _CaptureHook, _registry, _source_module
from diffkit.zoo import tiny_unet_config


@pytest.fixture(scope="module")
def unets():
    out = {}
    for fam in ("sd15", "sd2", "sdxl"):
        torch.manual_seed(0)
        out[fam] = UNet2DConditionModel(**tiny_unet_config(fam)).eval()
    return out


def _inputs(unet, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = example_inputs(unet, batch=batch, seq_len=7)
    for v in (inputs["sample"], inputs["encoder_hidden_states"], *inputs.get("added_cond_kwargs", {}).values()):
        v.copy_(torch.randn(v.shape, generator=g))
    return inputs


def _full_with_feature(unet, plan, inputs):
    keep = SimpleNamespace(feature=None)
    registry = _registry(_source_module(unet, plan))
    registry.register_hook(_CaptureHook(keep, plan.source), "test.capture")
    try:
        out = unet(**inputs).sample
    finally:
        registry.remove_hook("test.capture", recurse=False)
    return out, keep.feature


# ---------------------------------------------------------------------------------------------- branch table
def test_branch_numbering_matches_reference_helper(unets):
    unet = unets["sd15"]
    assert num_branches(unet) == 9  # 3 levels x 3 skips, the last level without downsampler, + conv_in
    for b in range(9):
        plan = branch_plan(unet, b)
        block, layer = divmod(b, 3)  # the helper's cache_block_id, cache_layer_id
        # down layers the helper runs: block_i < block, or block_i == block and layer_i < layer
        want = [(k, kind, i) for k, kind, i in
                [(k, "layer", i) for k in range(3) for i in range(2)] + [(0, "downsample", 0), (1, "downsample", 0)]
                if 3 * k + (2 if kind == "downsample" else i) < b]
        assert sorted(plan.down) == sorted(want)
        # up: the helper numbers up block (2 - k) as block k, resnet (2 - i) as layer i, and runs layer <= b
        assert (plan.up_block, plan.up_layer) == (2 - block, 2 - layer)
    assert describe_branch(unet, 0) == {
        "pre": ["time_proj", "time_embedding", "conv_in"],
        "down": [],
        "up": ["up_blocks.2.resnets.2", "up_blocks.2.attentions.2"],
        "post": ["conv_norm_out", "conv_act", "conv_out"],
        "deep_feature": "up_blocks.2.attentions.1",
    }
    assert describe_branch(unet, 8)["deep_feature"] == "up_blocks.0 (its hidden_states input)"


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_shallow_forward_on_its_own_full_step_is_exact(unets, family):
    """Fed the deep feature of a full step on the same inputs, the shallow branch reproduces it bit for bit,
    for every branch: the embeddings, skips, layer order and up-sampling of the cached path are the U-Net's."""
    unet = unets[family]
    inputs = _inputs(unet)
    with torch.no_grad():
        for b in range(num_branches(unet)):
            plan = branch_plan(unet, b)
            full, feature = _full_with_feature(unet, plan, inputs)
            shallow = shallow_forward(unet, plan, feature, **inputs)
            assert torch.equal(shallow.sample, full), (family, b)
            assert torch.equal(shallow_forward(unet, plan, feature, **inputs, return_dict=False)[0], full)


def test_shallow_forward_with_controlnet_residuals_is_exact(unets):
    unet = unets["sd15"]
    torch.manual_seed(1)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8)).eval()
    for p in controlnet.parameters():  # zero convs start at zero: make the residuals matter
        torch.nn.init.normal_(p, std=0.05)
    inputs = _inputs(unet)
    cond = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        down, mid = controlnet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"],
                               controlnet_cond=cond, return_dict=False)
        inputs.update(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        without = unet(**{k: v for k, v in inputs.items() if "residual" not in k}).sample
        for b in (0, 3, 8):
            plan = branch_plan(unet, b)
            full, feature = _full_with_feature(unet, plan, inputs)
            assert not torch.allclose(full, without)
            assert torch.equal(shallow_forward(unet, plan, feature, **inputs).sample, full)


# ---------------------------------------------------------------------------------------------- instrumentation
MODULE_KINDS = ("resnets.", "attentions.", "downsamplers.", "upsamplers.")


def _instrument(unet):
    """Forward hooks recording which layers run and the tensors they see."""
    calls, outputs, inputs = [], {}, {}
    handles = []
    for name, module in unet.named_modules():
        last = name.rsplit(".", 1)
        leaf_layer = len(last) == 2 and last[1].isdigit() and any(k in name for k in MODULE_KINDS) \
            and name.count(".") == 3
        if leaf_layer or name in ("mid_block", "conv_in", "conv_out"):
            def hook(mod, args, kwargs, out, name=name):
                calls.append(name)
                outputs[name] = out[0] if isinstance(out, tuple) else out
                inputs[name] = args[0] if args else kwargs.get("hidden_states")
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    return calls, outputs, inputs, handles


@pytest.mark.parametrize("branch", [0, 1, 4, 8])
def test_cached_step_runs_only_the_branch_and_consumes_the_cached_feature(unets, branch):
    unet = unets["sd15"]
    apply_deepcache(unet, DeepCacheConfig(interval=3, branch=branch))
    calls, outputs, inputs_seen, handles = _instrument(unet)
    try:
        x0, x1 = _inputs(unet, seed=0), _inputs(unet, seed=1)
        x0["timestep"], x1["timestep"] = torch.tensor(900), torch.tensor(800)
        plan = branch_plan(unet, branch)
        desc = describe_branch(unet, branch)
        with torch.no_grad():
            unet(**x0)  # step 0: full
            full_calls = list(calls)
            hook = unet._diffusers_hook.get_hook(HOOK_NAME)
            cached_feature = hook.state.feature
            if plan.source[0] == "layer_output":
                producer = desc["deep_feature"]
                assert cached_feature is outputs[producer]  # the very tensor the full step produced
            calls.clear()
            unet(**x1)  # step 1: cached
        assert deepcache_stats(unet)["evaluations"] == [(0, 900.0, "full"), (1, 800.0, "cached")]
        assert "mid_block" in full_calls and "mid_block" not in calls
        expected = ["conv_in", *desc["down"], *desc["up"], "conv_out"]
        assert calls == expected  # nothing else ran, in this order
        k, i = plan.up_block, plan.up_layer
        consumer_in = inputs_seen[f"up_blocks.{k}.resnets.{i}"]
        c = cached_feature.shape[1]
        assert torch.equal(consumer_in[:, :c], cached_feature)  # cat([cached deep feature, fresh skip b])
        assert hook.state.feature is cached_feature  # a cached step does not touch the cache
    finally:
        for h in handles:
            h.remove()
        remove_deepcache(unet)


# ---------------------------------------------------------------------------------------------- step index
def test_bare_loop_step_index_by_noise_level(unets):
    unet = unets["sd2"]
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(8)
    apply_deepcache(unet, interval=3, branch=2, scheduler=scheduler)
    try:
        x = _inputs(unet)
        with torch.no_grad():
            for t in scheduler.timesteps:
                unet(**{**x, "timestep": t})
            unet(**{**x, "timestep": scheduler.timesteps[-1]})  # same noise level again: same step
            stats = deepcache_stats(unet)
            assert [e[0] for e in stats["evaluations"]] == [0, 1, 2, 3, 4, 5, 6, 7, 7]
            assert [e[2] for e in stats["evaluations"]] == ["full", "cached", "cached", "full", "cached",
                                                            "cached", "full", "cached", "cached"]
            assert stats["num_steps"] == 8 and (stats["full"], stats["cached"]) == (3, 6)
            # a higher timestep starts a new trajectory: step 0, full, cache refilled
            unet(**{**x, "timestep": scheduler.timesteps[0]})
            assert deepcache_stats(unet)["evaluations"] == [(0, float(scheduler.timesteps[0]), "full")]
            unet(**{**x, "timestep": scheduler.timesteps[1]})
            reset_deepcache(unet)
            assert deepcache_stats(unet)["evaluations"] == [] and unet._diffusers_hook.get_hook(
                HOOK_NAME).state.feature is None
            unet(**{**x, "timestep": scheduler.timesteps[1]})  # after a reset: step 0 again
            assert deepcache_stats(unet)["evaluations"][0][2] == "full"
            # a different batch than the cached feature's cannot reuse it: runs in full
            unet(**{**_inputs(unet, batch=1), "timestep": scheduler.timesteps[2]})
            assert deepcache_stats(unet)["evaluations"][-1] == (1, float(scheduler.timesteps[2]), "full")
    finally:
        remove_deepcache(unet)


def test_remove_restores_exact_forward_and_enable_replaces(unets):
    unet = unets["sdxl"]
    x = _inputs(unet)
    with torch.no_grad():
        before = unet(**x).sample
        apply_deepcache(unet, interval=2, branch=0)
        assert deepcache_config(unet) == DeepCacheConfig(interval=2, branch=0)
        first = unet._diffusers_hook.get_hook(HOOK_NAME)
        apply_deepcache(unet, interval=5, branch=0)  # same branch: updated in place (compiled graphs stay)
        assert unet._diffusers_hook.get_hook(HOOK_NAME) is first and first.config.interval == 5
        apply_deepcache(unet, DeepCacheConfig(interval=4, branch=5))  # replaces, not stacks
        assert unet._diffusers_hook.get_hook(HOOK_NAME) is not first
        assert deepcache_config(unet).branch == 5
        names = [n for n, m in unet.named_modules() if CAPTURE_HOOK_NAME in getattr(
            getattr(m, "_diffusers_hook", None), "hooks", {})]
        assert names == [describe_branch(unet, 5)["deep_feature"].split(" ")[0]] == ["up_blocks.1"]
        assert unet._diffusers_hook._hook_order == [HOOK_NAME]
        unet(**{**x, "timestep": torch.tensor(999)})
        remove_deepcache(unet)
        assert deepcache_config(unet) is None
        assert not any(CAPTURE_HOOK_NAME in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                       for m in unet.modules())
        assert torch.equal(unet(**x).sample, before)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_models_and_branches(unets):
    with pytest.raises(ValueError, match=r"DeepCache needs a diffusers UNet2DConditionModel .*got Linear.*Allowed"):
        apply_deepcache(torch.nn.Linear(2, 2), interval=2)
    with pytest.raises(ValueError, match=r"branch must be in \[0, 8\] for this U-Net \(9 skip connections\), got 9"):
        apply_deepcache(unets["sd15"], interval=2, branch=9)
    with pytest.raises(ValueError, match="schedule must be one of"):
        apply_deepcache(unets["sd15"], interval=2, schedule="quadratic")
    with pytest.raises(ValueError, match="schedule='non-uniform' needs the number of denoising steps: pass scheduler="):
        apply_deepcache(unets["sd15"], interval=2, schedule="non-uniform")
    with pytest.raises(TypeError, match="pass either a DeepCacheConfig or its fields"):
        apply_deepcache(unets["sd15"], DeepCacheConfig(), interval=2)
    with pytest.raises(ValueError, match="DeepCache is not enabled on this U-Net"):
        deepcache_stats(unets["sd15"])
    cfg = dict(tiny_unet_config("sd15"), down_block_types=("ResnetDownsampleBlock2D", "CrossAttnDownBlock2D",
                                                           "DownBlock2D"))
    with pytest.raises(ValueError, match=r"does not support down_blocks.0 of type ResnetDownsampleBlock2D; "
                                         r"allowed: \['CrossAttnDownBlock2D', 'DownBlock2D'\]"):
        apply_deepcache(UNet2DConditionModel(**cfg), interval=2)
    assert deepcache_config(unets["sd15"]) is None  # failed calls left nothing behind


def test_t2i_adapter_residuals_are_refused_on_cached_path(unets):
    unet = unets["sd15"]
    plan = branch_plan(unet, 0)
    x = _inputs(unet)
    with pytest.raises(ValueError, match="DeepCache does not support T2I-Adapter residuals"):
        shallow_forward(unet, plan, torch.zeros(1), **x, down_intrablock_additional_residuals=[torch.zeros(1)])


# ---------------------------------------------------------------------------------------------- MACs
def test_mac_count_of_cached_step(unets):
    unet = unets["sd15"]
    macs = unet_macs(unet, branches=tuple(range(9)), batch=2)
    ratios = [macs["cached"][b] / macs["full"] for b in range(9)]
    assert all(0 < r < 1 for r in ratios) and ratios == sorted(ratios)  # deeper branch, more work
    assert cached_step_mac_ratio(unet, 3, batch=2) == ratios[3]
    # branch 8 skips exactly the mid block: its MACs are the difference
    x = example_inputs(unet, batch=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**x)
    mid = sum(counter.get_flop_counts()["UNet2DConditionModel.mid_block"].values()) // 2
    assert macs["full"] - macs["cached"][8] == mid


# ---------------------------------------------------------------------------------------------- ControlNet
def _controlnet(unet, seed=1, **kw):
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8), **kw).eval()
    for p in net.parameters():  # zero convs start at zero: make every residual matter
        torch.nn.init.normal_(p, std=0.05)
    return net


@pytest.mark.parametrize("guess_mode", [False, True])
def test_shallow_controlnet_residuals_are_exact(unets, guess_mode):
    """On the same inputs, the ControlNet's shallow branch gives residuals 0..b bit-identical to its full
    forward (embeddings, conditioning embedding, down layers, zero convs, scaling), for every branch."""
    from diffkit.cache import shallow_controlnet_forward

    unet = unets["sd15"]
    net = _controlnet(unet)
    x = _inputs(unet)
    cond = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    kw = dict(sample=x["sample"], timestep=x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
              controlnet_cond=cond, conditioning_scale=0.7, guess_mode=guess_mode)
    with torch.no_grad():
        down, mid = net(**kw, return_dict=False)
        stale = ([torch.full_like(d, 7.0) for d in down], torch.full_like(mid, 7.0))
        for b in range(num_branches(unet)):
            out = shallow_controlnet_forward(net, branch_plan(unet, b), stale, **kw)
            assert all(torch.equal(o, d) for o, d in zip(out.down_block_res_samples[:b + 1], down[:b + 1])), b
            assert all(o is s for o, s in zip(out.down_block_res_samples[b + 1:], stale[0][b + 1:]))
            assert out.mid_block_res_sample is stale[1]


def test_controlnet_runs_shallow_on_cached_steps_only(unets):
    unet = unets["sd15"]
    net = _controlnet(unet)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(6)
    cond = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    mids = []
    handle = net.mid_block.register_forward_hook(lambda *a: mids.append(1))

    def loop():
        x = _inputs(unet)
        lat, outs = x["sample"], []
        with torch.no_grad():
            for t in scheduler.timesteps:
                down, mid = net(lat, t, x["encoder_hidden_states"], controlnet_cond=cond, return_dict=False)
                eps = unet(lat, t, x["encoder_hidden_states"], down_block_additional_residuals=down,
                           mid_block_additional_residual=mid).sample
                lat = scheduler.step(eps, t, lat).prev_sample
                outs.append(lat)
        return outs

    try:
        apply_deepcache(unet, interval=3, branch=2)  # ControlNet not paired: it runs in full every step
        ref = loop()
        assert len(mids) == 6
        mids.clear()
        apply_deepcache(unet, interval=3, branch=2, controlnet=net)
        assert net._diffusers_hook.get_hook("diffkit.deepcache.controlnet") is not None
        out = loop()
        assert len(mids) == 2  # the ControlNet's deep part ran on the 2 full steps only
        assert all(torch.equal(a, b) for a, b in zip(out, ref))  # the cached U-Net step never reads the rest
        remove_deepcache(unet)
        assert "diffkit.deepcache.controlnet" not in net._diffusers_hook.hooks
    finally:
        handle.remove()
        remove_deepcache(unet)


def test_controlnet_must_match_the_unet(unets):
    net = _controlnet(unets["sd15"])
    with pytest.raises(ValueError, match="the ControlNet's down path does not match the U-Net's"):
        apply_deepcache(unets["sdxl"], interval=2, controlnet=net)
    with pytest.raises(ValueError, match="DeepCache supports ControlNetModel .*got Linear"):
        apply_deepcache(unets["sd15"], interval=2, controlnet=torch.nn.Linear(2, 2))


def test_mac_count_with_paired_controlnet(unets):
    unet = unets["sd15"]
    net = _controlnet(unet)
    plain = unet_macs(unet, branches=(0, 4), batch=2)
    paired = unet_macs(unet, branches=(0, 4), controlnet=net, batch=2)
    x = example_inputs(unet, batch=2)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x["sample"], x["timestep"], x["encoder_hidden_states"], controlnet_cond=torch.zeros(2, 3, 64, 64))
    cn_full = counter.get_total_flops() // 2
    assert paired["full"] - plain["full"] == cn_full
    extra = [paired["cached"][b] - plain["cached"][b] for b in (0, 4)]
    assert 0 < extra[0] < extra[1] < cn_full  # the shallow ControlNet grows with the branch, below a full one
