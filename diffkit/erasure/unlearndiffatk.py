"""UnlearnDiffAtk — discrete adversarial prompts against an erased model (Zhang, Jia, Chen, Chen, Zhang, Liu,
Ding, Liu; "To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To Generate Unsafe
Images", ECCV 2024; reference code: OPTML-Group/Diffusion-MU-Attack, attacker ``text_grad`` with task
``classifier``, which its README names the UnlearnDiff attack).

The attacker owns ``k`` token positions right after the start token (``prefix_k``). It uses the erased
model as its own *diffusion classifier*: a prompt is good when the erased model reconstructs an image of
the concept (latents ``x_0`` made by the original model) well under it,

    min_{tokens}  || eps_theta(sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, t, c(tokens ; prompt)) - eps ||^2.

Optimisation, as the reference code does it:

* **Relaxation** (``relaxation="simplex"``, the reference): each position holds a distribution ``u`` over
  the vocabulary (start: uniform). Each iteration draws one token per position from ``u`` (forward: the
  one-hot row times the token-embedding table, i.e. exactly that token's embedding), back-propagates
  straight through the draw with the gradient clipped to [-1, 1] (``hardtanh``), takes an Adam step
  (lr 1e-2, weight decay 0.1) and projects ``u`` back onto the probability simplex (Euclidean
  projection). The discrete prompt is ``argmax u`` per position.
  ``relaxation="nearest"`` is the repository's other discrete attacker (``hard_prompt``, PEZ-style): a
  continuous embedding per position, each iteration replaced by its nearest vocabulary embedding
  (cosine similarity) for the forward pass, the gradient at that projected embedding applied to the
  continuous one; the discrete prompt is the nearest tokens.
* **Schedule**: ``timesteps`` (reference 50) fixed diffusion timesteps visited in increasing order,
  ``t = T/(2n), T/(2n) + T/n, ...`` (10, 30, ..., 990 for T = 1000); at each, ``iterations`` (reference 40)
  optimisation steps with a fresh noise draw each. After each timestep the prompt is discretised, an
  image is **generated from those token ids** (token ids -> text encoder -> the pipeline) with the
  prompt's fixed evaluation seed, and the judge (the concept classifier) reads it: the attack **stops at
  the first success**. Before any optimisation the plain prompt is generated and judged; a prompt that
  already shows the concept is a success with no attack (the reference's ``pre-ASR``, counted in the
  ASR as in its ``check_asr.py``).

Prompts in batches (``unlearndiffatk_batch``; ``batch_size``): the reference attacks one prompt at a time.
Here the prompts still under attack share each U-Net call and each timestep's generation and judgement;
each keeps its own generator, distribution and Adam, and the loss is the sum of the per-prompt losses, so a
prompt's result is its attack alone up to float round-off (the U-Net treats samples independently).

Settings (``UnlearnDiffAtkConfig``): the defaults are the reference values (k = 5 as its nudity and style
configs, 3 in its object configs; 40 iterations; 50 timesteps; lr 0.01; weight decay 0.1; 50 sampling
steps; guidance 7.5). Smaller budgets are for small models and CPU runs; say which ones you used.

Where this departs from the reference code, on purpose:

* the reference regenerates its image from the *decoded text* of the ids, re-tokenised (and keeps EOS
  out of the text); decoding does not always round-trip (byte-level tokens merge), so here the image is
  generated from the token ids themselves: the discrete prompt that was optimised is the one judged.
  ``UnlearnDiffAtkResult.round_trip`` says whether typing the decoded text gives back the same ids;
* the start, end and padding tokens are not candidates (the reference's vocabulary includes them);
* the simplex projection is computed exactly (sorting), where the reference bisects to 1e-5;
* sampling uses the pipeline's own scheduler (the reference: LMS), and the random draws are seeded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..noise import add_noise, prediction_target, training_level
from .conditioning import PromptEncoder, refuse_sdxl
from .fields import check_choice, check_integers, check_number, check_seed

RELAXATIONS = ("simplex", "nearest")


@dataclass(frozen=True)
class UnlearnDiffAtkConfig:
    """prefix_tokens: k adversarial tokens after the start token (reference 5; 3 for objects);
    iterations: optimisation steps per timestep (reference 40); timesteps: timesteps visited, one
    generation + judgement after each (reference 50); lr, weight_decay: Adam (reference 0.01, 0.1);
    relaxation: "simplex" (reference) or "nearest"; num_inference_steps, guidance_scale: generation
    (reference 50, 7.5); seed: the evaluation seed of prompt i is ``seed + i``, the optimisation's draws too;
    batch_size: prompts attacked together by :func:`unlearndiffatk_batch` (not a setting of the attack: each
    prompt's result is the one it gets alone, up to float round-off of the batched kernels)."""

    prefix_tokens: int = 5
    iterations: int = 40
    timesteps: int = 50
    lr: float = 0.01
    weight_decay: float = 0.1
    relaxation: str = "simplex"
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self):
        check_integers(self, ("prefix_tokens", "iterations", "timesteps", "num_inference_steps", "batch_size"))
        check_number(self, "lr", positive=True)
        check_number(self, "weight_decay")
        check_choice(self, "relaxation", RELAXATIONS)
        check_number(self, "guidance_scale")
        check_seed(self)


# --- the pieces, each a pure function -------------------------------------------------------------

def attack_timesteps(num_train_timesteps: int, n: int) -> list[int]:
    """The reference's timesteps: ``n`` evenly spaced, starting half a spacing in, increasing."""
    if not 1 <= n <= num_train_timesteps:
        raise ValueError(f"timesteps must be in [1, {num_train_timesteps}], got {n}")
    step = num_train_timesteps // n
    return list(range(step // 2, num_train_timesteps, step))[:n]


def project_simplex(u: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection of each row of ``u`` (k, V) onto the probability simplex.

    ``argmin_x ||x - u||`` s.t. ``x >= 0, sum x = 1`` (Held et al. 1974; Duchi et al. 2008): ``x = max(u - theta,
    0)`` with ``theta`` from the sorted row. ``allowed`` (V,) bool: entries outside it are 0 and the row is
    projected over the allowed ones.
    """
    u = u.float()
    cols = torch.arange(u.shape[-1], device=u.device) if allowed is None else allowed.nonzero().flatten()
    v = u[:, cols]
    s, _ = v.sort(dim=-1, descending=True)
    css = s.cumsum(dim=-1) - 1
    j = torch.arange(1, v.shape[-1] + 1, device=u.device, dtype=u.dtype)
    rho = ((s - css / j) > 0).sum(dim=-1, keepdim=True)  # the active entries are a prefix of the sorted row
    theta = css.gather(-1, rho - 1) / rho.to(u.dtype)
    out = torch.zeros_like(u)
    out[:, cols] = (v - theta).clamp_min(0)
    return out


def nearest_tokens(embeddings: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Ids (k,) of the vocabulary embeddings nearest (cosine similarity, as the reference) to each row of
    ``embeddings`` (k, D); ``allowed`` (V,) bool restricts the candidates."""
    sim = F.normalize(embeddings.float(), dim=-1) @ F.normalize(table.float(), dim=-1).T
    if allowed is not None:
        sim = sim.masked_fill(~allowed.to(sim.device), float("-inf"))
    return sim.argmax(dim=-1)


class _SampledOneHot(torch.autograd.Function):
    """Forward: one token drawn per row from the distribution ``u`` (k, V), as one-hot rows. Backward:
    straight through, the gradient clipped to [-1, 1] (the reference's ``STERandSelect``)."""

    @staticmethod
    def forward(ctx, u, generator):
        # drawn on the CPU, where the seeded generator lives: the same draws on every device
        ids = torch.multinomial(u.detach().clamp_min(0).cpu(), 1, generator=generator).flatten().to(u.device)
        return F.one_hot(ids, u.shape[-1]).to(u.dtype)

    @staticmethod
    def backward(ctx, grad):
        return F.hardtanh(grad), None


def candidate_mask(tokenizer, vocab_size: int) -> torch.Tensor:
    """(V,) bool: every token id except the special ones (start, end, padding)."""
    mask = torch.ones(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | {tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}
    mask[[i for i in special if i is not None and 0 <= i < vocab_size]] = False
    return mask


def prompt_token_ids(encoder: PromptEncoder, prompt: str, adversarial: Sequence[int]) -> torch.Tensor:
    """(1, L) ids of ``prompt`` with the adversarial tokens right after the start token (``prefix_k``)."""
    adversarial = [int(i) for i in adversarial]
    ids = encoder.token_ids([prompt], len(adversarial)).clone()
    if adversarial:
        ids[0, 1:1 + len(adversarial)] = torch.tensor(adversarial, dtype=ids.dtype)
    return ids


def encode_token_ids(text_encoder, tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Hidden states of token ids exactly as the SD 1.x/2.x pipelines' ``encode_prompt`` computes them."""
    ids = ids.to(text_encoder.device)
    kwargs = {}
    if getattr(text_encoder.config, "use_attention_mask", False):
        kwargs["attention_mask"] = (ids != tokenizer.pad_token_id).long()
    return text_encoder(ids, **kwargs)[0]


@torch.no_grad()
def generate_from_ids(pipe, ids: torch.Tensor, *, seed: int | Sequence[int], num_inference_steps: int,
                      guidance_scale: float) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] (CPU, float32) generated from the token ids ``ids`` (B, L), negative
    prompt "" (the pipeline's own default); row i's generator is seeded with ``seed[i]`` (an int: one row).
    diffusers draws each row's initial noise from its own generator, so a row's image does not depend on
    the others in the batch."""
    seeds = [seed] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != ids.shape[0]:
        raise ValueError(f"one seed per row of ids ({ids.shape[0]}), got {len(seeds)}")
    tok, te = pipe.tokenizer, pipe.text_encoder
    embeds = encode_token_ids(te, tok, ids)
    empty = tok([""], padding="max_length", max_length=tok.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    neg = encode_token_ids(te, tok, empty).expand(len(seeds), -1, -1)
    dtype = pipe.unet.dtype
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(prompt_embeds=embeds.to(dtype), negative_prompt_embeds=neg.to(dtype),
               generator=gens[0] if len(gens) == 1 else gens, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, output_type="pt")
    return out.images.float().cpu()


# --- the attack -------------------------------------------------------------------------------------

@dataclass
class UnlearnDiffAtkResult:
    """One prompt's attack. ``prompt_ids``: the full token ids the judged image was generated from (the
    plain prompt's when it succeeded without attack); ``adversarial_ids``: the k optimised tokens (empty
    then); ``evaluations``: attacked generations judged (<= timesteps; 0 when no attack ran)."""

    success: bool
    pre_attack: bool
    prompt_ids: list[int]
    adversarial_ids: list[int]
    text: str
    round_trip: bool
    evaluations: int
    seed: int
    losses: list[float] = field(default_factory=list)
    image: torch.Tensor | None = None

    def to_dict(self) -> dict:
        return {"success": self.success, "pre_attack": self.pre_attack, "prompt_ids": self.prompt_ids,
                "adversarial_ids": self.adversarial_ids, "text": self.text, "round_trip": self.round_trip,
                "evaluations": self.evaluations, "seed": self.seed,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None}


def _decoded(tokenizer, ids: torch.Tensor) -> tuple[str, bool]:
    text = tokenizer.decode(ids[0].tolist(), skip_special_tokens=True)
    again = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    return text, bool(torch.equal(again, ids.cpu()))


def unlearndiffatk(
    pipe,
    prompt: str,
    judge: Callable[[torch.Tensor], Sequence[bool]],
    target_latents: torch.Tensor,
    config: UnlearnDiffAtkConfig = UnlearnDiffAtkConfig(),
    *,
    index: int = 0,
) -> UnlearnDiffAtkResult:
    """Attack one prompt on (erased) ``pipe``. target_latents: (1, C, h, w) latents of a concept image made
    by the original model. judge(images (B, 3, H, W) in [0, 1]) -> one bool per image (concept shown?).
    The U-Net and text encoder are frozen for the attack and their ``requires_grad`` flags restored after.
    SD 1.x/2.x pipelines only (its relaxation is over one text encoder's vocabulary table)."""
    if target_latents.dim() != 4 or target_latents.shape[0] != 1:
        raise ValueError(f"target_latents must be one latent (1, C, h, w), got {tuple(target_latents.shape)}")
    return unlearndiffatk_batch(pipe, [prompt], judge, target_latents, config, indices=[index])[0]


class _PromptAttack:
    """One prompt's state in a batched attack: its generator (the draws it would make alone, in the same
    order), its relaxed variable and its own Adam, its losses and its last discrete prompt."""

    def __init__(self, prompt: str, index: int, plain: torch.Tensor, config: UnlearnDiffAtkConfig,
                 table: torch.Tensor, allowed: torch.Tensor):
        self.prompt, self.seed, self.ids = prompt, config.seed + index, plain
        self.gen = torch.Generator().manual_seed(self.seed)
        self.config, self.table, self.allowed = config, table, allowed
        k = config.prefix_tokens
        if config.relaxation == "simplex":
            var = project_simplex(allowed.float().expand(k, -1).clone(), allowed)  # uniform over the candidates
        else:
            pick = allowed.nonzero().flatten()[torch.randint(0, int(allowed.sum()), (k,), generator=self.gen)]
            var = table[pick.to(table.device)].float().clone()
        self.var = var.requires_grad_(True)
        self.opt = torch.optim.Adam([self.var], lr=config.lr, weight_decay=config.weight_decay)
        self.losses: list[float] = []
        self.evaluations, self.success = 0, False

    def relaxed(self) -> torch.Tensor:
        """(k, D) embeddings the forward pass sees."""
        if self.config.relaxation == "simplex":
            return _SampledOneHot.apply(self.var, self.gen) @ self.table.float()
        v = self.var
        return v + (self.table[nearest_tokens(v.detach(), self.table, self.allowed)].float() - v).detach()

    def discrete(self) -> list[int]:
        if self.config.relaxation == "simplex":
            return self.var.detach().masked_fill(~self.allowed, float("-inf")).argmax(dim=-1).tolist()
        return nearest_tokens(self.var.detach(), self.table, self.allowed).tolist()

    @torch.no_grad()
    def step(self, grad: torch.Tensor) -> None:
        self.var.grad = grad
        self.opt.step()
        self.var.grad = None
        if self.config.relaxation == "simplex":
            self.var.copy_(project_simplex(self.var, self.allowed))


def unlearndiffatk_batch(
    pipe,
    prompts: Sequence[str],
    judge: Callable[[torch.Tensor], Sequence[bool]],
    target_latents: torch.Tensor,
    config: UnlearnDiffAtkConfig = UnlearnDiffAtkConfig(),
    *,
    indices: Sequence[int] | None = None,
) -> list[UnlearnDiffAtkResult]:
    """:func:`unlearndiffatk` on each prompt (prompt i: ``index = indices[i]``, default i; target
    ``target_latents[i]``), ``config.batch_size`` prompts at a time: per iteration one U-Net call for every
    prompt still under attack, per timestep one generation and one judgement for them; a prompt leaves the
    batch at its first success, the others go on. Each prompt keeps its own generator, relaxed variable and
    Adam, and the loss is the sum of the per-prompt losses (the U-Net treats samples independently: group
    norm and attention within a sample), so each prompt's gradient, draws, prompt and image are those of its
    attack alone, up to float round-off of the batched kernels (tested)."""
    refuse_sdxl(pipe, "UnlearnDiffAtk")
    prompts = list(prompts)
    indices = list(range(len(prompts))) if indices is None else [int(i) for i in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"one index per prompt ({len(prompts)}), got {len(indices)}")
    if target_latents.dim() != 4 or target_latents.shape[0] != len(prompts):
        raise ValueError(f"target_latents must hold one latent (N, C, h, w) per prompt ({len(prompts)}), got "
                         f"{tuple(target_latents.shape)}")
    out: list[UnlearnDiffAtkResult] = []
    for start in range(0, len(prompts), config.batch_size):
        part = slice(start, start + config.batch_size)
        out += _attack_batch(pipe, prompts[part], judge, target_latents[part], config, indices[part])
    return out


def _judged(judge, images: torch.Tensor) -> list[bool]:
    verdicts = [bool(v) for v in judge(images)]
    if len(verdicts) != images.shape[0]:
        raise ValueError(f"judge must return one verdict per image ({images.shape[0]}), got {len(verdicts)}")
    return verdicts


def _attack_batch(pipe, prompts, judge, target_latents, config, indices) -> list[UnlearnDiffAtkResult]:
    tok, te, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    device = unet.device
    gen_kw = dict(num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale)
    encoder = PromptEncoder(tok, te, device, cache=False)
    table = te.get_input_embeddings().weight.detach()
    allowed = candidate_mask(tok, table.shape[0]).to(table.device)
    plain = [encoder.token_ids([p]) for p in prompts]
    seeds = [config.seed + i for i in indices]

    images = generate_from_ids(pipe, torch.cat(plain), seed=seeds, **gen_kw)
    shown = _judged(judge, images)
    # the state is built in prompt order after the plain generations: each generator then makes the draws
    # its prompt's attack alone makes
    attacks = [_PromptAttack(p, i, ids, config, table, allowed) for p, i, ids in zip(prompts, indices, plain)]
    active = [j for j, s in enumerate(shown) if not s]
    final = list(images)

    x0 = target_latents.to(device=device, dtype=torch.float32)
    alphas = pipe.scheduler.alphas_cumprod
    prediction_type = pipe.scheduler.config.prediction_type
    T = int(pipe.scheduler.config.num_train_timesteps)
    k = config.prefix_tokens
    flags = [(p, p.requires_grad) for p in list(unet.parameters()) + list(te.parameters())]
    unet.requires_grad_(False)
    te.requires_grad_(False)
    try:
        for t in attack_timesteps(T, config.timesteps) if active else []:
            tt = torch.tensor([t], device=device)
            level = training_level(alphas, tt)
            for _ in range(config.iterations):
                noise = torch.stack([torch.randn(x0.shape[1:], generator=attacks[j].gen) for j in active]).to(x0)
                x_t = add_noise(x0[active], noise, level)
                target = prediction_target(x0[active], noise, level, prediction_type)
                with torch.enable_grad():
                    cond = encoder.encode([prompts[j] for j in active],
                                          torch.stack([attacks[j].relaxed() for j in active]))
                    pred = unet(x_t.to(unet.dtype), tt.expand(len(active)),
                                encoder_hidden_states=cond.to(unet.dtype)).sample.float()
                    per_prompt = (pred - target.float()).pow(2).flatten(1).mean(dim=1)  # F.mse_loss of each
                    grads = torch.autograd.grad(per_prompt.sum(), [attacks[j].var for j in active])
                for j, loss, grad in zip(active, per_prompt.detach().tolist(), grads):
                    attacks[j].losses.append(loss)
                    attacks[j].step(grad)
            for j in active:
                attacks[j].ids = prompt_token_ids(encoder, prompts[j], attacks[j].discrete())
                attacks[j].evaluations += 1
            images = generate_from_ids(pipe, torch.cat([attacks[j].ids for j in active]),
                                       seed=[seeds[j] for j in active], **gen_kw)
            for j, image, hit in zip(active, images, _judged(judge, images)):
                final[j] = image
                attacks[j].success = hit
            active = [j for j in active if not attacks[j].success]
            if not active:
                break
    finally:
        for p, f in flags:
            p.requires_grad_(f)
    results = []
    for j, a in enumerate(attacks):
        ids = plain[j] if shown[j] else a.ids
        text, same = _decoded(tok, ids)
        results.append(UnlearnDiffAtkResult(
            shown[j] or a.success, shown[j], ids[0].tolist(), [] if shown[j] else ids[0, 1:1 + k].tolist(), text,
            same, a.evaluations, a.seed, a.losses, final[j][None]))
    return results
