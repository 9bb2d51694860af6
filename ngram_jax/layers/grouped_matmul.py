"""Grouped matmul: rows sorted by group (expert), each group times its own weight matrix.

``grouped_matmul(x [R, D], w [G, D, F], group_sizes [G]) -> [R, F]`` is what
``jax.lax.ragged_dot`` computes: rows ``start_g .. start_g + group_sizes[g]`` (``start`` the
exclusive prefix sum) use ``w[g]``; rows past ``sum(group_sizes)`` are in no group and give 0.
Three implementations, selected by name (``model.moe.grouped_matmul``):

- ``megablox``: JAX's own Pallas TPU kernels (``jax.experimental.pallas.ops.tpu.megablox``: ``gmm``
  forward and input gradient, ``tgmm`` weight gradient), the TPU default. The cost follows the rows.
- ``ragged_dot``: ``jax.lax.ragged_dot``. XLA:CPU lowers it densely, so its cost there grows with the
  number of groups (docs/BENCHMARKS.md); on TPU (libtpu 0.0.42.1) its forward is a grouped matmul, but
  its weight gradient is not: about G/2 times the matmul's FLOPs (64 groups: 5.6e11 against 1.7e10 for
  8192 x 1024 x 512, by the compiler's count; docs/TPU.md).
- ``tiled``: each group padded to a multiple of a row tile ``m``, a tile -> group map, and one
  batched matmul over tiles against each tile's own weight matrix
  (``einsum('tmd,tdf->tmf', x_tiles, w[tile_group])``). The cost follows the rows (plus at most
  ``m - 1`` padding rows per group), not the number of groups.

Tiled layout (index maths, pure functions with numpy references below). With ``R`` rows, ``G``
groups and tile ``m``: group g is padded to ``ceil(n_g / m) * m`` rows; the padded groups are laid
end to end; the number of tiles is bounded statically by ``floor((R + min(G, R) * (m - 1)) / m)``
(each non-empty group wastes at most ``m - 1`` rows), so shapes stay static under ``jit``. Tiles
past the last used one hold only padding (zero rows) and are mapped to the last group.

Gradients are JAX's own: the weight gradient of the gathered form is a per-tile ``x_tile^T dy_tile``
[T, D, F] scatter-added into its group's [D, F]. A hand-written ``custom_vjp`` (a sorted segment sum
or a one-hot matmul over tiles) measured no faster on XLA:CPU (tiny_moe shapes, fwd+bwd of a SwiGLU:
50 vs 56 ms at 33 groups, 16 vs 18 ms at 8, no gain at 128 either), so there is none. A ``lax.scan``
over tiles with ``dynamic_index_in_dim`` weights was slower (94 ms at 33 groups): each of the ~100
tiles is its own small matmul.

The layout and the matmul are kept apart so that a chain of matmuls over the same rows (a SwiGLU:
gate, up, down) pads once, runs every matmul and elementwise op on the tiles, and unpads once: see
:class:`Grouping`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ngram_jax.backend import target_backend

Impl = Literal["megablox", "ragged_dot", "tiled"]
IMPLS: tuple[str, ...] = ("megablox", "ragged_dot", "tiled")


def resolve_impl(name: str, backend: str | None = None) -> Impl:
    """``auto`` -> ``megablox`` on TPU, ``tiled`` elsewhere (CPU, GPU); a concrete name passes through."""
    if name == "auto":
        return "megablox" if (backend or target_backend()) == "tpu" else "tiled"
    if name not in IMPLS:
        raise ValueError(f"unknown grouped matmul {name!r}; use 'auto', 'megablox', 'ragged_dot' or 'tiled'")
    return name  # type: ignore[return-value]


def megablox_tiling(rows: int, d: int, f: int) -> tuple[int, int, int]:
    """Tile sizes (rows, D, F) of the megablox kernels for 128-multiples rows, D, F: the largest divisors of
    each that are multiples of 128 and at most 512, 1024, 1024. The kernels re-read a tile of rows once per
    F tile and a weight tile once per row tile: 128-wide tiles read LongCat-Flash-Lite's expert inputs 8
    times per matmul; these about 1 (their VMEM, double-buffered: under 10 MiB)."""
    def tile(n: int, most: int) -> int:
        return max(t for t in range(128, min(n, most) + 1, 128) if n % t == 0)

    return tile(rows, 512), tile(d, 1024), tile(f, 1024)


def megablox_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """JAX's Pallas TPU grouped matmul (``jax.experimental.pallas.ops.tpu.megablox``: ``gmm``, and ``tgmm``
    for the weight gradient): x [R, D] sorted by group, w [G, D, F] -> [R, F]. R, D and F are zero-padded to
    multiples of 128 where they are not (the TPU's block rule; small models only: LongCat-Flash-Lite's 3072
    and 1024 need none). Tiles (rows, D, F) of up to (512, 1024, 1024), :func:`megablox_tiling`. Off TPU it
    runs in the Pallas interpreter."""
    from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

    (r, d), f = x.shape, w.shape[-1]
    up = lambda n: -(-n // 128) * 128  # noqa: E731
    # rows past the groups: the kernels leave their outputs (and input gradients) unwritten; zero both ways
    inside = (jnp.arange(r) < jnp.sum(group_sizes))[:, None]
    xp = jnp.pad(jnp.where(inside, x, 0), ((0, up(r) - r), (0, up(d) - d)))
    wp = jnp.pad(w.astype(x.dtype), ((0, 0), (0, up(d) - d), (0, up(f) - f)))
    y = megablox.gmm(xp, wp, group_sizes, jnp.result_type(x, w), megablox_tiling(up(r), up(d), up(f)),
                     interpret=target_backend() != "tpu")
    return jnp.where(inside, y[:r, :f], 0)


# ----------------------------------------------------------------------------------------------
# Tiled layout: index maths.


def num_tiles(rows: int, groups: int, tile: int) -> int:
    """Static upper bound on the tiles of ``rows`` rows in ``groups`` groups padded to ``tile`` rows."""
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    return max(1, (rows + min(groups, rows) * (tile - 1)) // tile)


class TileLayout(NamedTuple):
    """Where each sorted row sits in the padded tiles (P = tiles * tile padded positions)."""

    slot: jax.Array  # int32 [R] padded position of each row; P for rows in no group
    source: jax.Array  # int32 [P] row held by each padded position; R for padding
    tile_group: jax.Array  # int32 [T] group of each tile (unused tiles: the last group)


def tile_layout(group_sizes: jax.Array, rows: int, tile: int) -> TileLayout:
    """group_sizes int [G] (summing to at most ``rows``) -> the :class:`TileLayout` of ``rows`` sorted rows."""
    g = group_sizes.shape[0]
    if g == 0:
        raise ValueError("tile_layout needs at least one group")
    n_tiles = num_tiles(rows, g, tile)
    p = n_tiles * tile
    sizes = group_sizes.astype(jnp.int32)
    padded = (sizes + tile - 1) // tile * tile  # [G] rows of each padded group
    ends, padded_ends = jnp.cumsum(sizes), jnp.cumsum(padded)  # [G] ends among the rows / padded rows
    i = jnp.arange(rows, dtype=jnp.int32)
    row_group = jnp.searchsorted(ends, i, side="right").astype(jnp.int32)  # [R]; G for rows past the groups
    rg = jnp.minimum(row_group, g - 1)
    offset = (padded_ends - padded) - (ends - sizes)  # [G] padded start - start
    slot = jnp.where(row_group < g, i + offset[rg], p).astype(jnp.int32)
    source = jnp.full((p,), rows, jnp.int32).at[slot].set(i, mode="drop")
    tile_start = jnp.arange(n_tiles, dtype=jnp.int32) * tile
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, tile_start, side="right"), g - 1).astype(jnp.int32)
    return TileLayout(slot, source, tile_group)


def tile_layout_reference(group_sizes, rows: int, tile: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """numpy reference of :func:`tile_layout`: a direct loop over the groups."""
    sizes = [int(s) for s in np.asarray(group_sizes)]
    n_tiles = num_tiles(rows, len(sizes), tile)
    p = n_tiles * tile
    slot = np.full(rows, p, np.int64)
    source = np.full(p, rows, np.int64)
    tile_group = np.full(n_tiles, len(sizes) - 1, np.int64)
    row, pos = 0, 0
    for gi, n in enumerate(sizes):
        for r in range(n):
            slot[row + r], source[pos + r] = pos + r, row + r
        used = -(-n // tile)
        tile_group[pos // tile:pos // tile + used] = gi
        row, pos = row + n, pos + used * tile
    return slot, source, tile_group


# ----------------------------------------------------------------------------------------------
# The matmul over tiles.


def tiled_matmul(x_tiles: jax.Array, w: jax.Array, tile_group: jax.Array) -> jax.Array:
    """x_tiles [T, m, D], w [G, D, F], tile_group int [T] -> [T, m, F]: tile t times ``w[tile_group[t]]``."""
    return jnp.einsum("tmd,tdf->tmf", x_tiles, w[tile_group])


# ----------------------------------------------------------------------------------------------
# Chains of grouped matmuls over the same rows.


class Grouping:
    """Rows sorted by group, held in the layout of one implementation.

    ``enter`` moves rows [R, D] into the layout, ``matmul`` multiplies each row by its group's
    weight (elementwise ops apply to the layout as they are: padding rows are zeros and stay zeros
    through any f with f(0) = 0 after a matmul), ``leave`` returns [R, F] with 0 for rows in no group.
    """

    def __init__(self, group_sizes: jax.Array, rows: int, impl: Impl, tile: int):
        self.impl, self.rows, self.tile = impl, rows, tile
        self.group_sizes = group_sizes.astype(jnp.int32)
        self.layout = tile_layout(group_sizes, rows, tile) if impl == "tiled" else None

    def enter(self, x: jax.Array) -> jax.Array:
        """[R, D] -> megablox, ragged_dot: [R, D]; tiled: [T, m, D] (padding rows 0)."""
        if self.layout is None:
            return x
        t = self.layout.tile_group.shape[0]
        return x.at[self.layout.source].get(mode="fill", fill_value=0).reshape(t, self.tile, x.shape[-1])

    def matmul(self, h: jax.Array, w: jax.Array) -> jax.Array:
        """h in the layout (last dim D), w [G, D, F] -> the layout with last dim F."""
        if self.impl == "megablox":
            return megablox_matmul(h, w, self.group_sizes)
        if self.layout is None:
            return jax.lax.ragged_dot(h, w, self.group_sizes)
        return tiled_matmul(h, w, self.layout.tile_group)

    def leave(self, h: jax.Array) -> jax.Array:
        """The layout -> [R, F]; rows in no group are 0."""
        if self.layout is None:
            return jnp.where((jnp.arange(self.rows) < jnp.sum(self.group_sizes))[:, None], h, 0)
        flat = h.reshape(-1, h.shape[-1])
        return flat.at[self.layout.slot].get(mode="fill", fill_value=0)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, impl: str = "tiled",
                   tile: int = 64) -> jax.Array:
    """x [R, D] sorted by group, w [G, D, F], group_sizes int [G] -> [R, F] (``ragged_dot``'s contract)."""
    if w.shape[0] == 0:  # no groups: every row is in no group
        return jnp.zeros((x.shape[0], w.shape[-1]), jnp.result_type(x, w))
    g = Grouping(group_sizes, x.shape[0], resolve_impl(impl), tile)
    return g.leave(g.matmul(g.enter(x), w))
