"""Row-sharded tables: the lookup and the row-wise update run where the rows live.

The lookup never moves a table (:func:`row_sharded_lookup`): each device runs the gather over the rows it
owns for the tokens its row group sees (ids outside its shard give zeros), and the partial rows are
combined by ``psum_scatter`` (over the axes that also split the batch) and ``psum`` (over the others). The
row-wise optimizers update tables where they live (:func:`row_sharded_update`). Communication per step is
O(tokens x T x d_e), whatever the table size (docs/TRAINING.md, "Sharding").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ngram_jax.config import ConfigError
from ngram_jax.sharding import batch_axes_for, current_mesh, live_axes, mesh_axes


class RowSharding(NamedTuple):
    mesh: Mesh
    row_axes: tuple[str, ...]  # mesh axes that split the table's rows
    batch_axes: tuple[str, ...]  # mesh axes that split the batch (dim 0 of ids and activations)

    @property
    def shared(self) -> tuple[str, ...]:
        """Batch axes that also split the rows, in the batch's (major-to-minor) order."""
        return tuple(a for a in self.batch_axes if a in self.row_axes)

    @property
    def row_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.row_axes)


def row_sharding(logical: str = "ngram_rows") -> RowSharding | None:
    """How the active mesh and rules split a table whose dim 0 has logical name ``logical`` (None: it is
    not split, e.g. outside a mesh context)."""
    mesh = current_mesh()
    if mesh is None:
        return None
    row_axes = tuple(a for a in mesh_axes(logical) if a in mesh.axis_names)
    if not row_axes:
        return None
    return RowSharding(mesh, row_axes, tuple(a for a in mesh_axes("batch") if a in mesh.axis_names))


def _check_split(rs: RowSharding, rows: int, batch: int, logical: str) -> None:
    if rows % rs.row_shards:
        key = ("model.ngram.row_multiple (or model.ple.row_multiple)" if logical == "ngram_rows"
               else "model.vocab_size")
        raise ConfigError(f"table of {rows} rows cannot be split over {rs.row_shards} devices of mesh axes "
                          f"{rs.row_axes}; set {key} to a multiple of {rs.row_shards}")
    n_batch = math.prod(rs.mesh.shape[a] for a in rs.batch_axes)
    if batch % n_batch:
        raise ConfigError(f"batch of {batch} rows cannot be split over the {n_batch} devices of mesh axes "
                          f"{rs.batch_axes}; use a batch size divisible by {n_batch}")


def _spec(axes: tuple[str, ...], ndim: int) -> P:
    return P(axes if axes else None, *([None] * (ndim - 1)))


# Partial rows one chunk of a lookup over shared axes forms per device (float32 bytes): bounds its memory.
LOOKUP_CHUNK_BYTES = 256 << 20


def _chunk_positions(positions: int, bytes_per_position: int) -> int:
    """The largest divisor of ``positions`` whose chunk of partial rows fits :data:`LOOKUP_CHUNK_BYTES` (>= 1)."""
    most = max(1, LOOKUP_CHUNK_BYTES // max(bytes_per_position, 1))
    return max(d for d in range(1, min(positions, most) + 1) if positions % d == 0)


def row_sharded_lookup(fn: Callable, table: jax.Array, *batch_args: jax.Array, logical: str = "ngram_rows",
                       out_ndim: int, kernel: bool = False, positionwise: bool = True) -> jax.Array:
    """Sum over the row shards of ``fn(local_table, row_start, *batch_args)``, which must give zeros for
    ids outside ``[row_start, row_start + local_rows)``. Without a mesh: ``fn(table, 0, *batch_args)``.

    Row axes that do not split the batch: each device runs ``fn`` over its own batch shard and the rows it
    owns, and the partial results are summed (``psum``). Row axes that also split the batch (``shared``, the
    default rules' case): a device must serve the rows it owns to the whole batch of its row group, so the
    (small) batch arguments are all-gathered over the shared axes, ``fn`` runs over them, and
    ``psum_scatter`` returns each device its own positions. That is done in chunks of positions
    (:data:`LOOKUP_CHUNK_BYTES` of partial rows per device at a time, ``lax.map``), so memory stays
    O(chunk), never O(global batch x width); it needs a ``positionwise`` ``fn`` (any leading shape, e.g.
    a gather by row id; a function of whole sequences, like the kernel that hashes tokens, must not see
    shared axes). A table never moves; the output ``[B, ...]`` is sharded like the batch.

    ``kernel=True``: ``fn`` calls a Pallas kernel, which the compiler cannot partition itself ("Mosaic kernels
    cannot be automatically partitioned"): it runs inside ``shard_map`` on every mesh, over the local batch
    with the whole table when the rules replicate the table's rows (and without the VMA check, which
    ``pallas_call`` does not support).
    """
    rs = row_sharding(logical)
    if rs is None:
        mesh = current_mesh()
        if not kernel or mesh is None:
            return fn(table, jnp.int32(0), *batch_args)
        batch_axes = batch_axes_for(mesh, live_axes(mesh, "batch"), batch_args[0].shape[0])
        _check_split(RowSharding(mesh, (), batch_axes), table.shape[0], batch_args[0].shape[0], logical)
        in_specs = (P(), *(_spec(batch_axes, a.ndim) for a in batch_args))
        return jax.shard_map(lambda tab, *args: fn(tab, jnp.int32(0), *args), mesh=mesh, in_specs=in_specs,
                             out_specs=_spec(batch_axes, out_ndim), check_vma=False)(table, *batch_args)
    rs = rs._replace(batch_axes=batch_axes_for(rs.mesh, rs.batch_axes, batch_args[0].shape[0]))
    _check_split(rs, table.shape[0], batch_args[0].shape[0], logical)
    shared, local_rows = rs.shared, table.shape[0] // rs.row_shards
    only_rows = tuple(a for a in rs.row_axes if a not in shared)
    if shared and not positionwise:
        raise ValueError(f"row_sharded_lookup: mesh axes {shared} split both the rows and the batch, which needs "
                         "a positionwise fn (a gather by row id)")
    n_shared = math.prod(rs.mesh.shape[a] for a in shared)

    def local(tab, *args):
        start = jax.lax.axis_index(rs.row_axes) * local_rows
        if not shared:
            vals = fn(tab, start, *args)
            return jax.lax.psum(vals, only_rows) if only_rows else vals
        lead = args[0].shape[: min(2, args[0].ndim)]  # [B, S] positions (or [B])
        p = math.prod(lead)
        flat = [a.reshape(p, *a.shape[len(lead):]) for a in args]
        out = jax.eval_shape(lambda *x: fn(tab, start, *x), *(f[:1] for f in flat))
        tail = out.shape[1:]
        c = _chunk_positions(p, n_shared * math.prod(tail) * 4)

        def chunk(xs):  # [c, ...] of this device's positions -> their rows, [c, *tail]
            gathered = [jax.lax.all_gather(x, shared, axis=0, tiled=True) for x in xs]  # [n_shared * c, ...]
            vals = jax.lax.psum_scatter(fn(tab, start, *gathered), shared, scatter_dimension=0, tiled=True)
            return jax.lax.psum(vals, only_rows) if only_rows else vals

        vals = jax.lax.map(chunk, [f.reshape(p // c, c, *f.shape[1:]) for f in flat])  # [p / c, c, *tail]
        return vals.reshape(*lead, *tail)

    in_specs = (_spec(rs.row_axes, table.ndim), *(_spec(rs.batch_axes, a.ndim) for a in batch_args))
    return jax.shard_map(local, mesh=rs.mesh, in_specs=in_specs, out_specs=_spec(rs.batch_axes, out_ndim),
                         check_vma=not kernel)(table, *batch_args)


def row_sharded_update(fn: Callable, row_arrays: Sequence[jax.Array], batch_args: Sequence[jax.Array],
                       scalars: Sequence[jax.Array] = (), *, logical: str = "ngram_rows"):
    """``(new_row_arrays, partial_sums) = fn(local_row_arrays, row_start, batch_args, scalars)`` on every
    row shard, with the batch arguments of the whole batch (all-gathered over the batch axes, so that every
    replica of a row sees every update of it). ``partial_sums`` (a tuple of scalars) are summed over the row
    shards. Row arrays keep their sharding; their local shards can be updated in place."""
    rs = row_sharding(logical)
    if rs is None:
        new, sums = fn(tuple(row_arrays), jnp.int32(0), tuple(batch_args), tuple(scalars))
        return new, sums
    _check_split(rs, row_arrays[0].shape[0], batch_args[0].shape[0], logical)
    local_rows = row_arrays[0].shape[0] // rs.row_shards

    def local(rows, args, scal):
        if rs.batch_axes:
            args = tuple(jax.lax.all_gather(a, rs.batch_axes, axis=0, tiled=True) for a in args)
        new, sums = fn(rows, jax.lax.axis_index(rs.row_axes) * local_rows, args, scal)
        return new, tuple(jax.lax.psum(x, rs.row_axes) for x in sums)

    row_specs = tuple(_spec(rs.row_axes, a.ndim) for a in row_arrays)
    arg_specs = tuple(_spec(rs.batch_axes, a.ndim) for a in batch_args)
    n_sums = len(jax.eval_shape(lambda: fn(tuple(row_arrays), jnp.int32(0), tuple(batch_args),
                                           tuple(scalars)))[1])
    return jax.shard_map(local, mesh=rs.mesh, in_specs=(row_specs, arg_specs, tuple(P() for _ in scalars)),
                         out_specs=(row_specs, tuple(P() for _ in range(n_sums))),
                         check_vma=False)(tuple(row_arrays), tuple(batch_args), tuple(scalars))
