"""Test oracles: the SPEC formulas written straight, in numpy int64 (no JAX)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def ngram_ids_reference(tokens, *, vocab_size: int, table_sizes: Sequence[int], max_n: int,
                        splits: int, eos_id: int | None, segment_ids=None) -> np.ndarray:
    """numpy int64 oracle of :func:`ngram_ids`, a direct loop over the SPEC formula."""
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
