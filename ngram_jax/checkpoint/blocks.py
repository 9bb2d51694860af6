"""The row-block layout of stored tables and their optimizer state.

Row-chunked arrays are stored in blocks of ``c`` rows, ``[R, ...] -> [R/c, c, ...]``, each block one
tensorstore chunk (orbax's per-block chunking, ``shard_axes=(0,)``, with no byte target: asking orbax for
small chunks by byte size works too, but warns once per array and save). ``c`` is TABLE_CHUNK_ROWS for
tables of up to MAX_TABLE_BLOCKS such blocks and grows with larger tables (:func:`block_rows`): orbax keeps
every chunk key of a checkpoint in one OCDBT b-tree node, and the cost of each chunk read grew with the
number of keys (measured: about 80 us per read at 100K keys, 1 ms at 563K). An array whose row shards do
not hold whole blocks is stored as it is (one chunk per shard). Restores
(:meth:`ngram_jax.checkpoint.Checkpointer.restore`) and :class:`ngram_jax.analyze.LazyCheckpoint` undo the
blocking from the stored shape.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

TABLE_CHUNK_ROWS = 32  # random row reads touch about one chunk per row: keep chunks a few rows long
MAX_TABLE_BLOCKS = 4096  # a larger table gets longer blocks (a multiple of TABLE_CHUNK_ROWS rows)


def block_rows(rows: int, shards: int = 1) -> int | None:
    """Rows per stored block of a ``rows``-row array on ``shards`` row shards: the smallest multiple ``c``
    of TABLE_CHUNK_ROWS that makes whole blocks on every shard and at most MAX_TABLE_BLOCKS blocks (one
    block per shard if no shorter one does); None when TABLE_CHUNK_ROWS-row blocks do not divide the shards."""
    if rows <= 0 or rows % (TABLE_CHUNK_ROWS * shards):
        return None
    per_shard = rows // (TABLE_CHUNK_ROWS * shards)  # minimal blocks per shard
    need = -(-rows // (TABLE_CHUNK_ROWS * MAX_TABLE_BLOCKS))  # blocks of at least this many minimal blocks
    k = next(k for k in range(min(need, per_shard), per_shard + 1) if per_shard % k == 0)
    return TABLE_CHUNK_ROWS * k


def _row_spec(sharding) -> tuple:
    """The PartitionSpec of a NamedSharding as a tuple (None for other shardings)."""
    spec = getattr(sharding, "spec", None)
    return None if spec is None else tuple(spec)


def _row_shards(sharding, ndim: int) -> int:
    spec = _row_spec(sharding)
    if not spec or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def _blocked_sharding(sharding, ndim: int, block_axis: int = 0):
    """``sharding`` of ``[R, ...]`` carried to ``[R/c, c, ...]``: the row axes on the block axis (or, with
    ``block_axis=1``, on the rows within a block)."""
    spec = _row_spec(sharding)
    if spec is None:
        return sharding
    spec = spec + (None,) * (ndim - len(spec))
    rows, rest = spec[0], spec[1:]
    new = (rows, None, *rest) if block_axis == 0 else (None, rows, *rest)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*new))


def blockable(shape: tuple[int, ...], sharding) -> bool:
    """Whether ``[R, ...]`` splits into whole blocks (:func:`block_rows`) on every row shard."""
    return len(shape) >= 1 and block_rows(shape[0], _row_shards(sharding, len(shape))) is not None


def reshaped(x: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    """``x`` reshaped (row-major, no data reordering) and laid out with ``sharding``."""
    return jax.jit(lambda a: a.reshape(shape), out_shardings=sharding)(x)


def to_blocks(x: jax.Array) -> jax.Array:
    """``[R, ...] -> [R/c, c, ...]`` (``c`` from :func:`block_rows`), each row shard's blocks kept on it."""
    c = block_rows(x.shape[0], _row_shards(x.sharding, x.ndim))
    return reshaped(x, (x.shape[0] // c, c, *x.shape[1:]), _blocked_sharding(x.sharding, x.ndim))


def blocked_target(target: jax.ShapeDtypeStruct, stored: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """The restore target of an array stored as blocks ``stored`` for the logical ``target``: row shards
    on the block axis when they divide it, else on the rows within a block, else replicated."""
    n = _row_shards(target.sharding, len(target.shape))
    axis = 0 if stored[0] % n == 0 else 1 if stored[1] % n == 0 else None
    if axis is None:
        sharding = jax.sharding.NamedSharding(target.sharding.mesh, jax.sharding.PartitionSpec())
    else:
        sharding = _blocked_sharding(target.sharding, len(target.shape), axis)
    return jax.ShapeDtypeStruct(stored, target.dtype, sharding=sharding)


def is_blocked(stored: tuple[int, ...], logical: tuple[int, ...]) -> bool:
    """Whether an array of logical shape ``logical`` was stored as row blocks of shape ``stored``."""
    return (len(stored) == len(logical) + 1 and stored[1] % TABLE_CHUNK_ROWS == 0
            and stored[0] * stored[1] == logical[0] and tuple(stored[2:]) == tuple(logical[1:]))


def row_chunked_paths(model, opt=None) -> frozenset[tuple[str, ...]]:
    """Paths, in the saved ``{"model": ..., "opt": ...}`` tree, of the tables (found by type) and of the
    optimizer state shaped like them: these are stored in chunks of a few rows."""
    from ngram_jax.ngram.lookup import table_paths
    from ngram_jax.train.optimizer import RowState

    tables = table_paths(model)
    out = {("model", *t) for t in tables}
    if opt is not None:
        for path, var in nnx.to_flat_state(nnx.state(opt)):
            names = tuple(map(str, path))
            inside = any(names[i : i + len(t)] == t for t in tables for i in range(len(names)))
            if inside or isinstance(var, RowState):
                out.add(("opt", *names))
    return frozenset(out)


def path_key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)
