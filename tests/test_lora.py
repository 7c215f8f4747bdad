"""A user's LoRA (diffusers' peft backend) with every diffkit feature (tiny SD 1.5).

The LoRA is made here with peft on the tiny zoo U-Net and saved with diffusers' ``save_lora_weights``;
each test compares against an independent computation: a pipeline whose weights had the LoRA merged by
hand (``W + (B @ A) * scale``, from the saved file), patched erasure tensors, or the documented error.
"""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

import diffkit
from diffkit.artifacts import BaseModelMismatch
from diffkit.guidance import APG, CFG, CFGPlusPlus
from diffkit.lifecycle import FeatureConflict, rule_for
from diffkit.pruning import find_units, save_pruning

peft = pytest.importorskip("peft")
from _erasure_artifacts import make_artifact, patch_by_hand  # noqa: E402
from _lora import ALPHA, RANK, make_lora  # noqa: E402

STEPS = 4
PROMPT = "a red star"


def run(pipe, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=STEPS, generator=g, output_type="latent", **kw).images


def state(pipe):
    """The live value of every base parameter, by its name without peft's wrapping (``base_layer``)."""
    out = {}
    for comp in ("unet", "text_encoder"):
        for k, v in getattr(pipe, comp).named_parameters():
            if "lora_" not in k:
                out[f"{comp}.{k.replace('.base_layer', '')}"] = v.detach().clone()
    return out


def same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def merge_by_hand(pipe, lora_dir, scale=1.0):
    """W += (B @ A) * (alpha / r) * scale for every module of the saved LoRA (peft's delta, computed here)."""
    f = load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))
    with torch.no_grad():
        for k, down in f.items():
            if k.endswith(".lora.down.weight"):
                module = k[len("unet."):-len(".lora.down.weight")]
                up = f[k.replace(".lora.down.", ".lora.up.")]
                pipe.unet.get_parameter(module + ".weight").add_((up @ down) * (ALPHA / RANK * scale))
    return pipe


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_paths):
    root = tmp_path_factory.mktemp("lora")
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    lora = make_lora(pipe.unet, root / "lora")
    attn2 = [n for n, _ in pipe.unet.named_modules() if n.endswith("attn2")]
    # An erasure on tensors the LoRA also adapts (to_k, to_v) and on one it does not (attn2's to_out bias).
    names = [f"unet.{n}.{k}" for n in attn2 for k in ("to_k.weight", "to_v.weight", "to_out.0.bias")]
    trained = make_artifact(pipe, root / "erasure", names, seed=1)
    kept = {u.name: list(range(0, u.size, 2)) for u in find_units(pipe.unet)}
    save_pruning(root / "spec", pipe.unet, kept, macs=False)
    return dict(root=root, lora=lora, erasure=root / "erasure", trained=trained, spec=root / "spec")


@pytest.fixture
def pipes(load_tiny, world):
    """(pipe with the LoRA loaded, hand-merged pipe, plain pipe)."""
    pipe = load_tiny("sd15")
    pipe.load_lora_weights(world["lora"], adapter_name="style")
    return pipe, merge_by_hand(load_tiny("sd15"), world["lora"]), load_tiny("sd15")


# ---------------------------------------------------------------------------------------------------
# The LoRA itself: fused = merged by hand, bit for bit; unfuse and unload exact
# ---------------------------------------------------------------------------------------------------


def test_fused_lora_equals_merging_by_hand_and_unfused_is_within_rounding(pipes):
    pipe, hand, plain = pipes
    assert repr(pipe.features).startswith("FeatureSet([lora(") and list(pipe.lora_adapters) == ["style"]
    unfused, expected, base = run(pipe), run(hand), run(plain)
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA changes the output
    assert (unfused - expected).abs().max() <= 1e-5 * expected.abs().max()  # x W^T + (x A^T) B^T s: reordered sums
    pipe.fuse_lora()
    assert torch.equal(run(pipe), expected)
    assert same_state(state(pipe), state(hand))


def test_fuse_unfuse_round_trip_is_exact_and_unload_restores_the_base(pipes):
    pipe, _, plain = pipes
    source = pipe.lora_adapters["style"]
    base_state, base = state(plain), run(plain)
    unfused_state, unfused = state(pipe), run(pipe)
    for scale in (1.0, 0.5):
        pipe.fuse_lora(lora_scale=scale)
        assert not same_state(state(pipe), unfused_state)
        pipe.unfuse_lora()
        assert same_state(state(pipe), unfused_state)  # diffusers' own unfuse subtracts again: not bit-exact
    pipe.set_adapters(["style"], adapter_weights=[1.0])  # fuse_lora(lora_scale) scaled peft's layers; reset
    assert torch.equal(run(pipe), unfused)
    pipe.fuse_lora()
    pipe.features.first("lora").detach()  # the lifecycle's detach: exact whether fused or not
    assert len(pipe.features) == 0 and same_state(state(pipe), base_state) and torch.equal(run(pipe), base)
    assert not any("lora" in n for n, _ in pipe.unet.named_parameters())

    pipe.load_lora_weights(source, adapter_name="again")
    pipe.unload_lora_weights()  # unfused: diffusers' unload, exact
    assert same_state(state(pipe), base_state) and torch.equal(run(pipe), base)


def test_unload_with_the_lora_fused_bakes_it_in_like_diffusers(pipes):
    pipe, hand, _ = pipes
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert len(pipe.features) == 0 and same_state(state(pipe), state(hand))


def test_adapter_weight_scales_the_lora(load_tiny, world):
    pipe = load_tiny("sd15")
    pipe.load_lora_weights(world["lora"], adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.5])
    pipe.fuse_lora()
    assert torch.equal(run(pipe), run(merge_by_hand(load_tiny("sd15"), world["lora"], scale=0.5)))
    pipe.unfuse_lora()
    pipe.set_adapters(["style"], adapter_weights=[0.0])
    assert torch.equal(run(pipe), run(load_tiny("sd15")))  # weight 0: the base model exactly


# ---------------------------------------------------------------------------------------------------
# With DeepCache and every guidance object
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["lora-first", "deepcache-first"])
def test_deepcache_with_fused_lora_equals_deepcache_on_hand_merged_weights(load_tiny, world, order):
    pipe, hand = load_tiny("sd15"), merge_by_hand(load_tiny("sd15"), world["lora"])
    if order == "deepcache-first":
        pipe.enable_deepcache(interval=2, branch=1)
    pipe.load_lora_weights(world["lora"])
    pipe.fuse_lora()
    if order == "lora-first":
        pipe.enable_deepcache(interval=2, branch=1)
    hand.enable_deepcache(interval=2, branch=1)
    got, expected = run(pipe), run(hand)
    assert pipe.deepcache_stats() == hand.deepcache_stats() and pipe.deepcache_stats()["cached"] > 0
    assert torch.equal(got, expected)
    pipe.disable_deepcache()
    hand.disable_deepcache()
    assert torch.equal(run(pipe), run(hand))


def test_deepcache_with_unfused_lora_and_a_call_scale(load_tiny, world):
    """Cached steps run the LoRA layers of the shallow branch with the call's ``cross_attention_kwargs`` scale."""
    pipe, hand = load_tiny("sd15"), merge_by_hand(load_tiny("sd15"), world["lora"], scale=0.5)
    pipe.load_lora_weights(world["lora"])
    pipe.enable_deepcache(interval=2)
    hand.enable_deepcache(interval=2)
    got = run(pipe, cross_attention_kwargs={"scale": 0.5})
    expected = run(hand)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not torch.allclose(run(pipe), expected, atol=1e-3)  # without the call's scale: the full LoRA


GUIDANCE = {
    "cfg": lambda: CFG(5.0),
    "apg": lambda: APG(scale=8.0, eta=0.0, norm_threshold=15.0, momentum=-0.5),
    "cfgpp": lambda: CFGPlusPlus(scale=0.6),
    "pag": lambda: __import__("diffkit.guidance.diffusers_guiders", fromlist=["make_guider"]).make_guider("pag", 3.0),
}


@pytest.mark.parametrize("name", list(GUIDANCE))
def test_every_guidance_object_with_fused_lora_equals_it_on_hand_merged_weights(pipes, name):
    pipe, hand, _ = pipes
    pipe.fuse_lora()
    got, expected = run(pipe, guidance=GUIDANCE[name]()), run(hand, guidance=GUIDANCE[name]())
    assert torch.equal(got, expected)
    assert [f.name for f in pipe.features] == ["lora"]  # guidance was attached for the call only


def test_guidance_with_unfused_lora_is_within_rounding_of_hand_merged(pipes):
    pipe, hand, _ = pipes
    got, expected = run(pipe, guidance=GUIDANCE["apg"]()), run(hand, guidance=GUIDANCE["apg"]())
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------
# Pruning: refused in both orders, nothing changed
# ---------------------------------------------------------------------------------------------------


def test_pruning_and_a_lora_are_refused_in_both_orders(load_tiny, world):
    assert rule_for("lora", "pruning").verdict == "refuse"
    pipe = load_tiny("sd15")
    pipe.load_lora_weights(world["lora"])
    before, ref = state(pipe), run(pipe)
    with pytest.raises(FeatureConflict, match=r"pruning cannot be combined with the attached lora\(.*\): pruning "
                                              r"changes the widths of the modules a LoRA adapts"):
        pipe.load_pruning(world["spec"])
    assert pipe.pruning_spec is None and same_state(state(pipe), before) and torch.equal(run(pipe), ref)

    pruned = load_tiny("sd15")
    pruned.load_pruning(world["spec"])
    ref = run(pruned)
    with pytest.raises(FeatureConflict, match=r"lora cannot be combined with the attached pruning"):
        pruned.load_lora_weights(world["lora"])
    assert not any("lora" in n for n, _ in pruned.unet.named_parameters()) and torch.equal(run(pruned), ref)
    assert [f.name for f in pruned.features] == ["pruning"]


def test_erasure_training_refuses_a_lora(load_tiny, world, tmp_path):
    from diffkit.erasure import ErasureConfig, erase

    pipe = load_tiny("sd15")
    pipe.load_lora_weights(world["lora"])
    with pytest.raises(FeatureConflict, match=r"erase\(\) cannot run with lora\(.*\) attached"):
        erase(pipe, ErasureConfig(method="esd", concept=["red"], steps=1), tmp_path / "a", progress=False)
    assert not (tmp_path / "a" / "erasure.json").exists()


# ---------------------------------------------------------------------------------------------------
# Erasure: either order, fused or not; removing either leaves exactly the other
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fused", [False, True], ids=["unfused", "fused"])
@pytest.mark.parametrize("order", ["lora-then-erasure", "erasure-then-lora"])
def test_erasure_and_lora_stack_in_either_order_and_unload_exactly(load_tiny, world, order, fused):
    def lora(p):
        p.load_lora_weights(world["lora"], adapter_name="style")
        if fused:
            p.fuse_lora()

    # The references: each feature alone, and both (erasure patched by hand under the LoRA).
    lora_only = load_tiny("sd15")
    lora(lora_only)
    erasure_only = load_tiny("sd15")
    erasure_only.load_erasure(world["erasure"])
    both_by_hand = merge_by_hand(patch_by_hand(load_tiny("sd15"), world["trained"]), world["lora"])

    def build():
        p = load_tiny("sd15")
        if order == "lora-then-erasure":
            lora(p)
            p.load_erasure(world["erasure"])
        else:
            p.load_erasure(world["erasure"])
            lora(p)
        return p

    pipe = build()
    got, expected = run(pipe), run(both_by_hand)
    if fused:
        assert torch.equal(got, expected) and same_state(state(pipe), state(both_by_hand))
    else:
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        assert same_state(state(pipe), state(patch_by_hand(load_tiny("sd15"), world["trained"])))

    pipe.unload_erasure()  # -> the LoRA alone, bit for bit
    assert same_state(state(pipe), state(lora_only)) and torch.equal(run(pipe), run(lora_only))
    assert [f.name for f in pipe.features] == ["lora"]

    pipe = build()
    pipe.features.first("lora").detach()  # -> the erasure alone, bit for bit
    assert same_state(state(pipe), state(erasure_only)) and torch.equal(run(pipe), run(erasure_only))
    pipe.unload_erasure()
    assert same_state(state(pipe), state(load_tiny("sd15")))


def test_unload_lora_weights_refuses_to_bake_a_fused_lora_into_erased_tensors(load_tiny, world):
    pipe = load_tiny("sd15")
    pipe.load_erasure(world["erasure"])
    pipe.load_lora_weights(world["lora"])
    pipe.fuse_lora()
    before = state(pipe)
    with pytest.raises(FeatureConflict, match=r"would bake it into weights erasure\(.*\) changed; call "
                                              r"pipe.unfuse_lora\(\) first"):
        pipe.unload_lora_weights()
    assert same_state(state(pipe), before)
    pipe.unfuse_lora()
    pipe.unload_lora_weights()
    assert [f.name for f in pipe.features] == ["erasure"]


def test_unfuse_after_an_erasure_loaded_under_a_fused_lora_gives_the_erased_weights(load_tiny, world):
    pipe = load_tiny("sd15")
    pipe.load_lora_weights(world["lora"])
    pipe.fuse_lora()
    pipe.load_erasure(world["erasure"])
    pipe.unfuse_lora()
    assert same_state(state(pipe), state(patch_by_hand(load_tiny("sd15"), world["trained"])))


# ---------------------------------------------------------------------------------------------------
# Bad input: each a clear error, the pipeline unchanged
# ---------------------------------------------------------------------------------------------------


def assert_untouched(pipe, ref):
    assert len(pipe.features) == 0 and not any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert torch.equal(run(pipe), ref)


def lora_dict(world):
    sd = load_file(str(world["lora"] / "pytorch_lora_weights.safetensors"))
    return {k: v.clone() for k, v in sd.items()}


def test_a_lora_for_another_base_model_names_the_base(load_tiny, world, tmp_path):
    from diffusers import UNet2DConditionModel

    from diffkit.zoo.tiny import tiny_unet_config

    other = UNet2DConditionModel(**{**tiny_unet_config("sd15"), "block_out_channels": (16, 64, 64)})
    make_lora(other, tmp_path / "other")
    pipe = load_tiny("sd15")
    ref = run(pipe)
    with pytest.raises(BaseModelMismatch, match=r"LoRA '.*other' was made for another base model: unet\.down_blocks"
                                                r"\.0\..* is a Linear 32 -> 32 in this pipeline \(.*sd15.*; unet "
                                                r"config [0-9a-f]{16}\), the LoRA adapts 16 -> 16"):
        pipe.load_lora_weights(tmp_path / "other")
    assert_untouched(pipe, ref)


def test_a_rank_below_one_is_refused(load_tiny, world):
    sd = lora_dict(world)
    k = next(k for k in sd if k.endswith(".lora.down.weight"))
    sd[k] = sd[k][:0]
    sd[k.replace(".lora.down.", ".lora.up.")] = sd[k.replace(".lora.down.", ".lora.up.")][:, :0]
    pipe = load_tiny("sd15")
    ref = run(pipe)
    with pytest.raises(ValueError, match=r"has rank 0 \(A \[0, \d+\], B \[\d+, 0\]\); a LoRA's rank must be >= 1"):
        pipe.load_lora_weights(sd)
    assert_untouched(pipe, ref)


def test_target_modules_that_match_nothing_are_refused(load_tiny, world):
    sd = {k.replace("attn1", "attn9"): v for k, v in lora_dict(world).items()}
    pipe = load_tiny("sd15")
    ref = run(pipe)
    with pytest.raises(ValueError, match=r"of its \d+ target modules match nothing in this pipeline .*, e\.g\. "
                                         r"unet\.down_blocks\.0\.attentions\.0\.transformer_blocks\.0\.attn9"):
        pipe.load_lora_weights(sd)
    assert_untouched(pipe, ref)
    with pytest.raises(ValueError, match="holds no LoRA matrices"):
        pipe.load_lora_weights({"unet.conv_in.weight": torch.zeros(1)})
    assert_untouched(pipe, ref)


def test_peft_missing_is_a_clear_error(load_tiny, world, monkeypatch):
    pipe = load_tiny("sd15")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError, as when it is not installed
    with pytest.raises(ImportError, match=r"loading a LoRA needs peft, .* pip install peft"):
        pipe.load_lora_weights(world["lora"])
    assert len(pipe.features) == 0


def test_a_second_adapter_stacks_and_deleting_the_last_unloads_exactly(load_tiny, world, tmp_path):
    pipe = load_tiny("sd15")
    base_state = state(pipe)
    pipe.load_lora_weights(world["lora"], adapter_name="a")
    second = make_lora(load_tiny("sd15").unet, tmp_path / "second", seed=3, targets=["to_q"])
    pipe.load_lora_weights(second, adapter_name="b")
    assert sorted(pipe.lora_adapters) == ["a", "b"] and len(pipe.features) == 1
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(second, adapter_name="b")
    pipe.delete_adapters("b")
    assert list(pipe.lora_adapters) == ["a"]
    pipe.delete_adapters(["a"])
    assert len(pipe.features) == 0 and same_state(state(pipe), base_state)


def peft_too_old_for_transformers() -> bool:
    from packaging.version import Version
    from transformers.integrations.peft import MIN_PEFT_VERSION

    return Version(peft.__version__) < Version(MIN_PEFT_VERSION)


@pytest.mark.skipif(not peft_too_old_for_transformers(), reason="this peft loads text-encoder LoRAs")
def test_a_text_encoder_lora_needs_the_peft_transformers_needs(load_tiny):
    """transformers loads text-encoder LoRAs itself and needs a newer peft than diffusers: a clear error, first."""
    pipe = load_tiny("sd15")
    q = pipe.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj")
    sd = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, q.in_features),
          "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(q.out_features, 2)}
    ref = run(pipe)
    with pytest.raises(ImportError, match=r"this LoRA adapts the text encoder, which transformers loads only with "
                                          r"peft >= [\d.]+ \(installed: [\d.]+\): pip install -U peft"):
        pipe.load_lora_weights(sd)
    assert_untouched(pipe, ref)


def test_diffkit_generate_loads_a_lora(tiny_paths, world, tmp_path):
    import json

    import numpy as np
    from PIL import Image

    from diffkit.cli import main

    out = tmp_path / "images"
    assert main(["generate", PROMPT, "--model", str(tiny_paths["sd15"]), "--steps", "2", "--lora", str(world["lora"]),
                 "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "images.jsonl").read_text().splitlines()[0])
    assert record["lora"] == str(world["lora"])
    pipe = diffkit.DiffusionPipeline.from_pretrained(tiny_paths["sd15"])
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(world["lora"])
    expected = pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    guidance_scale=7.5).images[0]
    assert np.array_equal(np.asarray(Image.open(out / record["file"])), np.asarray(expected))
    assert main(["generate", PROMPT, "--model", str(tiny_paths["sd15"]), "--steps", "2", "--lora",
                 str(tmp_path / "none"), "--out", str(out), "--quiet"]) == 2
