"""Test oracles: the paper's formulas (section 3) written straight, in numpy int64 (no JAX)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ngram_ids_reference(tokens, *, vocab_size: int, table_sizes: Sequence[int], max_n: int,
                        splits: int, eos_id: int | None, segment_ids=None) -> np.ndarray:
    """numpy int64 oracle of :func:`ngram_ids`, a direct loop over the formula."""
    x = np.asarray(tokens, np.int64)
    seg = None if segment_ids is None else np.asarray(segment_ids)
    b, s = x.shape
    out = np.zeros((b, s, len(table_sizes)), np.int64)
    for bi in range(b):
        start = 0
        for t in range(s):
            if t > 0 and ((eos_id is not None and x[bi, t - 1] == eos_id)
                          or (seg is not None and seg[bi, t] != seg[bi, t - 1])):
                start = t
            for idx, m in enumerate(table_sizes):
                n = idx // splits + 2
                h = int(x[bi, t])
                for j in range(1, n):
                    prev = int(x[bi, t - j]) if t - j >= start else 0
                    h += prev * (vocab_size**j % m)
                out[bi, t, idx] = h % m
    return out


def causal_attention_reference(q, k, v, segment_ids, scale: float) -> np.ndarray:
    """numpy float64 oracle of :func:`causal_attention`: a loop over rows and heads, each query
    attending to the earlier keys of its own document (GQA: query head h reads key head h // G)."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    b, s, h, _ = q.shape
    g = h // k.shape[2]
    seg = np.ones((b, s), np.int64) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((b, s, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for t in range(s):
                keys = [j for j in range(t + 1) if seg[bi, j] == seg[bi, t]]
                scores = np.array([q[bi, t, hi] @ k[bi, j, hi // g] for j in keys]) * scale
                p = np.exp(scores - scores.max())
                out[bi, t, hi] = (p / p.sum()) @ v[bi, keys, hi // g]
    return out
