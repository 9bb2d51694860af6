"""Pallas TPU kernel: token ids in (scalar-prefetched), n-gram ids computed in the kernel, rows of every
sub-table DMA'd straight from the HBM-resident table shard into the output block.

Per grid step a block of ``TOKENS_PER_STEP`` tokens is processed: the scalar core hashes each
(token, sub-table) pair with exact int32 arithmetic (modular multiply by doubling, never above
2^31 - 1), then starts one row DMA per pair -- all of the block's copies in flight at once -- and
waits for them. Ids outside this shard's rows ``[row_start, row_start + R)`` write zeros instead, so
the kernel runs unchanged on one shard inside ``shard_map``. The output block ``[TB, T, d_e]`` spans
the full last two dimensions, which satisfies the TPU tiling rule. The backward pass (a custom VJP)
scatter-adds row gradients into the shard with XLA's segment-sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ngram_jax.kernels.ngram_gather.reference import flat_rows
from ngram_jax.kernels.ngram_gather.xla import scatter_add_rows
from ngram_jax.ngram import hashing

TOKENS_PER_STEP = 8
TOKEN_BITS = (hashing.MAX_VOCAB_SIZE - 1).bit_length()  # token ids < 2^20


def _mulmod(a, c, m):
    """(a * c) mod m for 0 <= a < 2^20, 0 <= c < m < 2^31, in int32 without overflow: binary
    doubling, where 2r mod m is r - (m - r) or r + r, and r + c mod m is r - (m - c) or r + c."""

    def body(b, r):
        d = m - r
        r = jnp.where(r >= d, r - d, r + r)
        d = m - c
        plus = jnp.where(r >= d, r - d, r + c)
        return jnp.where(((a >> (TOKEN_BITS - 1 - b)) & 1) == 1, plus, r)

    return jax.lax.fori_loop(0, TOKEN_BITS, body, jnp.int32(0))


def _kernel(tok_ref, start_ref, c_ref, m_ref, off_ref, rs_ref, table_ref, out_ref, rows_sc, sem, *,
            num_tables: int, splits: int, hist: int):
    blk = pl.program_id(0)
    shard_rows = table_ref.shape[0]
    row_start = rs_ref[0]

    def inside(k):
        return (rows_sc[k] >= 0) & (rows_sc[k] < shard_rows)

    def copy(i, idx, k):
        return pltpu.make_async_copy(table_ref.at[pl.ds(rows_sc[k], 1), :], out_ref.at[i, pl.ds(idx, 1), :], sem.at[k])

    for i in range(TOKENS_PER_STEP):
        t = blk * TOKENS_PER_STEP + i
        x, seg_start = tok_ref[t], start_ref[t]
        for idx in range(num_tables):
            n = idx // splits + 2
            m = m_ref[idx]
            h = x % m
            for j in range(1, n):
                prev = jnp.where(t - j >= seg_start, tok_ref[jnp.maximum(t - j, 0)], 0)
                term = _mulmod(prev, c_ref[idx * hist + j - 1], m)
                d = m - term
                h = jnp.where(h >= d, h - d, h + term)
            k = i * num_tables + idx
            rows_sc[k] = off_ref[idx] + h - row_start

            @pl.when(inside(k))
            def _start(i=i, idx=idx, k=k):
                copy(i, idx, k).start()

            @pl.when(jnp.logical_not(inside(k)))
            def _zero(i=i, idx=idx):
                out_ref[i, pl.ds(idx, 1), :] = jnp.zeros((1, out_ref.shape[-1]), out_ref.dtype)

    for i in range(TOKENS_PER_STEP):
        for idx in range(num_tables):
            k = i * num_tables + idx

            @pl.when(inside(k))
            def _wait(i=i, idx=idx, k=k):
                copy(i, idx, k).wait()


def _prefetch_args(tokens, layout: hashing.NgramLayout, eos_id, segment_ids, row_start):
    b, s = tokens.shape
    starts = hashing.segment_starts(tokens, eos_id, segment_ids) + (jnp.arange(b, dtype=jnp.int32) * s)[:, None]
    n_tok = b * s
    padded = -(-n_tok // TOKENS_PER_STEP) * TOKENS_PER_STEP
    tok = jnp.pad(tokens.reshape(-1).astype(jnp.int32), (0, padded - n_tok))
    starts = jnp.pad(starts.reshape(-1), (0, padded - n_tok), constant_values=padded)  # padding: no history
    consts = hashing.hash_constants(layout.vocab_size, layout.table_sizes, layout.max_n)  # [T, N-1] int64 < 2^31
    as_i32 = lambda v: jnp.asarray(np.asarray(v, np.int32))  # noqa: E731
    return (tok, starts, as_i32(consts.reshape(-1)), as_i32(layout.table_sizes), as_i32(layout.row_offsets),
            jnp.asarray(row_start, jnp.int32).reshape(1)), padded


def gather_rows_pallas(tokens, table, layout: hashing.NgramLayout, eos_id, segment_ids=None, row_start=0,
                       interpret=False) -> jax.Array:
    """Forward only: [B, S, T, d_e] rows of ``table`` (a shard starting at ``row_start``)."""
    b, s = tokens.shape
    t, d_e = layout.num_tables, table.shape[1]
    prefetch, padded = _prefetch_args(tokens, layout, eos_id, segment_ids, row_start)
    kernel = functools.partial(_kernel, num_tables=t, splits=layout.splits, hist=layout.max_n - 1)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded, t, d_e), table.dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(padded // TOKENS_PER_STEP,),
            in_specs=[pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=pl.BlockSpec((TOKENS_PER_STEP, t, d_e), lambda blk, *_: (blk, 0, 0)),
            scratch_shapes=[pltpu.SMEM((TOKENS_PER_STEP * t,), jnp.int32),
                            pltpu.SemaphoreType.DMA((TOKENS_PER_STEP * t,))],
        ),
        interpret=interpret,
    )(*prefetch, table)
    return out[: b * s].reshape(b, s, t, d_e)


def ngram_gather_pallas_tpu(tokens, table, *, layout, eos_id, segment_ids=None, row_start=0, proj=None,
                            interpret=False):
    """Rows (or the projected mean with ``proj``) through the kernel, differentiable w.r.t. ``table``."""

    shape, dtype = table.shape, table.dtype

    @jax.custom_vjp
    def gather(tab):
        return gather_rows_pallas(tokens, tab, layout, eos_id, segment_ids, row_start, interpret)

    def fwd(tab):
        return gather(tab), None

    def bwd(_, ct):
        rows = flat_rows(tokens, layout, eos_id, segment_ids)
        return (scatter_add_rows(shape, dtype, rows, jnp.asarray(row_start, jnp.int32), ct),)

    gather.defvjp(fwd, bwd)
    rows = gather(table)
    if proj is None:
        return rows
    return jnp.einsum("bste,ted->bsd", rows, proj) / (1 + layout.num_tables)
