"""The oracle: tokens -> n-gram ids -> rows of one table shard (-> optional projected mean), pure JAX.

``table`` holds rows ``[row_start, row_start + R)`` of the flattened N-gram table (the whole table
when ``row_start == 0`` and R covers it); ids outside the shard give zero rows, so the sum of the
results of all shards is the full lookup.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ngram_jax.ngram import hashing


def flat_rows(tokens, layout: hashing.NgramLayout, eos_id, segment_ids=None) -> jax.Array:
    """Rows of the flattened table each position reads. int32 [B, S, T]."""
    ids = hashing.ngram_ids(tokens, vocab_size=layout.vocab_size, table_sizes=layout.table_sizes,
                            max_n=layout.max_n, splits=layout.splits, eos_id=eos_id, segment_ids=segment_ids)
    return hashing.flat_row_ids(ids, layout.row_offsets)


def masked_rows(table: jax.Array, rows: jax.Array, row_start) -> jax.Array:
    """``table[rows - row_start]`` where in range, zeros elsewhere. rows [...] -> [..., d_e]."""
    local = rows - row_start
    ok = (local >= 0) & (local < table.shape[0])
    vals = table.at[jnp.where(ok, local, 0)].get(mode="promise_in_bounds")
    return jnp.where(ok[..., None], vals, jnp.zeros((), table.dtype))


def ngram_gather_reference(tokens, table, *, layout, eos_id, segment_ids=None, row_start=0, proj=None):
    """[B, S, T, d_e] rows, or with ``proj`` [T, d_e, D] the projected sum / (1 + T) [B, S, D]."""
    rows = masked_rows(table, flat_rows(tokens, layout, eos_id, segment_ids), row_start)
    if proj is None:
        return rows
    return jnp.einsum("bste,ted->bsd", rows, proj) / (1 + layout.num_tables)
