"""Held-out loss, perplexity and bits per byte of a model on prepared data or raw text."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

from ngram_jax import storage
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare, read_metadata
from ngram_jax.data.tokenizer import load_tokenizer
from ngram_jax.errors import DataError
from ngram_jax.sharding import param_context
from ngram_jax.train.loss import eval_step


def target_bytes(tokenizer, inputs: np.ndarray, targets: np.ndarray, loss_mask: np.ndarray) -> int:
    """UTF-8 bytes of the text that the scored targets decode to, counted on whole sequences.

    Each contiguous run ``t0..t1`` of ``loss_mask`` in a row (one document, or the part of one that
    the row holds) is decoded as one sequence together with the token before it,
    ``inputs[t0]``: its bytes are ``len(decode([inputs[t0], *targets[t0:t1+1]])) -
    len(decode([inputs[t0]]))``. Decoding token by token is wrong for tokenizers whose decoder
    depends on neighbours: SentencePiece / Metaspace drops each word's leading space when a token is
    decoded alone (about 27% fewer bytes on English), byte-level BPE turns the parts of a multi-byte
    character into replacement characters. Special tokens (EOS) decode to no bytes.
    """
    seqs, ctx = [], []
    for x, y, m in zip(np.asarray(inputs), np.asarray(targets), np.asarray(loss_mask) > 0, strict=True):
        edges = np.diff(np.concatenate([[0], m.astype(np.int8), [0]]))
        for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            seqs.append([int(x[start])] + [int(t) for t in y[start:stop]])
            ctx.append([int(x[start])])
    if not seqs:
        return 0
    full = tokenizer.decode_batch(seqs, skip_special_tokens=True)
    before = tokenizer.decode_batch(ctx, skip_special_tokens=True)
    return sum(len(a.encode("utf-8")) - len(b.encode("utf-8")) for a, b in zip(full, before, strict=True))


def evaluate(model, data: str | os.PathLike, *, seq_len: int, batch_size: int,
             tokenizer: str | os.PathLike | None = None, split: str = "heldout", max_batches: int | None = None,
             mesh=None, rules=None) -> dict:
    """Mean next-token loss over ``split`` of a prepared directory, or over a raw .txt/.jsonl file
    (tokenized with ``tokenizer``). Returns loss (nats/token), perplexity, bits_per_byte, tokens and
    bytes (the UTF-8 bytes of the scored targets' text, see :func:`target_bytes`)."""
    data = storage.location(data, "--data")
    with tempfile.TemporaryDirectory() as tmp:
        with storage.reported(data, "--data"):
            raw = data.is_file()
        if raw:
            if tokenizer is None:
                raise DataError(f"{data} is raw text: give the tokenizer to encode it with (eval.py --tokenizer FILE)")
            prepare([data], Path(tmp) / "eval", tokenizer=tokenizer, heldout_fraction=1.0)
            data, split = Path(tmp) / "eval", "heldout"
        meta = read_metadata(data)
        vocab = model.config.vocab_size
        if meta["vocab_size"] != vocab:
            raise DataError(f"{data} was tokenized with vocab_size {meta['vocab_size']}, the model has {vocab}: "
                            "evaluate on data prepared with the model's tokenizer")
        tok = load_tokenizer(data / "tokenizer.json")
        ds = make_dataset(data, split, seq_len=seq_len, batch_size=batch_size, vocab_size=vocab, seed=0, repeat=False)
        step = nnx.jit(eval_step)
        total = count = byte_count = 0.0
        with param_context(mesh, rules) if mesh is not None else param_context(None):
            for i, batch in enumerate(ds):
                if max_batches is not None and i >= max_batches:
                    break
                s, c = step(model, batch)
                total, count = total + float(s), count + float(c)
                byte_count += target_bytes(tok, batch["inputs"], batch["targets"], batch["loss_mask"])
    if count == 0:
        raise DataError(f"{data}: split {split!r} yields no full batch of {batch_size}x{seq_len}: lower the batch "
                        "size or the sequence length, or give more text")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(count), "bytes": int(byte_count),
            "bits_per_byte": total / math.log(2) / byte_count if byte_count else math.nan}
