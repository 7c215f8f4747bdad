"""The feature lifecycle: the contract battery over every feature and every pair (tiny SD 1.5).

Each feature: attach then detach is bit-identical to never attaching. Each pair (and erasure + pruning
+ DeepCache + APG together): the output equals an independent computation — weights patched by hand,
pruned units zeroed by hand, a hand-written sampling loop — or the documented error.
"""

from __future__ import annotations

import copy

import diffusers
import pytest
import torch
from _controlnet import controlnet_pipeline
from _erasure_artifacts import make_artifact, patch_by_hand
from diffusers.callbacks import SDCFGCutoffCallback

import diffkit
from diffkit.cache import apply_deepcache
from diffkit.guidance import APG, CFG, CFGPlusPlus, StepContext
from diffkit.lifecycle import RULES, FeatureConflict, Touch, composition_matrix, composition_rules, features_of
from diffkit.pruning import find_units, save_pruning

STEPS = 4


def assert_close_to_reordering(got, expected):
    """Equal up to float32 summation order (slim matmuls vs zeroed full ones): 1e-5 of the latents' scale."""
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def run(pipe, seed=0, prompt="a red star", **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=STEPS, generator=g, output_type="latent", **kw).images


def state_of(pipe):
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder") for k, v in getattr(pipe, c).state_dict().items()}


def assert_same_state(pipe, before):
    after = state_of(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def zero_units_by_hand(unet, kept):
    """What a pruned unit contributes, removed on the full U-Net: its output weights' columns zeroed."""
    units = {u.name: u for u in find_units(unet)}
    with torch.no_grad():
        for name, idx in kept.items():
            u, m = units[name], unet.get_submodule(name)
            drop = sorted(set(range(u.size)) - set(idx))
            cols = [c for i in drop for c in range(i * u.width, (i + 1) * u.width)]
            if u.kind == "heads":
                m.to_out[0].weight[:, cols] = 0
            elif u.kind == "ffn":
                m.net[2].weight[:, cols] = 0
            else:
                m.conv2.weight[:, cols] = 0


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_paths):
    """A pruning spec, a U-Net erasure artifact and a text-encoder erasure artifact for tiny SD 1.5."""
    root = tmp_path_factory.mktemp("lifecycle")
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    units = find_units(pipe.unet)
    kept = {u.name: list(range(0, u.size, 2)) for u in units}  # every second unit of every module
    save_pruning(root / "spec", pipe.unet, kept, macs=False)
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    unet_names = [f"unet.{n}.{k}.weight" for n in attn2 for k in ("to_k", "to_v", "to_out.0")]
    te_names = [f"text_encoder.{n}" for n, _ in pipe.text_encoder.named_parameters() if "layers.0.mlp" in n]
    unet_trained = make_artifact(pipe, root / "unet-erasure", unet_names, seed=1)
    te_trained = make_artifact(pipe, root / "te-erasure", te_names, seed=2)
    return dict(root=root, spec=root / "spec", kept=kept, unet_art=root / "unet-erasure",
                te_art=root / "te-erasure", unet_trained=unet_trained, te_trained=te_trained)


# ---------------------------------------------------------------------------------------------------
# One feature at a time: attach then detach is bit-identical to never attaching
# ---------------------------------------------------------------------------------------------------

ATTACH = {
    "deepcache-uniform": lambda p, w: p.enable_deepcache(interval=2, branch=1),
    "deepcache-non-uniform": lambda p, w: p.enable_deepcache(interval=2, schedule="non-uniform"),
    "pruning": lambda p, w: p.load_pruning(w["spec"]),
    "erasure-unet": lambda p, w: p.load_erasure(w["unet_art"]),
    "erasure-text-encoder": lambda p, w: p.load_erasure(w["te_art"]),
    "sdpa": lambda p, w: p.set_attention_backend("sdpa"),
}


@pytest.mark.parametrize("name", list(ATTACH))
def test_attach_then_detach_is_never_attached(load_tiny, world, name):
    pipe = load_tiny("sd15")
    ref, before = run(pipe), state_of(pipe)
    processors = {k: type(v) for k, v in pipe.unet.attn_processors.items()}
    ATTACH[name](pipe, world)
    assert len(pipe.features) == 1
    changed = run(pipe)
    if name != "sdpa":  # SDPA is the default backend: attaching it changes nothing
        assert not torch.equal(changed, ref)
    pipe.features[0].detach()
    assert len(pipe.features) == 0 and pipe.deepcache is None and pipe.pruning_spec is None
    assert torch.equal(run(pipe), ref)
    assert_same_state(pipe, before)
    assert {k: type(v) for k, v in pipe.unet.attn_processors.items()} == processors
    assert pipe.unet._diffusers_hook.hooks == {} if hasattr(pipe.unet, "_diffusers_hook") else True


@pytest.mark.parametrize("guidance", [CFG(7.5), APG(5.0), CFGPlusPlus(0.6)], ids=["CFG", "APG", "CFG++"])
def test_guidance_is_attached_for_one_call_only(load_tiny, guidance):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref = run(pipe)
    seen = []

    def look(p, i, t, kw):
        seen.append(([f.name for f in p.features], p.guidance_scale))
        return kw

    run(pipe, guidance=guidance, callback_on_step_end=look)
    # During the call the guidance feature is listed and callbacks read the object's own scale.
    assert seen == [(["guidance"], float(guidance.scale))] * STEPS
    assert len(pipe.features) == 0 and "step" not in pipe.scheduler.__dict__
    assert torch.equal(run(pipe), ref)


def test_controlnet_branch_attach_detach(load_tiny):
    pipe = load_tiny("sd15")
    cn, net = controlnet_pipeline(pipe)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = run(cn, image=image)
    cn.enable_deepcache(interval=3, branch=1)
    assert not torch.equal(run(cn, image=image), ref)
    assert hasattr(net, "_diffusers_hook") and net._diffusers_hook.hooks
    cn.disable_deepcache()
    assert net._diffusers_hook.hooks == {}
    assert torch.equal(run(cn, image=image), ref)


def test_xformers_where_installed(load_tiny):
    from diffusers.utils import is_xformers_available

    pipe = load_tiny("sd15")
    if is_xformers_available():  # pragma: no cover - not on this CPU machine
        pipe.set_attention_backend("xformers")
        assert pipe.attention_backend == "xformers"
        pipe.features[0].detach()
        assert pipe.attention_backend == "sdpa"
    else:
        with pytest.raises(RuntimeError, match="xformers was requested but xformers is not installed|'xformers' "
                                               "was requested but xformers is not installed"):
            pipe.set_attention_backend("xformers")
        assert len(pipe.features) == 0 and pipe.attention_backend == "sdpa"


# ---------------------------------------------------------------------------------------------------
# Pairs, against independent computations
# ---------------------------------------------------------------------------------------------------


def hand_erased_pruned(load_tiny, world, unet=True, te=False):
    """The erased model (weights copied by hand) with the pruned units zeroed by hand."""
    ref = load_tiny("sd15")
    patch_by_hand(ref, {**(world["unet_trained"] if unet else {}), **(world["te_trained"] if te else {})})
    zero_units_by_hand(ref.unet, world["kept"])
    return ref


@pytest.mark.parametrize("order", ["erasure-then-pruning", "pruning-then-erasure"])
def test_erasure_and_pruning_compose_in_both_orders(load_tiny, world, order):
    pipe = load_tiny("sd15")
    base, before = run(pipe), state_of(pipe)
    steps = [lambda: pipe.load_erasure(world["unet_art"]), lambda: pipe.load_pruning(world["spec"])]
    for step in steps if order == "erasure-then-pruning" else steps[::-1]:
        step()
    expected = run(hand_erased_pruned(load_tiny, world))
    got = run(pipe)
    assert_close_to_reordering(got, expected)
    pruned_only = run(load_pruned(load_tiny, world))
    assert (got - pruned_only).abs().max().item() > 1e-2  # the erasure is not undone by slimming
    first, second = [f.name for f in pipe.features]
    with pytest.raises(FeatureConflict, match=f"detach {second}\\(.*\\) before {first}\\(.*\\): it was attached "
                                              "later and changes the same unet weights"):
        pipe.features[0].detach()
    pipe.features[1].detach()
    pipe.features[0].detach()
    assert torch.equal(run(pipe), base)
    assert_same_state(pipe, before)


def load_pruned(load_tiny, world):
    p = load_tiny("sd15")
    p.load_pruning(world["spec"])
    return p


def test_text_encoder_erasure_with_pruning_detaches_in_any_order(load_tiny, world):
    pipe = load_tiny("sd15")
    before = state_of(pipe)
    pipe.load_erasure(world["te_art"])
    pipe.load_pruning(world["spec"])
    expected = run(hand_erased_pruned(load_tiny, world, unet=False, te=True))
    assert_close_to_reordering(run(pipe), expected)
    pipe.unload_erasure()  # text encoder only: pruning does not share its tensors
    pipe.unload_pruning()
    assert_same_state(pipe, before)


def test_two_erasures_stack_and_equal_hand_patching(load_tiny, world):
    pipe = load_tiny("sd15")
    before = state_of(pipe)
    pipe.load_erasure(world["te_art"])
    pipe.load_erasure(world["unet_art"])
    ref = load_tiny("sd15")
    patch_by_hand(ref, {**world["unet_trained"], **world["te_trained"]})
    assert torch.equal(run(pipe), run(ref))
    assert pipe.unload_erasure() == 2
    assert_same_state(pipe, before)


def test_deepcache_and_pruning_in_both_orders_equal_deepcache_on_a_hand_slimmed_unet(load_tiny, world):
    from diffkit.pruning import prune_unet

    ref = load_tiny("sd15")
    slim = copy.deepcopy(ref.unet)
    prune_unet(slim, find_units(slim), world["kept"])
    ref.unet = slim
    apply_deepcache(slim, interval=2, branch=1)
    expected = run(ref)
    for order in (0, 1):
        pipe = load_tiny("sd15")
        if order == 0:
            pipe.enable_deepcache(interval=2, branch=1)
            pipe.load_pruning(world["spec"])  # DeepCache is lifted and re-attached on the slim modules
        else:
            pipe.load_pruning(world["spec"])
            pipe.enable_deepcache(interval=2, branch=1)
        assert torch.equal(run(pipe), expected)
        assert pipe.deepcache_stats()["cached"] == STEPS // 2
        pipe.unload_pruning()  # DeepCache stays, now on the full modules again
        full = load_tiny("sd15")
        full.enable_deepcache(interval=2, branch=1)
        assert torch.equal(run(pipe), run(full))


def test_deepcache_with_erasure_equals_deepcache_on_hand_patched_weights(load_tiny, world):
    pipe = load_tiny("sd15")
    pipe.enable_deepcache(interval=2)
    pipe.load_erasure(world["unet_art"])
    ref = load_tiny("sd15")
    patch_by_hand(ref, world["unet_trained"])
    ref.enable_deepcache(interval=2)
    assert torch.equal(run(pipe), run(ref))


def apg_by_hand(pipe, guidance, deepcache=None):
    """A hand-written DDIM loop: the (hooked) U-Net on [uncond, cond], the guidance object, the step."""
    sched = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(STEPS)
    emb, neg = pipe.encode_prompt("a red star", "cpu", 1, True)
    cond = torch.cat([neg, emb])
    g = torch.Generator().manual_seed(0)
    side = pipe.unet.config.sample_size
    x = torch.randn((1, pipe.unet.config.in_channels, side, side), generator=g) * sched.init_noise_sigma
    if deepcache is not None:
        apply_deepcache(pipe.unet, interval=deepcache, scheduler=sched)
    state = {}
    for i, t in enumerate(sched.timesteps):
        out = pipe.unet(torch.cat([x, x]), t, encoder_hidden_states=cond).sample
        u, c = out.chunk(2)
        guided = guidance(u, c, StepContext(sched, t, x, "epsilon", i), state)
        x = sched.step(guided.pred, t, x).prev_sample
    return x


def test_deepcache_with_apg_equals_apg_on_the_cached_predictions(load_tiny):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.enable_deepcache(interval=2)
    got = run(pipe, guidance=APG(5.0))
    assert pipe.deepcache_stats()["cached"] == STEPS // 2
    expected = apg_by_hand(load_tiny("sd15"), APG(5.0), deepcache=2)
    assert torch.equal(got, expected)


def test_everything_at_once_erasure_pruning_deepcache_apg(load_tiny, world):
    pipe = load_tiny("sd15")
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.enable_deepcache(interval=2)
    pipe.load_erasure(world["unet_art"])
    pipe.load_pruning(world["spec"])
    # Attach order; DeepCache was lifted off and re-attached around pruning but keeps its place.
    assert [f.name for f in pipe.features] == ["deepcache", "erasure", "pruning"]
    got = run(pipe, guidance=APG(5.0))
    expected = apg_by_hand(hand_erased_pruned(load_tiny, world), APG(5.0), deepcache=2)
    assert_close_to_reordering(got, expected)
    pipe.unload_pruning()
    pipe.unload_erasure()
    pipe.disable_deepcache()
    assert torch.equal(run(pipe, guidance=APG(5.0)), apg_by_hand(load_tiny("sd15"), APG(5.0)))


def test_every_pair_has_a_rule_and_the_matrix_is_documented():
    from pathlib import Path

    kinds = ("guidance", "deepcache", "pruning", "erasure", "attention", "lora")
    for a in kinds:
        for b in kinds:
            if a != b or b == "erasure":
                assert frozenset({a, b}) in RULES, (a, b)
    doc = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    assert composition_matrix(kinds) in doc and composition_rules(kinds) in doc


# ---------------------------------------------------------------------------------------------------
# The failures of the issue, each reproduced
# ---------------------------------------------------------------------------------------------------


def drop_unconditional_after(step: int):
    """A callback that turns CFG off after ``step`` for any batch (diffusers' SDCFGCutoffCallback keeps only
    the last prompt embedding, which fits one image): the conditional half, and guidance scale 0."""
    def callback(pipe, i, t, kw):
        if i == step:
            kw["prompt_embeds"] = kw["prompt_embeds"].chunk(2)[1]
            pipe._guidance_scale = 0.0
        return kw

    return callback


@pytest.mark.parametrize("batch", [1, 2])
def test_cfg_cutoff_callback_with_a_guidance_object_equals_diffusers(load_tiny, batch):
    pipe = load_tiny("sd15")
    prompts = ["a red star", "a blue circle"][:batch]
    cb = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=2) if batch == 1 else drop_unconditional_after(2)
    plain = run(pipe, prompt=prompts, guidance_scale=7.5, callback_on_step_end=cb,
                callback_on_step_end_tensor_inputs=["prompt_embeds"])
    guided = run(pipe, prompt=prompts, guidance=CFG(7.5), callback_on_step_end=cb,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert torch.equal(plain, guided)
    no_cutoff = run(pipe, prompt=prompts, guidance_scale=7.5)
    assert not torch.equal(plain, no_cutoff)


def test_apg_after_a_cfg_cutoff_continues_with_the_conditional_prediction(load_tiny):
    """After the cutoff the step takes the conditional prediction unguided, as diffusers does."""
    pipe = load_tiny("sd15")
    cb = SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=STEPS - 2)  # the last step runs alone
    calls = []
    real = pipe.unet.forward

    def spy(sample, *a, **k):
        calls.append(sample.shape[0])
        return real(sample, *a, **k)

    pipe.unet.forward = spy
    run(pipe, guidance=APG(5.0), callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    assert calls == [2] * (STEPS - 1) + [1]  # the last evaluation is the conditional half alone


def test_erase_with_deepcache_trains_the_plain_model_and_restores_deepcache(load_tiny, tmp_path):
    from diffkit.erasure import ErasureConfig, erase, read_artifact

    cfg = ErasureConfig(method="esd", concept="red star", steps=2, sample_steps=2, lr=1e-3,
                        parameters="esd-x-strict")
    plain = erase(load_tiny("sd15"), cfg, tmp_path / "plain", progress=False)
    pipe = load_tiny("sd15")
    pipe.enable_deepcache(interval=3)
    cached = erase(pipe, cfg, tmp_path / "cached", progress=False)
    a, b = read_artifact(plain.path), read_artifact(cached.path)
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    assert [f.name for f in pipe.features] == ["erasure", "deepcache"] and pipe.deepcache.interval == 3


def test_erase_and_mask_learning_refuse_a_pruned_pipeline(load_tiny, world, tmp_path):
    from diffkit.erasure import ErasureConfig, erase
    from diffkit.pruning import MaskLearningConfig, learn_masks

    pipe = load_tiny("sd15")
    pipe.load_pruning(world["spec"])
    cfg = ErasureConfig(method="esd", concept="red", steps=1, sample_steps=2)
    with pytest.raises(FeatureConflict, match=r"erase\(\) cannot run with pruning\(.*\) attached; train on the "
                                              r"unpruned model \(pipe.unload_pruning\(\)\)"):
        erase(pipe, cfg, tmp_path / "x", progress=False)
    with pytest.raises(FeatureConflict, match=r"mask learning cannot run with pruning\(.*\) attached"):
        learn_masks(pipe, ["a red star"], MaskLearningConfig(num_inference_steps=2, epochs=1), progress=False)


def test_mask_learning_suspends_deepcache(load_tiny):
    from diffkit.pruning import MaskLearningConfig, learn_masks

    cfg = MaskLearningConfig(num_inference_steps=2, guidance_scale=5.0, epochs=1)
    plain = learn_masks(load_tiny("sd15"), ["a red star"], cfg, progress=False)
    pipe = load_tiny("sd15")
    pipe.enable_deepcache(interval=2)
    cached = learn_masks(pipe, ["a red star"], cfg, progress=False)
    assert all(torch.equal(plain.logits[k], cached.logits[k]) for k in plain.logits)
    assert pipe.deepcache is not None and [f.name for f in pipe.features] == ["deepcache"]


def test_pruning_spec_checks_the_pruned_modules_weights(load_tiny, world):
    """The format-1 check summed conv_in / time embedding / conv_out, which erasure never changes."""
    from diffkit.artifacts import BaseModelMismatch

    pipe = load_tiny("sd15")
    name = next(iter(world["kept"]))
    with torch.no_grad():
        next(pipe.unet.get_submodule(name).parameters()).add_(1e-3)
    with pytest.raises(BaseModelMismatch, match=rf"tensor unet\.{name}\.\S+ differs from the one it was trained from"):
        pipe.load_pruning(world["spec"])
    assert pipe.pruning_spec is None and len(pipe.features) == 0


def test_a_corrupt_erasure_artifact_changes_nothing(load_tiny, world, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(world["unet_art"], bad)
    tensors = load_file(str(bad / "erasure.safetensors"))
    last = sorted(tensors)[-1]
    tensors[last] = tensors[last][:1]  # shape disagrees with erasure.json
    save_file(tensors, str(bad / "erasure.safetensors"))
    pipe = load_tiny("sd15")
    before = state_of(pipe)
    with pytest.raises(ValueError, match=rf"tensor {last} does not have the shape"):
        pipe.load_erasure(bad)
    assert_same_state(pipe, before)
    assert len(pipe.features) == 0
    (bad / "erasure.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        pipe.load_erasure(bad)
    assert_same_state(pipe, before)
    pipe.load_erasure(world["unet_art"])  # a valid one still loads afterwards
    assert len(pipe.features) == 1


def test_a_failing_copy_mid_load_is_rolled_back(load_tiny, world, monkeypatch):
    pipe = load_tiny("sd15")
    before = state_of(pipe)
    real, calls = torch.Tensor.copy_, []

    def flaky(self, src, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("disk on fire")
        return real(self, src, *a, **k)

    monkeypatch.setattr(torch.Tensor, "copy_", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        pipe.load_erasure(world["unet_art"])
    monkeypatch.undo()
    assert_same_state(pipe, before)
    assert len(pipe.features) == 0


def test_touches_and_stages_are_declared():
    from diffkit.lifecycle import feature_kind

    assert feature_kind("deepcache").touches == Touch.UNET_FORWARD
    assert feature_kind("pruning").touches == Touch.UNET_STRUCTURE | Touch.UNET_WEIGHTS
    assert feature_kind("guidance").touches == Touch.UNET_FORWARD | Touch.SCHEDULER_STEP
    assert feature_kind("attention").touches == Touch.ATTENTION_PROCESSORS
    assert [feature_kind(n).stage for n in ("pruning", "erasure", "attention", "deepcache", "guidance")] == [
        "structure", "weights", "processors", "forward", "call"]
    assert feature_kind("lora").stage == "adapters" and feature_kind("lora").lift is not None
    with pytest.raises(ValueError, match="unknown feature 'nonesuch'; registered: attention, deepcache, erasure, "
                                         "guidance, lora, pruning"):
        feature_kind("nonesuch")


def test_features_of_a_plain_object_is_created_once(load_tiny):
    pipe = load_tiny("sd15")
    assert features_of(pipe) is pipe.features and repr(pipe.features) == "FeatureSet([])"


def test_a_format_1_pruning_spec_still_loads_and_a_legacy_checkpoint_still_reads(load_tiny, world, tmp_path):
    """Artifacts written before the kernel: a diffkit.pruning/1 spec (three-weight checksums) and a zoo
    checkpoint with its fixed file name."""
    import json
    import shutil

    from safetensors.torch import save_file

    from diffkit.artifacts import CheckpointStore
    from diffkit.pruning.spec import LEGACY_CHECKSUM_WEIGHTS, architecture_hash

    pipe = load_tiny("sd15")
    old = tmp_path / "old-spec"
    shutil.copytree(world["spec"], old)
    spec = json.loads((old / "spec.json").read_text())
    sums = {}
    for name in LEGACY_CHECKSUM_WEIGHTS:
        w = pipe.unet.get_parameter(name).detach().double()
        sums[name] = [float(w.sum()), float((w * w).sum())]
    spec.update(format="diffkit.pruning/1", base={"architecture": architecture_hash(pipe.unet), "checksums": sums})
    (old / "spec.json").write_text(json.dumps(spec))
    pipe.load_pruning(old)
    assert torch.equal(run(pipe), run(load_pruned(load_tiny, world)))
    save_file({"w": torch.ones(2)}, str(tmp_path / "checkpoint.safetensors"))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"step": 7}))
    info, tensors = CheckpointStore(tmp_path).load()
    assert info["step"] == 7 and torch.equal(tensors["w"], torch.ones(2))
