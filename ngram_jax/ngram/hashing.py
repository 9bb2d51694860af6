"""N-gram id maths for N-gram Embeddings (the paper, section 3), as pure functions.

Sub-table ``idx(n, k) = (n - 2) * K + k`` for n in 2..N and k in 0..K-1 has size
``M_idx = int(r * V + 2 * idx + 1)`` in float arithmetic, as the reference computes it (written as
``floor(r * V) + 2 * idx + 1``; the two differ only where ``r * V`` rounds below an integer, see
:func:`table_sizes`). The id of the n-gram ending at position t is

    h_idx(t) = ( x_t + sum_{j=1}^{n-1} x~_{t-j} * (V^j mod M_idx) ) mod M_idx

where x~ is the history: token 0 before the start of the token's segment. A segment ends at and
includes an EOS token, and a change of ``segment_ids`` (packed documents) starts a new one.

JAX runs with 32-bit integers (x64 off, as on TPU) while ``x * (V^j mod M)`` reaches 2^51, so the
device path uses an exact 32-bit modular multiply (:func:`mulmod_u32`). The oracles (the same maths
in numpy int64, written straight from the formula) live in ``tests/oracles.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Exactness limits of the 32-bit path (see mulmod_u32): tokens below 2^20, tables below 2^31.
MAX_VOCAB_SIZE = 1 << 20
MAX_TABLE_SIZE = (1 << 31) - 1


class NgramLayout(NamedTuple):
    """Static description of the sub-tables of one N-gram Embedding."""

    vocab_size: int
    max_n: int
    splits: int
    table_sizes: tuple[int, ...]  # M_idx, len T
    row_offsets: tuple[int, ...]  # exclusive prefix sums of table_sizes, len T
    padded_rows: int  # rows of the flattened parameter: sum(M) rounded up to row_multiple

    @property
    def num_tables(self) -> int:
        return len(self.table_sizes)

    @property
    def total_rows(self) -> int:
        return sum(self.table_sizes)

    def order_of(self, idx: int) -> int:
        """n-gram order n of sub-table idx."""
        return idx // self.splits + 2


def num_tables(max_n: int, splits: int) -> int:
    """T = K * (N - 1)."""
    return splits * (max_n - 1)


def table_sizes(vocab_size: int, max_n: int, splits: int, ratio: float) -> tuple[int, ...]:
    """Sub-table sizes ``M_idx = int(ratio * V + 2 * idx + 1)`` in Python float arithmetic.

    This is the reference's arithmetic exactly (HF ``modeling_longcat_ngram.py``, sglang and vLLM:
    ``m = ngram_vocab_size_ratio * vocab_size``; ``int(m + 2 * i + 1)``): the product and the sum are
    IEEE doubles, then truncated. For an integer ``ratio * V`` this is ``ratio * V + 2 * idx + 1``
    (odd, all distinct); for other ratios the float rounding of the reference is kept, e.g. V=100,
    r=0.57: ``0.57 * 100 = 56.99999999999999`` gives sizes 57, 59, 61, 63, 66, 68, ... (strictly
    increasing, so still distinct, but not all odd), so that weights import and export 1:1.
    """
    _check_layout_args(vocab_size, max_n, splits)
    if not ratio > 0:
        raise ValueError(f"table ratio must be > 0, got {ratio}")
    m = (ratio if isinstance(ratio, int) else float(ratio)) * vocab_size  # int stays exact, as in Python
    sizes = tuple(int(m + idx * 2 + 1) for idx in range(num_tables(max_n, splits)))
    if sizes[-1] > MAX_TABLE_SIZE:
        raise ValueError(
            f"sub-table size {sizes[-1]} exceeds 2^31 - 1 (ratio={ratio}, vocab_size={vocab_size}); "
            f"use ratio <= {(MAX_TABLE_SIZE - 2 * len(sizes)) / vocab_size:.4g}"
        )
    return sizes


def make_layout(vocab_size: int, max_n: int, splits: int, ratio: float, row_multiple: int = 1) -> NgramLayout:
    """Sizes and offsets of the sub-tables; the flattened table is padded with never-read rows to a
    multiple of ``row_multiple`` so that a mesh can split it evenly."""
    sizes = table_sizes(vocab_size, max_n, splits, ratio)
    offsets = tuple(int(o) for o in np.cumsum((0,) + sizes[:-1]))
    padded = -(-sum(sizes) // row_multiple) * row_multiple
    if padded > MAX_TABLE_SIZE:
        raise ValueError(
            f"flattened table has {offsets[-1] + sizes[-1]} rows, more than int32 row ids can address "
            "(2^31 - 1); lower the ratio, N or K"
        )
    return NgramLayout(vocab_size, max_n, splits, sizes, offsets, padded)


def _check_layout_args(vocab_size: int, max_n: int, splits: int) -> None:
    if not 2 <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be in [2, 2^20], got {vocab_size}")
    if max_n < 2:
        raise ValueError(f"max_n (N) must be >= 2, got {max_n}")
    if splits < 1:
        raise ValueError(f"splits (K) must be >= 1, got {splits}")


def _check_sizes(vocab_size: int, sizes: Sequence[int], max_n: int, splits: int) -> None:
    _check_layout_args(vocab_size, max_n, splits)
    if len(sizes) != num_tables(max_n, splits):
        raise ValueError(f"expected K*(N-1) = {num_tables(max_n, splits)} table sizes, got {len(sizes)}")
    for m in sizes:
        if not 1 <= m <= MAX_TABLE_SIZE:
            raise ValueError(f"table sizes must be in [1, 2^31 - 1], got {m}")


def hash_constants(vocab_size: int, sizes: Sequence[int], max_n: int) -> np.ndarray:
    """``C[idx, j-1] = V^j mod M_idx`` for j in 1..N-1, zero where j >= n(idx). int64 [T, N-1]."""
    num = len(sizes)
    splits = num // (max_n - 1)
    c = np.zeros((num, max_n - 1), np.int64)
    for idx, m in enumerate(sizes):
        n = idx // splits + 2
        for j in range(1, n):
            c[idx, j - 1] = pow(vocab_size, j, m)
    return c


# ----------------------------------------------------------------------------------------------
# History: which earlier tokens each position may see.


def segment_starts(tokens: jax.Array, eos_id: int | None, segment_ids: jax.Array | None) -> jax.Array:
    """Position of the first token of each token's segment. int32 [B, S].

    A segment starts at position 0, right after an EOS, and wherever ``segment_ids`` changes.
    """
    _, s = tokens.shape
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]  # [1, S]
    start = pos == 0
    if eos_id is not None:
        after_eos = jnp.pad(tokens[:, :-1] == eos_id, ((0, 0), (1, 0)))
        start = start | after_eos
    if segment_ids is not None:
        changed = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
        start = start | changed
    return jax.lax.cummax(jnp.where(start, pos, 0), axis=1)


def history(tokens: jax.Array, max_n: int, eos_id: int | None, segment_ids: jax.Array | None) -> jax.Array:
    """``H[b, t, j-1] = x~_{t-j}`` for j in 1..N-1: the token j steps back, or 0 outside the segment.

    int32 [B, S, N-1]. Never reads a future token.
    """
    _, s = tokens.shape
    starts = segment_starts(tokens, eos_id, segment_ids)  # [B, S]
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    cols = []
    for j in range(1, max_n):
        prev = jnp.pad(tokens[:, : s - j], ((0, 0), (j, 0))) if j < s else jnp.zeros_like(tokens)
        cols.append(jnp.where(pos - j >= starts, prev, 0))
    return jnp.stack(cols, axis=-1)


# ----------------------------------------------------------------------------------------------
# Exact modular arithmetic in 32 bits.


def mulmod_u32(a: jax.Array, c: jax.Array, m: jax.Array, c_over_m: jax.Array) -> jax.Array:
    """``(a * c) mod m`` exactly, with 32-bit integers only. All inputs broadcast.

    Requires ``0 <= a < 2^20``, ``0 <= c < m <= 2^31 - 1``; ``c_over_m = float32(c / m)``.
    The quotient is estimated in float32, ``q = floor(a * c/m - 0.5)``. With ``a < 2^20`` the
    float error is at most 2^-5 (product rounding) + 2^-4 (rounding of c/m) + 2^-5 (the
    subtraction) = 0.125 < 0.5, so ``q`` is ``floor(a*c/m)`` or one less, and the remainder
    ``a*c - q*m`` lies in ``[0, 2m) < 2^32``. That remainder is computed in wrapping uint32
    arithmetic (exact modulo 2^32, hence exact), then reduced by one conditional subtraction.
    """
    a = a.astype(jnp.uint32)
    c = c.astype(jnp.uint32)
    m = m.astype(jnp.uint32)
    q = jnp.floor(a.astype(jnp.float32) * c_over_m - 0.5).astype(jnp.int32).astype(jnp.uint32)
    r = a * c - q * m  # wraps mod 2^32; the true value is in [0, 2m)
    return jnp.where(r >= m, r - m, r)


def addmod_u32(x: jax.Array, y: jax.Array, m: jax.Array) -> jax.Array:
    """``(x + y) mod m`` for ``x, y < m <= 2^31 - 1`` (the sum fits in uint32)."""
    s = x + y
    return jnp.where(s >= m, s - m, s)


def ids_from_history(tokens: jax.Array, hist: jax.Array, *, vocab_size: int,
                     table_sizes: Sequence[int], max_n: int) -> jax.Array:
    """n-gram ids from the current tokens [...] and their history [..., N-1]. int32 [..., T].

    Shared by the full-sequence path and incremental decoding (where the history is a cache).
    """
    sizes = tuple(int(m) for m in table_sizes)
    consts = hash_constants(vocab_size, sizes, max_n)  # [T, N-1]
    m = jnp.asarray(np.array(sizes, np.uint32))  # [T]
    c = jnp.asarray(consts.astype(np.uint32))
    c_over_m = jnp.asarray((consts / np.array(sizes, np.float64)[:, None]).astype(np.float32))
    x = tokens.astype(jnp.uint32)[..., None]  # [..., 1]
    h = jnp.where(x >= m, x % m, x)  # x_t mod M (x_t may exceed a tiny M)
    for j in range(max_n - 1):  # static, small
        term = mulmod_u32(hist[..., j : j + 1], c[:, j], m, c_over_m[:, j])  # [..., T]
        h = addmod_u32(h, term, m)
    return h.astype(jnp.int32)


def ngram_ids(tokens: jax.Array, *, vocab_size: int, table_sizes: Sequence[int], max_n: int,
              splits: int, eos_id: int | None, segment_ids: jax.Array | None = None) -> jax.Array:
    """n-gram ids of every position. tokens int [B, S] -> int32 [B, S, K*(N-1)], id < M_idx.

    Jit-able; exact with x64 disabled. Token ids must lie in [0, V): validate untrusted input with
    :func:`check_token_ids` first (inside jit an out-of-range id cannot raise).
    """
    _check_sizes(vocab_size, table_sizes, max_n, splits)
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    hist = history(tokens, max_n, eos_id, segment_ids)  # [B, S, N-1]
    return ids_from_history(tokens, hist, vocab_size=vocab_size, table_sizes=table_sizes, max_n=max_n)


def flat_row_ids(ids: jax.Array, row_offsets: Sequence[int]) -> jax.Array:
    """Per-table ids [..., T] -> rows of the flattened table [..., T] (adds static offsets)."""
    return ids + jnp.asarray(np.array(row_offsets, np.int32))


# ----------------------------------------------------------------------------------------------
# Validation.


def check_token_ids(tokens, vocab_size: int, *, name: str = "tokens") -> None:
    """Raise ``ValueError`` naming the first out-of-range id and its position.

    Works on numpy and concrete JAX arrays; under tracing it is a no-op (values unknown).
    """
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"{name} holds {int(bad.sum())} id(s) outside [0, {vocab_size}); first: {int(arr[where])} "
            f"at index {where}"
        )
