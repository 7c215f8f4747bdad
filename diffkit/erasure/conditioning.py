"""Prompt -> U-Net conditioning for erasure training and attacks, with optional soft prefix tokens.

Encodes exactly as the SD 1.x/2.x pipelines' ``encode_prompt`` does (pad to the tokenizer's maximum
length, last hidden state, attention mask only where the text config asks for one). A *soft prefix*
replaces the word embeddings of ``k`` placeholder tokens right after the start token by free vectors
(a forward hook on the token-embedding layer), so attacks optimise prompts in word-embedding space
while the text encoder runs unchanged (UnlearnDiffAtk / AdvUnlearn's prefix attack).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class PromptEncoder:
    """Tokenize and encode prompts; caches results when the text encoder is frozen and no prefix is used."""

    def __init__(self, tokenizer, text_encoder, device, cache: bool = True):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.cache_enabled = cache
        self._cache: dict[str, torch.Tensor] = {}
        ids = tokenizer("a").input_ids
        # A placeholder that is an ordinary single token (never EOS: legacy CLIP pooling takes argmax id).
        self.placeholder_id = ids[1]

    @property
    def max_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def embedding_dim(self) -> int:
        return int(self.text_encoder.get_input_embeddings().weight.shape[1])

    def token_ids(self, prompts: list[str], prefix_tokens: int = 0) -> torch.Tensor:
        """(B, max_length) ids; ``prefix_tokens`` placeholders inserted after the start token."""
        if prefix_tokens < 0 or prefix_tokens >= self.max_length - 2:
            raise ValueError(f"prefix_tokens must be in [0, {self.max_length - 3}], got {prefix_tokens}")
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length - prefix_tokens,
                             truncation=True, return_tensors="pt").input_ids
        if prefix_tokens:
            fill = torch.full((ids.shape[0], prefix_tokens), self.placeholder_id, dtype=ids.dtype)
            ids = torch.cat([ids[:, :1], fill, ids[:, 1:]], dim=1)
        return ids

    def encode(self, prompts: list[str], prefix: torch.Tensor | None = None, encoder=None,
               cache: bool = True) -> torch.Tensor:
        """(B, L, D) hidden states. ``prefix`` (k, D) or (B, k, D): soft tokens after the start token.

        ``encoder`` overrides the module called (a DDP wrapper of the same text encoder). ``cache=False``
        neither reads nor writes the cache: for a text encoder whose weights change (training), whose
        cached values would go stale.
        """
        prompts = list(prompts)
        encoder = encoder if encoder is not None else self.text_encoder
        if prefix is None and cache and self.cache_enabled and not torch.is_grad_enabled():
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            if missing:
                out = self._run(encoder, self.token_ids(missing), None)
                self._cache.update({p: out[i:i + 1] for i, p in enumerate(missing)})
            return torch.cat([self._cache[p] for p in prompts])
        k = 0 if prefix is None else prefix.shape[-2]
        return self._run(encoder, self.token_ids(prompts, k), prefix)

    def _run(self, encoder, ids: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        ids = ids.to(self.device)
        kwargs = {}
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            kwargs["attention_mask"] = (ids != self.tokenizer.pad_token_id).long()
        with soft_prefix(self.text_encoder, prefix):
            return encoder(ids, **kwargs)[0]


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
