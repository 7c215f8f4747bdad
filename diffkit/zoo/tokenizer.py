"""An offline CLIP tokenizer: a real byte-level BPE ``CLIPTokenizer`` built without the hub.

Stable Diffusion's tokenizer is CLIP's 49k-token BPE, downloaded from the hub. Offline we train the
same kind of model (byte-level BPE with CLIP's ``</w>`` end-of-word suffix) with the ``tokenizers``
library on a small word list, until every listed word is one token, and wrap it in the real
``CLIPTokenizer`` class. Unknown words still tokenize, as pieces.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
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
        if not w.isalpha():
            raise ValueError(f"tokenizer words must be alphabetic, got {w!r}")
    return out


def build_clip_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> CLIPTokenizer:
    """Train a deterministic byte-level BPE on ``BASIC_WORDS`` + ``words``; return a ``CLIPTokenizer``.

    Every word of the list encodes to exactly one token ``word</w>``.
    """
    word_list = _words(words)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    # Enough merges for every word to close into one token; the trainer stops early when done.
    budget = len(alphabet) * 2 + sum(len(w) for w in word_list) + 2
    trainer = trainers.BpeTrainer(
        vocab_size=budget,
        min_frequency=0,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    bpe.train_from_iterator(word_list, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    for sym in alphabet:  # lone byte symbols at word end (CLIP's vocab has both forms)
        vocab.setdefault(sym + "</w>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    unsplit = [w for w in word_list if len(tok.tokenize(w)) != 1]
    if unsplit:  # pragma: no cover - guards the budget arithmetic above
        raise RuntimeError(f"BPE training left words split: {unsplit[:5]}")
    return tok
