"""Tokenizers: any Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), or a byte-level BPE
trained on a corpus in seconds. The end-of-document token is ``<|endoftext|>``; trained here it has id
:data:`TRAINED_EOS_ID` = 1, after the padding token ``<|pad|>`` = 0, so that EOS is never the zero-fill
value of padded rows and histories (``configs/base.yaml`` sets ``model.eos_id: 1`` to match)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ngram_jax import storage
from ngram_jax.errors import DataError, MissingInputError

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)  # ids 0, 1 in a BPE trained by train_bpe
TRAINED_EOS_ID = SPECIAL_TOKENS.index(EOS_TOKEN)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``<|pad|>`` as id 0 and ``<|endoftext|>`` as id 1 (every byte is in the base
    alphabet, so any text encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A ``tokenizer.json`` (or a directory holding one), local or in a bucket."""
    path = storage.location(path, "tokenizer")
    with storage.reported(path, "tokenizer"):
        if path.is_dir():
            path = path / "tokenizer.json"
        found = path.is_file()
    if not found:
        raise MissingInputError(f"tokenizer not found: {path} (expected a Hugging Face tokenizer.json)")
    text = storage.read_text(path, "tokenizer", "a Hugging Face tokenizer.json")
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # the tokenizers library raises a bare Exception for a malformed file
        raise DataError(f"{path} is not a valid Hugging Face tokenizer.json: {err}") from None


def eos_id(tok: Tokenizer) -> int:
    for name in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise DataError(f"the tokenizer has no end-of-document token (looked for {EOS_TOKEN}, </s>, <eos>)")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
