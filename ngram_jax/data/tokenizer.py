"""Tokenizers: any Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), or a byte-level BPE
trained on a corpus in seconds. The end-of-document token is ``<|endoftext|>`` (id 0 when trained here)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with ``<|endoftext|>`` as id 0 (every byte is in the base alphabet, so any
    text encodes)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path} (expected a Hugging Face tokenizer.json)")
    return Tokenizer.from_file(str(path))


def eos_id(tok: Tokenizer) -> int:
    for name in (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    raise ValueError(f"the tokenizer has no end-of-document token (looked for {EOS_TOKEN}, </s>, <eos>)")


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()[:16]
