"""An offline CLIP tokenizer: a real byte-level BPE ``CLIPTokenizer`` built without the hub.

Stable Diffusion's tokenizer is CLIP's 49k-token BPE, downloaded from the hub. Offline we build the
same kind of model (byte-level BPE with CLIP's ``</w>`` end-of-word suffix) from a word list and wrap
it in the real ``CLIPTokenizer`` class.

The merges grow each word from its end: ``(m, "</w>")``-terminated suffixes ``"m</w>" -> "am</w>" ->
"ram</w>" ...``. Every merge joins one symbol to a token that ends the word, so within any word only
the pair at its end can ever merge: listed words always close into one token, unknown words into
pieces, and the result depends on nothing but the sorted word list (BPE training with the
``tokenizers`` trainer breaks frequency ties in hash order, which is not reproducible).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

#: Words every zoo tokenizer knows as single tokens (the shapes world adds its vocabulary on top).
BASIC_WORDS = (
    "a an the of on in with and photo picture image drawing painting red green blue yellow "
    "purple orange black white star circle square cat dog house tree car person"
).split()


def _words(words: Iterable[str]) -> list[str]:
    out = sorted({w for phrase in (*BASIC_WORDS, *words) for w in phrase.lower().split()})
    for w in out:
        if not w.isalpha() or not w.isascii():
            raise ValueError(f"tokenizer words must be alphabetic ASCII, got {w!r}")
    return out


def suffix_merges(word_list: Iterable[str]) -> list[tuple[str, str]]:
    """The BPE merges that build every word from its last letter leftwards (sorted, de-duplicated)."""
    merges = set()
    for word in word_list:
        for i in range(len(word) - 2, -1, -1):
            merges.add((word[i], word[i + 1 :] + "</w>"))
    return sorted(merges, key=lambda m: (len(m[1]), m))


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """A deterministic ``CLIPTokenizer`` in which ``BASIC_WORDS`` and ``words`` are single tokens."""
    word_list = _words(words)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = suffix_merges(word_list)
    vocab: dict[str, int] = {}
    for token in [*alphabet, *(s + "</w>" for s in alphabet), *(a + b for a, b in merges), BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
