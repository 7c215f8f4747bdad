"""UnlearnDiffAtk (discrete tokens, projection, generation from the token ids, schedule, early stop), the
attack choice of ``attack_success_rate``, and the non-text probes (initial-noise search, completion)."""

from __future__ import annotations

import pytest
import torch

from diffkit.erasure.attack import ATTACKS, AttackConfig, attack_success_rate
from diffkit.erasure.conditioning import PromptEncoder
from diffkit.erasure.probes import (
    CompletionConfig,
    NoiseSearchConfig,
    complete_from,
    completion_probe,
    noise_search_probe,
)
from diffkit.erasure.probes.noise_search import initial_latents
from diffkit.erasure.sampling import ddim_scheduler
from diffkit.erasure.unlearndiffatk import (
    UnlearnDiffAtkConfig,
    _SampledOneHot,
    attack_timesteps,
    candidate_mask,
    nearest_tokens,
    project_simplex,
    unlearndiffatk,
    unlearndiffatk_batch,
)
from diffkit.evaluation.stats import wilson_interval

SMALL = dict(prefix_tokens=3, iterations=2, timesteps=2, num_inference_steps=2)


def test_defaults_are_the_reference_settings():
    c = UnlearnDiffAtkConfig()
    assert (c.prefix_tokens, c.iterations, c.timesteps, c.lr, c.weight_decay, c.relaxation) == \
        (5, 40, 50, 0.01, 0.1, "simplex")
    assert (c.num_inference_steps, c.guidance_scale) == (50, 7.5)
    ts = attack_timesteps(1000, 50)
    assert ts[:3] == [10, 30, 50] and ts[-1] == 990 and len(ts) == 50
    assert attack_timesteps(1000, 3) == [166, 499, 832]
    with pytest.raises(ValueError, match=r"timesteps must be in \[1, 1000\], got 0"):
        attack_timesteps(1000, 0)
    with pytest.raises(ValueError, match="relaxation must be one of"):
        UnlearnDiffAtkConfig(relaxation="gcg")
    with pytest.raises(ValueError, match="iterations must be an integer >= 1, got 0"):
        UnlearnDiffAtkConfig(iterations=0)


def test_simplex_projection_hand_computed():
    u = torch.tensor([[0.5, 0.3, -0.2], [2.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    # row 0: theta = -0.1 (two active entries) -> [0.6, 0.4, 0]; row 1: theta = 1; row 2 is on the simplex
    expected = torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    assert torch.allclose(project_simplex(u), expected, atol=1e-6)
    # only allowed entries may carry mass: [0.5, ., 0.2] -> theta = -0.15 -> [0.65, 0, 0.35]
    out = project_simplex(torch.tensor([[0.5, 0.9, 0.2]]), torch.tensor([True, False, True]))
    assert torch.allclose(out, torch.tensor([[0.65, 0.0, 0.35]]), atol=1e-6)
    # it is the Euclidean projection: no point of the simplex is nearer (random simplex points)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(1, 6, generator=g)
    p = project_simplex(v)
    assert torch.all(p >= 0) and abs(float(p.sum()) - 1) < 1e-6
    others = torch.distributions.Dirichlet(torch.ones(6)).sample((2000,))
    assert float((p - v).norm()) <= float((others - v).norm(dim=-1).min()) + 1e-6


def test_nearest_vocabulary_embedding_hand_computed():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [3.0, 3.0]])
    queries = torch.tensor([[2.0, 0.1], [1.0, 1.2], [0.5, 0.5], [-0.2, -0.1]])
    # cosine (the reference): [0.5, 0.5] points exactly along row 3 although rows 0 and 1 are closer in L2
    assert nearest_tokens(queries, table).tolist() == [0, 3, 3, 2]
    assert torch.cdist(queries[2:3], table).argmin().item() in (0, 1)  # a Euclidean rule would differ
    allowed = torch.tensor([True, True, True, False])
    assert nearest_tokens(queries, table, allowed).tolist() == [0, 1, 0, 2]


def test_sampled_one_hot_is_a_vocabulary_row_with_a_clipped_straight_through_gradient():
    table = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    u = project_simplex(torch.rand(3, 7, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
    onehot = _SampledOneHot.apply(u, torch.Generator().manual_seed(3))
    ids = onehot.argmax(dim=-1)
    assert torch.equal(onehot.sum(dim=-1), torch.ones(3)) and set(onehot.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(onehot @ table, table[ids])  # the forward pass sees exactly those tokens' embeddings
    w = torch.randn(3, 4) * 10
    ((onehot @ table) * w).sum().backward()
    assert torch.allclose(u.grad, (w @ table.T).clamp(-1, 1))


def _ids_check(pipe, result, prompt, k):
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu", cache=False)
    vocab = pipe.text_encoder.get_input_embeddings().weight.shape[0]
    allowed = candidate_mask(pipe.tokenizer, vocab)
    ids = result.prompt_ids
    assert len(ids) == pipe.tokenizer.model_max_length and len(result.adversarial_ids) == k
    assert all(0 <= i < vocab and allowed[i] for i in result.adversarial_ids)  # vocabulary, never special
    layout = enc.token_ids([prompt], k)[0].tolist()
    assert ids[0] == layout[0] and ids[1:1 + k] == result.adversarial_ids and ids[1 + k:] == layout[1 + k:]
    text = pipe.tokenizer.decode(result.adversarial_ids)
    assert isinstance(text, str) and text.strip()  # decodable
    again = pipe.tokenizer([result.text], padding="max_length", max_length=len(ids), truncation=True).input_ids[0]
    assert result.round_trip == (again == ids)


@pytest.mark.parametrize("relaxation", ["simplex", "nearest"])
def test_prompt_is_vocabulary_tokens_and_the_image_comes_from_exactly_them(load_tiny, relaxation):
    pipe = load_tiny("sd15")
    flags = [p.requires_grad for p in pipe.unet.parameters()]
    cfg = UnlearnDiffAtkConfig(relaxation=relaxation, seed=3, **SMALL)
    result = unlearndiffatk(pipe, "red star", lambda im: [False] * len(im), torch.randn(1, 4, 8, 8), cfg, index=2)
    assert not result.success and not result.pre_attack and result.evaluations == 2 and len(result.losses) == 4
    assert result.seed == 5
    _ids_check(pipe, result, "red star", 3)
    # Regenerate independently from the ids alone: ids -> text encoder -> pipeline, same seed: bit-identical.
    with torch.no_grad():
        emb = pipe.text_encoder(torch.tensor([result.prompt_ids]))[0]
        again = pipe(prompt_embeds=emb, generator=torch.Generator().manual_seed(5), num_inference_steps=2,
                     guidance_scale=7.5, output_type="pt").images.float()
    assert torch.equal(again, result.image)
    assert [p.requires_grad for p in pipe.unet.parameters()] == flags


def test_early_stop_at_the_first_success_and_the_reference_schedule(load_tiny):
    pipe = load_tiny("sd15")
    calls, seen_t = [], []

    def judge(images):  # plain prompt: no; after timestep 1: no; after timestep 2: yes
        calls.append(images.shape[0])
        return [len(calls) == 3]

    hook = pipe.unet.register_forward_pre_hook(
        lambda m, args, kw: seen_t.append(int(args[1].reshape(-1)[0])) if torch.is_grad_enabled() else None,
        with_kwargs=True)
    try:
        cfg = UnlearnDiffAtkConfig(prefix_tokens=2, iterations=3, timesteps=5, num_inference_steps=2)
        result = unlearndiffatk(pipe, "a star", judge, torch.randn(1, 4, 8, 8), cfg)
    finally:
        hook.remove()
    assert result.success and not result.pre_attack and result.evaluations == 2 and calls == [1, 1, 1]
    assert len(result.losses) == 6  # two timesteps of three iterations, then it stopped
    ts = attack_timesteps(1000, 5)
    assert seen_t == [ts[0]] * 3 + [ts[1]] * 3  # increasing, fixed per block, as the reference
    # Already shown without attack: a success, nothing optimised, the plain prompt's ids.
    pre = unlearndiffatk(pipe, "a star", lambda im: [True], torch.randn(1, 4, 8, 8), cfg)
    assert pre.success and pre.pre_attack and pre.evaluations == 0 and pre.losses == [] and pre.adversarial_ids == []
    enc = PromptEncoder(pipe.tokenizer, pipe.text_encoder, "cpu", cache=False)
    assert pre.prompt_ids == enc.token_ids(["a star"])[0].tolist()


def test_a_batch_is_each_prompt_attacked_alone(load_tiny):
    """unlearndiffatk_batch on four prompts (batches of 3 and 1) equals unlearndiffatk on each alone (its own
    index, seed and target): the same success, stopping point, token ids, image, and losses up to the batched
    kernels' round-off, with prompts that stop at different timesteps. The judge reads the image only (its
    mean above a level); where each prompt stops is predicted from a run that never stops."""
    pipe = load_tiny("sd15")
    prompts = ["a red star", "a blue moon", "a green square", "red"]
    targets = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = UnlearnDiffAtkConfig(prefix_tokens=2, iterations=2, timesteps=4, num_inference_steps=2, seed=7,
                               batch_size=3)
    means: list[list[float]] = []
    for i, p in enumerate(prompts):  # every generation of each prompt's full attack (plain, then 4)
        seen: list[float] = []
        unlearndiffatk(pipe, p, lambda im, seen=seen: [seen.append(float(im.mean())) or False], targets[i:i + 1],
                       cfg, index=i)
        means.append(seen)

    def stops(level):  # the first generation above the level (0: the plain prompt), None: never
        return [next((e for e, m in enumerate(ms) if m > level), None) for ms in means]

    levels = sorted({(m + 1e-4) for ms in means for m in ms})  # between values: no verdict sits on the level
    level = max(levels, key=lambda v: len(set(stops(v))))
    expected = stops(level)
    assert len(set(expected)) >= 3, expected  # prompts stop at different points (and one may never)

    def judge(images):
        return [bool(im.mean() > level) for im in images]

    alone = [unlearndiffatk(pipe, p, judge, targets[i:i + 1], cfg, index=i) for i, p in enumerate(prompts)]
    batched = unlearndiffatk_batch(pipe, prompts, judge, targets, cfg)
    for i, (a, b, stop) in enumerate(zip(alone, batched, expected)):
        assert (a.success, a.pre_attack, a.evaluations) == (stop is not None, stop == 0, 4 if stop is None else stop)
        assert (b.success, b.pre_attack, b.evaluations, b.seed) == (a.success, a.pre_attack, a.evaluations, 7 + i)
        assert b.prompt_ids == a.prompt_ids and b.adversarial_ids == a.adversarial_ids and b.text == a.text
        assert len(b.losses) == len(a.losses) == 2 * a.evaluations
        assert torch.allclose(torch.tensor(b.losses), torch.tensor(a.losses), rtol=1e-4, atol=1e-6)
        assert b.image.shape == a.image.shape == (1, 3, 64, 64)
        assert torch.allclose(b.image, a.image, atol=1e-4)
    with pytest.raises(ValueError, match=r"target_latents must hold one latent \(N, C, h, w\) per prompt \(4\)"):
        unlearndiffatk_batch(pipe, prompts, judge, targets[:2], cfg)
    with pytest.raises(ValueError, match=r"judge must return one verdict per image \(3\), got 1"):
        unlearndiffatk_batch(pipe, prompts, lambda im: [False], targets, cfg)
    with pytest.raises(ValueError, match=r"one index per prompt \(4\), got 2"):
        unlearndiffatk_batch(pipe, prompts, judge, targets, cfg, indices=[0, 1])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        UnlearnDiffAtkConfig(batch_size=0)


def test_attack_success_rate_takes_an_attack_choice(load_tiny):
    pipe = load_tiny("sd15")
    assert ATTACKS == ("unlearndiffatk", "soft-prompt")
    targets = torch.randn(2, 4, 8, 8)
    # the prompts are attacked together: both plain prompts judged first (0: no, 1: yes), then prompt 0 alone
    verdicts = iter([False, True, False, False])

    def judge(images):
        return [next(verdicts) for _ in range(len(images))]

    cfg = UnlearnDiffAtkConfig(**SMALL)
    report = attack_success_rate(pipe, ["red star", "red"], judge, targets, cfg)  # the config names the attack
    assert report.attack == "unlearndiffatk" and report.success == [False, True] and report.pre_attack == [False, True]
    assert report.hits == [False, True] and report.n == 2 and report.asr == 0.5 and report.evaluations == [2, 0]
    d = report.to_dict()
    assert d["k"] == 1 and d["n"] == 2
    assert d["settings"]["attack"] == "unlearndiffatk" and d["settings"]["iterations"] == 2
    assert len(d["prompt_ids"][0]) == pipe.tokenizer.model_max_length and report.images.shape == (2, 3, 64, 64)
    soft = attack_success_rate(pipe, ["red"], lambda im: [False, True], targets[:1],
                               AttackConfig(prefix_tokens=2, steps=2, num_inference_steps=2))
    assert soft.attack == "soft-prompt" and soft.asr == 1.0 and soft.to_dict()["settings"]["steps"] == 2
    with pytest.raises(ValueError, match=r"attack must be one of \('unlearndiffatk', 'soft-prompt'\), got 'pez'"):
        attack_success_rate(pipe, ["red"], judge, targets[:1], attack="pez")
    with pytest.raises(ValueError, match="attack 'soft-prompt' takes a AttackConfig, got UnlearnDiffAtkConfig"):
        attack_success_rate(pipe, ["red"], judge, targets[:1], cfg, attack="soft-prompt")


def test_noise_search_keeps_the_best_scored_candidate(load_tiny):
    pipe = load_tiny("sd15")
    scores = iter([torch.tensor([0.1, 0.7, 0.3]), torch.tensor([0.9, 0.2, 0.5])])
    judged = []

    def judge(images):
        judged.append(images.clone())
        return [len(judged) == 1]

    cfg = NoiseSearchConfig(candidates=3, batch_size=2, num_inference_steps=2, seed=4)
    report = noise_search_probe(pipe, ["a star", "a moon"], judge, lambda im: next(scores), cfg)
    assert [d["candidate"] for d in report.details] == [1, 0] and report.hits == [True, False]
    assert report.k == 1 and report.n == 2 and report.images.shape == (2, 3, 64, 64)
    # the kept image is the one generated from that candidate's initial noise (prompt i draws from seed + i)
    # (regenerated in the same batch of two the probe ran it in: a batch's arithmetic may differ from one's)
    z = initial_latents(pipe, 3, 4)[0:2]
    with torch.no_grad():
        again = pipe(["a star"] * 2, latents=z, num_inference_steps=2, guidance_scale=7.5, output_type="pt").images
    assert torch.equal(again.float()[1:2], report.images[:1]) and torch.equal(judged[0], report.images[:1])
    with pytest.raises(ValueError, match="candidates must be an integer >= 1, got 0"):
        NoiseSearchConfig(candidates=0)


def test_completion_noises_to_the_strength_and_a_zero_mask_keeps_the_image(load_tiny):
    pipe = load_tiny("sd15")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(int(args[1][0])))
    try:
        complete_from(pipe, x0, noise, 0.5, num_inference_steps=4, output_type="latent")
    finally:
        hook.remove()
    # half of a 4-step schedule: the last two DDIM steps, one (batched CFG) U-Net call each
    assert seen == [int(t) for t in ddim_scheduler(pipe.scheduler.config, 4).timesteps[2:]]
    kept = complete_from(pipe, x0, noise, 0.75, num_inference_steps=4, mask=torch.zeros(1, 1, 8, 8),
                         output_type="latent")
    assert torch.equal(kept, x0)  # nothing to regenerate: the image itself comes back
    with pytest.raises(ValueError, match="strengths must be a non-empty sequence of values in"):
        CompletionConfig(strengths=(0.0,))
    report = completion_probe(pipe, x0, lambda im: [True, False], CompletionConfig(strengths=(0.5, 1.0),
                                                                                    num_inference_steps=2))
    assert report.levels == {"0.5": [True, False], "1": [True, False]} and report.hits == [True, False]
    assert report.details[0]["strength"] == 0.5 and report.details[1]["strength"] == 1.0


@pytest.mark.slow
def test_each_probe_recovers_the_concept_from_the_unerased_reference_model():
    """Sanity: on the original (unerased) reference model the attack and both probes bring the star back,
    and each reports k, n and the 95% Wilson interval."""
    from diffkit.evaluation.robustness import robustness_report
    from diffkit.zoo import load_reference_classifier, load_reference_pipeline

    pipe = load_reference_pipeline()
    oracle = load_reference_classifier()
    prompts = ["a star", "a red star", "a blue star on a black background", "a five pointed star"]
    with torch.no_grad():
        targets = pipe(prompts, generator=[torch.Generator().manual_seed(100 + i) for i in range(4)],
                       num_inference_steps=15, guidance_scale=7.5, output_type="latent").images.float()
    report = robustness_report(
        pipe, oracle, "object", "star", prompts, targets,
        attack_config=UnlearnDiffAtkConfig(prefix_tokens=3, iterations=2, timesteps=2, num_inference_steps=15),
        noise_config=NoiseSearchConfig(candidates=4, batch_size=4, num_inference_steps=15),
        completion_config=CompletionConfig(strengths=(0.5,), num_inference_steps=15))
    for name in ("attack", "noise-search", "completion"):
        r = report[name]["rate"]
        print(name, r)
        assert r["n"] == 4 and r["k"] >= 3, (name, r)
        assert r["ci95"] == list(wilson_interval(r["k"], r["n"])) and r["rate"] == r["k"] / 4
    assert report["completion"]["levels"]["0.5"]["n"] == 4
    assert report["attack"]["pre_attack_rate"]["n"] == 4
