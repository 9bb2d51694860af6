"""Held-out loss, perplexity and bits per byte of a model on prepared data or raw text."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare, read_metadata
from ngram_jax.data.tokenizer import load_tokenizer
from ngram_jax.sharding import param_context


def bytes_per_token(tokenizer_path: str | Path, vocab_size: int) -> np.ndarray:
    """UTF-8 bytes each token id decodes to (special tokens: 0). Exact for text whose characters no
    token splits (a token holding part of a multi-byte character counts its decoded replacement)."""
    tok = load_tokenizer(tokenizer_path)
    special = {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values()}
    return np.array([0 if i in special else len(tok.decode([i]).encode("utf-8")) for i in range(vocab_size)],
                    np.int64)


def evaluate(model, data: str | Path, *, seq_len: int, batch_size: int, tokenizer: str | Path | None = None,
             split: str = "heldout", max_batches: int | None = None, mesh=None, rules=None) -> dict:
    """Mean next-token loss over ``split`` of a prepared directory, or over a raw .txt/.jsonl file
    (tokenized with ``tokenizer``). Returns loss (nats/token), perplexity, bits_per_byte, tokens."""
    from ngram_jax.train.loop import eval_step

    data = Path(data)
    with tempfile.TemporaryDirectory() as tmp:
        if data.is_file():
            if tokenizer is None:
                raise ValueError(f"{data} is raw text: give the tokenizer to encode it with")
            prepare([data], Path(tmp) / "eval", tokenizer=tokenizer, heldout_fraction=1.0)
            data, split = Path(tmp) / "eval", "heldout"
        meta = read_metadata(data)
        vocab = model.config.vocab_size
        if meta["vocab_size"] != vocab:
            raise ValueError(f"{data} was tokenized with vocab_size {meta['vocab_size']}, the model has {vocab}")
        nbytes = bytes_per_token(data / "tokenizer.json", vocab)
        ds = make_dataset(data, split, seq_len=seq_len, batch_size=batch_size, vocab_size=vocab, seed=0, repeat=False)
        step = nnx.jit(eval_step)
        total = count = byte_count = 0.0
        with param_context(mesh, rules) if mesh is not None else param_context(None):
            for i, batch in enumerate(ds):
                if max_batches is not None and i >= max_batches:
                    break
                s, c = step(model, batch)
                total, count = total + float(s), count + float(c)
                byte_count += float((nbytes[batch["targets"]] * batch["loss_mask"]).sum())
    if count == 0:
        raise ValueError(f"{data}: split {split!r} yields no full batch of {batch_size}x{seq_len}")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count),
            "bits_per_byte": total / math.log(2) / byte_count if byte_count else math.nan}
