"""Prompt -> U-Net conditioning for erasure training, attacks and probes, with optional soft prefix tokens.

SD 1.x/2.x: a (B, L, D) tensor, encoded exactly as those pipelines' ``encode_prompt`` does (pad to the
tokenizer's maximum length, last hidden state, attention mask only where the text config asks for one).

SDXL: an :class:`XLConditioning`, encoded exactly as ``StableDiffusionXLPipeline.encode_prompt`` does: each
prompt through both tokenizer/encoder pairs (no attention mask), the **penultimate** hidden states of the
two encoders concatenated on the feature axis (B, L, D1 + D2), the pooled projection of ``text_encoder_2``
(its ``text_embeds``, B, P), and the size/crop micro-conditioning ``time_ids`` (B, 6) =
original_size + crops_coords_top_left + target_size, as ``_get_add_time_ids`` builds it for an image of
the given size (crop (0, 0), original = target, the pipeline's defaults).

Every U-Net call of the erasure code passes its conditioning through :func:`unet_kwargs`, and batches are
joined with :func:`concat`, so the extra SDXL conditioning lives here and nowhere else: a method, the
sampler or a probe handles "a conditioning" without knowing which kind it is.

A *soft prefix* replaces the word embeddings of ``k`` placeholder tokens right after the start token by free
vectors (a forward hook on the token-embedding layer), so attacks optimise prompts in word-embedding space
while the text encoder runs unchanged (UnlearnDiffAtk / AdvUnlearn's prefix attack). On SDXL a prefix
lives in both encoders' word-embedding spaces side by side, (k, D1 + D2): a token feeds both encoders.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class XLConditioning:
    """SDXL's U-Net conditioning of a batch: what ``encoder_hidden_states`` and ``added_cond_kwargs`` take.

    Rows are batch elements, as in a (B, L, D) tensor: index, :func:`concat`, ``.float()`` and ``.to()``
    act on the three parts together, so code written for SD 1.x conditioning tensors handles it unchanged.
    """

    embeds: torch.Tensor  # (B, L, D1 + D2): both encoders' penultimate hidden states
    pooled: torch.Tensor  # (B, P): text_encoder_2's pooled projection ("text_embeds")
    time_ids: torch.Tensor  # (B, 6): original size, crop top-left, target size

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> XLConditioning:
        return self._map(lambda t: t[index])

    def float(self) -> XLConditioning:
        return self._map(lambda t: t.float())

    def to(self, *args, **kwargs) -> XLConditioning:
        return self._map(lambda t: t.to(*args, **kwargs))

    def _map(self, fn) -> XLConditioning:
        return XLConditioning(fn(self.embeds), fn(self.pooled), fn(self.time_ids))


def concat(conds: Sequence) -> torch.Tensor | XLConditioning:
    """Join conditionings along the batch (``torch.cat`` for SD 1.x tensors, part-wise for SDXL)."""
    conds = list(conds)
    if conds and isinstance(conds[0], XLConditioning):
        return XLConditioning(torch.cat([c.embeds for c in conds]), torch.cat([c.pooled for c in conds]),
                              torch.cat([c.time_ids for c in conds]))
    return torch.cat(conds)


def unet_kwargs(cond) -> dict:
    """The U-Net's conditioning keyword arguments: ``encoder_hidden_states``, plus SDXL's ``added_cond_kwargs``."""
    if isinstance(cond, XLConditioning):
        return {"encoder_hidden_states": cond.embeds,
                "added_cond_kwargs": {"text_embeds": cond.pooled, "time_ids": cond.time_ids}}
    return {"encoder_hidden_states": cond}


def is_sdxl(pipe) -> bool:
    """Whether ``pipe`` conditions its U-Net as SDXL does (a second text encoder)."""
    return getattr(pipe, "text_encoder_2", None) is not None


def refuse_sdxl(pipe, feature: str) -> None:
    """Raise ValueError naming ``feature`` when ``pipe`` is SDXL, for features written for one text encoder."""
    if is_sdxl(pipe):
        raise ValueError(f"{feature} supports SD 1.x/2.x pipelines (one text encoder); {type(pipe).__name__} is "
                         f"SDXL (text_encoder_2), which {feature} does not support yet")


def size_ids(height: int, width: int) -> torch.Tensor:
    """SDXL's ``time_ids`` (1, 6) for a (height, width) image: original_size + crops_coords_top_left (0, 0) +
    target_size, the values ``StableDiffusionXLPipeline`` uses when it generates at that size."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)


def prompt_encoder(pipe, device, *, cache: bool = True, image_size: tuple[int, int] | None = None) -> PromptEncoder:
    """The pipeline's prompt encoder: :class:`XLPromptEncoder` for SDXL, else :class:`PromptEncoder`.

    ``image_size`` (height, width) in pixels sets SDXL's ``time_ids`` (default: the pipeline's default size,
    the U-Net's sample size times the VAE factor).
    """
    if not is_sdxl(pipe):
        return PromptEncoder(pipe.tokenizer, pipe.text_encoder, device, cache)
    if image_size is None:
        side = pipe.unet.config.sample_size
        side = side if isinstance(side, int) else side[0]
        image_size = (side * pipe.vae_scale_factor,) * 2
    return XLPromptEncoder((pipe.tokenizer, pipe.tokenizer_2), (pipe.text_encoder, pipe.text_encoder_2), device,
                           size_ids(*image_size), cache)


def _placeholder(tokenizer) -> int:
    """A placeholder that is an ordinary single token (never EOS: legacy CLIP pooling takes argmax id)."""
    return tokenizer("a").input_ids[1]


def _token_ids(tokenizer, placeholder: int, prompts: list[str], prefix_tokens: int) -> torch.Tensor:
    max_length = int(tokenizer.model_max_length)
    if prefix_tokens < 0 or prefix_tokens >= max_length - 2:
        raise ValueError(f"prefix_tokens must be in [0, {max_length - 3}], got {prefix_tokens}")
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_length - prefix_tokens,
                    truncation=True, return_tensors="pt").input_ids
    if prefix_tokens:
        fill = torch.full((ids.shape[0], prefix_tokens), placeholder, dtype=ids.dtype)
        ids = torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1)
    return ids


class PromptEncoder:
    """Tokenize and encode prompts (SD 1.x/2.x); caches results when the text encoder is frozen and no
    prefix is used."""

    def __init__(self, tokenizer, text_encoder, device, cache: bool = True):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.cache_enabled = cache
        self._cache: dict[str, torch.Tensor | XLConditioning] = {}
        self.placeholder_id = _placeholder(tokenizer)

    @property
    def text_encoders(self) -> tuple:
        """The encoders run, in the order ``encode(..., encoders=...)`` overrides them."""
        return (self.text_encoder,)

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def embedding_dim(self) -> int:
        """Width of a soft-prefix token: the word-embedding width (summed over the encoders on SDXL)."""
        return sum(int(te.get_input_embeddings().weight.shape[1]) for te in self.text_encoders)

    def word_embeddings(self) -> torch.Tensor:
        """(V, embedding_dim) the vocabulary's embeddings in the soft-prefix space (detached): each encoder's
        table side by side, so a row is one token as every encoder sees it."""
        tables = [te.get_input_embeddings().weight.detach() for te in self.text_encoders]
        if len({t.shape[0] for t in tables}) != 1:
            raise ValueError(f"a soft prefix needs one vocabulary, but the text encoders' vocabularies differ "
                             f"({[t.shape[0] for t in tables]} tokens)")
        return torch.cat([t.to(tables[0].device) for t in tables], dim=1)

    def token_ids(self, prompts: list[str], prefix_tokens: int = 0) -> torch.Tensor:
        """(B, max_length) ids; ``prefix_tokens`` placeholders inserted after the start token."""
        return _token_ids(self.tokenizer, self.placeholder_id, prompts, prefix_tokens)

    def encode(self, prompts: list[str], prefix: torch.Tensor | None = None, encoders=None,
               cache: bool = True):
        """(B, L, D) hidden states (SDXL: an :class:`XLConditioning`). ``prefix`` (k, D) or (B, k, D): soft
        tokens after the start token.

        ``encoders`` overrides the modules called, one per ``text_encoders`` entry (DDP wrappers of the same
        text encoders). ``cache=False`` neither reads nor writes the cache: for a text encoder whose weights
        change (training), whose cached values would go stale.
        """
        prompts = list(prompts)
        encoders = tuple(encoders) if encoders is not None else self.text_encoders
        if prefix is None and cache and self.cache_enabled and not torch.is_grad_enabled():
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            if missing:
                out = self._run(encoders, missing, None)
                self._cache.update({p: out[i:i + 1] for i, p in enumerate(missing)})
            return concat([self._cache[p] for p in prompts])
        return self._run(encoders, prompts, prefix)

    def _run(self, encoders, prompts: list[str], prefix: torch.Tensor | None):
        (encoder,) = encoders
        k = 0 if prefix is None else prefix.shape[-2]
        ids = self.token_ids(prompts, k).to(self.device)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = (ids != self.tokenizer.pad_token_id).long()
        with soft_prefix(self.text_encoder, prefix):
            return encoder(ids, **kwargs)[0]


class XLPromptEncoder(PromptEncoder):
    """SDXL's two tokenizers and text encoders, encoded as ``StableDiffusionXLPipeline.encode_prompt``.

    ``time_ids`` (1, 6) is the micro-conditioning every row gets (:func:`size_ids`). A soft prefix (k, D1 + D2)
    is split on the feature axis: its first D1 columns enter ``text_encoder``, the rest ``text_encoder_2``.
    """

    def __init__(self, tokenizers, text_encoders, device, time_ids: torch.Tensor, cache: bool = True):
        super().__init__(tokenizers[0], text_encoders[0], device, cache)
        self.tokenizer_2, self.text_encoder_2 = tokenizers[1], text_encoders[1]
        self.placeholder_id_2 = _placeholder(self.tokenizer_2)
        self.time_ids = time_ids

    @property
    def text_encoders(self) -> tuple:
        return (self.text_encoder, self.text_encoder_2)

    def _run(self, encoders, prompts: list[str], prefix: torch.Tensor | None) -> XLConditioning:
        k = 0 if prefix is None else prefix.shape[-2]
        widths = [int(te.get_input_embeddings().weight.shape[1]) for te in self.text_encoders]
        parts = [None, None] if prefix is None else list(prefix.split(widths, dim=-1))
        towers = zip((self.tokenizer, self.tokenizer_2), (self.placeholder_id, self.placeholder_id_2),
                     self.text_encoders, encoders, parts)
        hidden, pooled = [], None
        for tokenizer, placeholder, text_encoder, encoder, part in towers:
            ids = _token_ids(tokenizer, placeholder, prompts, k).to(self.device)
            with soft_prefix(text_encoder, part):
                out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # encode_prompt: the first 2-D output is the pooled one
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        time_ids = self.time_ids.to(device=embeds.device, dtype=embeds.dtype).expand(len(prompts), -1)
        return XLConditioning(embeds, pooled, time_ids)


@contextmanager
def soft_prefix(text_encoder, prefix: torch.Tensor | None):
    """Replace the token embeddings at positions 1..k by ``prefix`` for the duration of the block."""
    if prefix is None:
        yield
        return
    layer = text_encoder.get_input_embeddings()
    k = prefix.shape[-2]

    def hook(module, args, output):
        p = prefix.to(device=output.device, dtype=output.dtype)
        p = p.expand(output.shape[0], k, output.shape[-1]) if p.dim() == 2 else p
        return torch.cat([output[:, :1], p, output[:, 1 + k:]], dim=1)

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
