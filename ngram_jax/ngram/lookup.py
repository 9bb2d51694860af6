"""The one n-gram lookup: tokens (+ their history) -> n-gram ids -> table rows -> projected mean.

NE (:mod:`ngram_jax.ngram.embedding`) and PLNE (:mod:`ngram_jax.ngram.ple`) are both a
:class:`HashedTables` core; training, evaluation, decoding and analysis all go through it:

    e = ( E0[x_t] + sum_idx E_idx[h_idx(t)] @ W_idx ) / (1 + T)          (the paper, sections 3 and 5)

- ids: :meth:`HashedTables.row_ids` from tokens plus what defines their history: segment ids (packed
  training rows, EOS resets) or an explicit history ``[B, S, N-1]`` (the N-gram cache of decoding).
- gather: the fused hashed-gather kernel (:mod:`ngram_jax.kernels.ngram_gather`, chosen by
  ``model.ngram.kernel``) runs on each row shard of the table inside ``shard_map``; a given history
  goes through the XLA gather of the same rows.
- projected mean: :meth:`HashedTables.combine`.

Tables are typed parameters: :class:`Table` (every embedding table) and :class:`NgramTable` (hashed
tables, whose gradient is sparse). Optimizer groups, checkpoint chunking, the budget and analysis find
them by type. In sparse training (``train.table_optimizer`` row-wise) the step differentiates a zero
perturbation of the gathered rows instead of the table (:func:`row_perturbations`): the backward pass
yields (row ids, row gradients), never a dense ``[rows, width]`` array.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from ngram_jax.backend import target_backend
from ngram_jax.config import ConfigError
from ngram_jax.kernels.ngram_gather.api import BY_ID, IMPLEMENTATIONS, unavailable_reason
from ngram_jax.kernels.ngram_gather.pallas_tpu import check_interpret_mesh, simulator_params
from ngram_jax.kernels.ngram_gather.xla import gather_rows
from ngram_jax.ngram import hashing
from ngram_jax.ngram.row_sharded import row_sharded_lookup, row_sharded_update, row_sharding
from ngram_jax.sharding import logical_axes

KERNELS = ("auto", "reference", "xla", "pallas_tpu")


class Table(nnx.Param):
    """An embedding table read by row ids (token or n-gram)."""


class NgramTable(Table):
    """A flattened hashed N-gram table ``[rows, width]``: sparse gradients, row-wise optimizers."""


class RowUsage(nnx.Variable):
    """uint8 [rows]: 1 for every row of an N-gram table that a training batch has read (row usage)."""


# ----------------------------------------------------------------------------------------------
# Kernel choice


def resolve_kernel(name: str, key: str = "model.ngram.kernel", backend: str | None = None) -> str:
    """The implementation ``name`` stands for on ``backend``: ``auto`` -> pallas_tpu on TPU, xla elsewhere
    (on GPU no Mosaic GPU kernel has been shown to beat XLA's gather). Raises a ConfigError (a ValueError)
    naming ``key`` for an unknown name or one that cannot run here (pallas_tpu off TPU runs only under
    ``ngram_jax.kernels.ngram_gather.pallas_tpu.tpu_simulator()``)."""
    backend = backend or target_backend()
    if name not in KERNELS:
        raise ConfigError(f"{key}={name!r} is not a kernel; choose one of {', '.join(KERNELS)}")
    if name == "auto":
        return "pallas_tpu" if backend == "tpu" else "xla"
    reason = unavailable_reason(name, backend, simulator_params() is not None)
    if reason:
        raise ConfigError(f"{key}={name!r}: {reason.split(';')[0]}; set {key}=auto or xla")
    return name


# ----------------------------------------------------------------------------------------------
# Sparse training: zero perturbations of the gathered rows stand in for the table in the gradient

@contextlib.contextmanager
def row_perturbations(model: nnx.Module, deltas: dict[str, jax.Array]) -> Iterator[None]:
    """While active, ``HashedTables`` module ``path`` adds ``deltas[path]`` (zeros, ``[B, S, T, width]``)
    to the rows it gathers (its ``row_delta``); the gradient of the loss w.r.t. ``deltas[path]`` is then the
    row gradient."""
    mods = dict(hashed_tables(model))
    for k, v in deltas.items():
        mods[k].row_delta = nnx.data(v)
    try:
        yield
    finally:
        for k in deltas:
            mods[k].row_delta = nnx.data(None)


def hashed_tables(model: nnx.Module) -> list[tuple[str, HashedTables]]:
    """Every N-gram lookup of a model, by path (``"embed"``, ``"ple"``), found by type."""
    return [("/".join(map(str, path)), m) for path, m in nnx.iter_modules(model) if isinstance(m, HashedTables)]


def table_paths(model: nnx.Module) -> frozenset[tuple[str, ...]]:
    """Paths of every :class:`Table` parameter of a model."""
    return frozenset(tuple(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model, Table)))


# ----------------------------------------------------------------------------------------------
# The core


def table_init_std(output_std: float, num_tables: int) -> float:
    """The std of the tables of a hashed lookup whose output starts with std ``output_std``: the projected mean
    of 1 + T terms of equal scale (a projection at 1/sqrt(d_e) keeps a row's scale) has sqrt(1 + T) times
    less, so the tables start at ``output_std * sqrt(1 + T)`` (the init rule of ``model.embedding``,
    docs/TRAINING.md)."""
    return output_std * math.sqrt(1 + num_tables)


class HashedTables(nnx.Module):
    """Token table ``[V, L*W]``, hashed N-gram table ``[sum(M), L*d_e]`` and projections to width W.

    ``init_std`` is the std of the output at init: the tables are drawn at :func:`table_init_std` of it.

    ``layers=None`` is the input NE (projections ``[T, d_e, W]``, output ``[B, S, W]``); ``layers=L`` is
    PLNE (per-layer tables side by side, projections ``[L, T, d_e, W]``, output ``[B, S, L, W]``): one
    gather serves every layer.
    """

    def __init__(self, vocab_size: int, width: int, *, layers: int | None = None, max_n: int, splits: int,
                 ratio: float, eos_id: int | None, init_std: float, row_multiple: int = 1, kernel: str = "auto",
                 kernel_key: str = "model.ngram.kernel", embed_names=("vocab_rows", "table_embed"),
                 proj_names=("ngram_tables", "ngram_dim", "embed"), dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.layout = hashing.make_layout(vocab_size, max_n, splits, ratio, row_multiple)
        self.kernel = resolve_kernel(kernel, kernel_key)
        self.vocab_size, self.width, self.layers, self.eos_id, self.dtype = vocab_size, width, layers, eos_id, dtype
        t, nl = self.layout.num_tables, layers or 1
        d_e = row_width(width, self.layout)
        normal = nnx.initializers.normal(table_init_std(init_std, t))
        self.embedding = Table(normal(rngs.params(), (vocab_size, nl * width), param_dtype),
                               **logical_axes(embed_names))  # [V, L*W]
        self.ngram_table = NgramTable(normal(rngs.params(), (self.layout.padded_rows, nl * d_e), param_dtype),
                                      **logical_axes(("ngram_rows", "ngram_dim")))  # [sum M, L*d_e]
        proj_init = nnx.initializers.normal(1.0 / math.sqrt(d_e))  # keeps a projected row at init_std
        shape = (t, d_e, width) if layers is None else (layers, t, d_e, width)
        self.ngram_proj = nnx.Param(proj_init(rngs.params(), shape, param_dtype), **logical_axes(proj_names))
        self.row_usage = RowUsage(jnp.zeros((self.layout.padded_rows,), jnp.uint8), **logical_axes(("ngram_rows",)))
        self.row_delta = nnx.data(None)  # [B, S, T, L*d_e] zeros inside row_perturbations (sparse training)

    # -- ids ------------------------------------------------------------------------------------

    def row_ids(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                history: jax.Array | None = None) -> jax.Array:
        """Rows of the flattened table each position reads. tokens [B, S] -> int32 [B, S, T].

        ``history`` [B, S, N'-1] (N' >= N; ``x~_{t-1}, x~_{t-2}, ...``, zeros outside the segment)
        replaces the history the tokens and ``segment_ids`` define."""
        lay = self.layout
        if history is None:
            ids = hashing.ngram_ids(tokens, vocab_size=lay.vocab_size, table_sizes=lay.table_sizes, max_n=lay.max_n,
                                    splits=lay.splits, eos_id=self.eos_id, segment_ids=segment_ids)
        else:
            ids = hashing.ids_from_history(tokens, history[..., : lay.max_n - 1], vocab_size=lay.vocab_size,
                                           table_sizes=lay.table_sizes, max_n=lay.max_n)
        return hashing.flat_row_ids(ids, lay.row_offsets)

    # -- gather ---------------------------------------------------------------------------------

    def gathered_shape(self, token_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (*token_shape, self.layout.num_tables, self.ngram_table.shape[1])

    def gather(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               history: jax.Array | None = None) -> jax.Array:
        """The table rows of every position, [B, S, T, L*d_e], on each row shard where the rows live.

        The ids are hashed where the tokens are: in the fused kernel (tokens in, ids computed in it) when the
        rows are not split over a batch axis; otherwise (the default rules on any data/fsdp/expert mesh, and
        decoding's N-gram cache) by :meth:`row_ids` on each device's own positions, and the kernel gathers
        by id on the shards that own the rows (:func:`~ngram_jax.ngram.row_sharded.row_sharded_lookup`):
        hashing the whole batch on every row shard would cost O(global batch) per device."""
        table = self.ngram_table[...]
        kernel = self.kernel == "pallas_tpu"
        kw = {"interpret": simulator_params() or False} if kernel else {}
        rs = row_sharding("ngram_rows")
        if kw.get("interpret") and rs is not None:
            check_interpret_mesh(rs.mesh)
        if history is None and (rs is None or not rs.shared):
            impl, lay, eos = IMPLEMENTATIONS[self.kernel], self.layout, self.eos_id
            seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids

            def local(tab, start, tok, sg):
                return impl(tok, tab, layout=lay, eos_id=eos, segment_ids=sg, row_start=start, **kw)

            rows = row_sharded_lookup(local, table, tokens, seg, out_ndim=4, kernel=kernel, positionwise=False)
        else:
            ids = self.row_ids(tokens, segment_ids=segment_ids, history=history)
            by_id = BY_ID[self.kernel]
            rows = row_sharded_lookup(lambda tab, start, i: by_id(tab, i, start, **kw), table, ids, out_ndim=4,
                                      kernel=kernel)
        if self.row_delta is not None:
            rows = rows + self.row_delta
        return rows.astype(self.dtype)

    # -- projected mean -------------------------------------------------------------------------

    def _proj(self) -> jax.Array:
        return self.ngram_proj[...].astype(self.dtype)  # [T, d_e, W] or [L, T, d_e, W]

    def project(self, gathered: jax.Array) -> jax.Array:
        """Per-table projections, [B, S, T, W] (NE) or [B, S, L, T, W] (PLNE), for analysis."""
        if self.layers is None:
            return jnp.einsum("bste,tew->bstw", gathered, self._proj())
        g = gathered.reshape(*gathered.shape[:3], self.layers, -1)  # [B, S, T, L, d_e]
        return jnp.einsum("bstle,ltew->bsltw", g, self._proj())

    def combine(self, base: jax.Array, gathered: jax.Array) -> jax.Array:
        """``(base + sum_idx rows_idx @ W_idx) / (1 + T)``: base [B, S, L*W] (token rows), gathered
        [B, S, T, L*d_e] -> [B, S, W] (NE) or [B, S, L, W] (PLNE)."""
        t = self.layout.num_tables
        base = base.astype(self.dtype)
        b, s = gathered.shape[:2]
        if self.layers is None:  # one [B*S, T*d_e] x [T*d_e, W] matmul sums the T projections
            proj = self._proj().reshape(-1, self.width)
            return (base + (gathered.reshape(b, s, -1) @ proj)) / (1 + t)
        g = gathered.reshape(b, s, t, self.layers, -1).swapaxes(2, 3).reshape(b, s, self.layers, -1)  # [B,S,L,T*d_e]
        proj = self._proj().reshape(self.layers, -1, self.width)  # [L, T*d_e, W]
        base = base.reshape(b, s, self.layers, self.width)  # [B, S, L, W]
        return (base + jnp.einsum("bslk,lkw->bslw", g, proj)) / (1 + t)

    def token_rows(self, tokens: jax.Array) -> jax.Array:
        """E0[x_t] [B, S, L*W]: the token table, row-sharded like the N-gram table."""
        return token_lookup(self.embedding[...], tokens)

    def lookup(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               history: jax.Array | None = None) -> jax.Array:
        """tokens [B, S] -> the projected mean [B, S, W] (NE) or [B, S, L, W] (PLNE)."""
        hashing.check_token_ids(tokens, self.vocab_size)
        return self.combine(self.token_rows(tokens), self.gather(tokens, segment_ids=segment_ids, history=history))

    # -- training-time bookkeeping ----------------------------------------------------------------

    def record_usage(self, rows: jax.Array) -> None:
        """Mark ``rows`` [B, S, T] as read (on the shard that owns each row)."""

        def mark(arrays, start, args, _):
            (usage,), (ids,) = arrays, args
            local = ids.reshape(-1) - start
            local = jnp.where((local >= 0) & (local < usage.shape[0]), local, usage.shape[0])  # not ours: dropped
            return (usage.at[local].set(1, mode="drop"),), ()

        (self.row_usage[...],), _ = row_sharded_update(mark, (self.row_usage[...],), (rows,))

    def usage_fraction(self) -> jax.Array:
        """Fraction of the real (unpadded) rows read so far."""
        return jnp.sum(self.row_usage[...].astype(jnp.float32)) / self.layout.total_rows


def token_lookup(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """``table[tokens]`` for a token table ``[V, W]`` (dim 0: ``vocab_rows``), row-sharded on a mesh."""
    return row_sharded_lookup(lambda tab, start, ids: gather_rows(tab, ids, start), table, tokens,
                              logical="vocab_rows", out_ndim=tokens.ndim + 1)


def row_width(width: int, layout: hashing.NgramLayout) -> int:
    """d_e = width // T, with a clear error when T does not divide the width."""
    t = layout.num_tables
    if width % t:
        raise ValueError(
            f"embedding width {width} is not divisible by K*(N-1) = {layout.splits}*({layout.max_n}-1) = {t}"
        )
    return width // t
