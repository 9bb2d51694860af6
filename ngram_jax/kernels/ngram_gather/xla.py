"""XLA path: the same gather as the reference, with an explicit segment-sum backward (a custom VJP that
scatter-adds row gradients into the table shard; duplicate ids accumulate)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ngram_jax.kernels.ngram_gather.reference import flat_rows, masked_rows


def scatter_add_rows(table_shape, dtype, rows, row_start, ct) -> jax.Array:
    """Gradient of :func:`masked_rows` w.r.t. the table: segment-sum of ``ct`` [..., d_e] by row."""
    local = rows - row_start
    ok = (local >= 0) & (local < table_shape[0])
    index = jnp.where(ok, local, table_shape[0])  # out of this shard -> past the end: dropped
    return jnp.zeros(table_shape, dtype).at[index].add(ct.astype(dtype), mode="drop")


def gather_with_vjp(gather_fn):
    """Wrap ``gather_fn(table, rows, row_start) -> [..., d_e]`` with the segment-sum backward."""

    @jax.custom_vjp
    def gather(table, rows, row_start):
        return gather_fn(table, rows, row_start)

    def fwd(table, rows, row_start):
        return gather_fn(table, rows, row_start), (rows, row_start, table)  # the table: shape, no copy

    def bwd(res, ct):
        rows, row_start, table = res
        return scatter_add_rows(table.shape, table.dtype, rows, row_start, ct), None, None

    gather.defvjp(fwd, bwd)
    return gather


gather_rows = gather_with_vjp(masked_rows)  # (table, rows, row_start) -> [..., d_e], segment-sum backward


def ngram_gather_xla(tokens, table, *, layout, eos_id, segment_ids=None, row_start=0, proj=None):
    rows = gather_rows(table, flat_rows(tokens, layout, eos_id, segment_ids), jnp.asarray(row_start, jnp.int32))
    if proj is None:
        return rows
    return jnp.einsum("bste,ted->bsd", rows, proj) / (1 + layout.num_tables)
