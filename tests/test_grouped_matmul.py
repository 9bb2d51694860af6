"""Grouped matmul: the tiled layout's index maths against numpy, values and gradients against
``ragged_dot`` and a per-row numpy oracle (empty groups, one group holding every row, rows in no group)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngram_jax.layers import grouped_matmul as gm


def used_tiles(sizes, tile):
    return sum(-(-int(s) // tile) for s in sizes)


LAYOUT_CASES = [  # (group sizes, rows, tile)
    ([3, 0, 5, 1], 9, 4),  # an empty group in the middle
    ([0, 0, 7], 7, 2),  # every row in the last group
    ([7, 0, 0], 7, 2),  # every row in the first group
    ([2, 3], 10, 4),  # 5 rows in no group (zero experts, padding sorted last)
    ([0, 0, 0], 4, 2),  # nothing in any group
    ([4, 4], 8, 4),  # exact multiples: no padding
    ([1, 1, 1, 1, 1], 5, 8),  # tile larger than every group
    ([2, 5, 1], 8, 1),  # tile 1: no padding at all
]


@pytest.mark.parametrize("sizes, rows, tile", LAYOUT_CASES)
def test_tile_layout_matches_numpy(sizes, rows, tile):
    layout = jax.jit(gm.tile_layout, static_argnums=(1, 2))(jnp.asarray(sizes, jnp.int32), rows, tile)
    slot, source, tile_group = gm.tile_layout_reference(sizes, rows, tile)
    np.testing.assert_array_equal(np.asarray(layout.slot), slot)
    np.testing.assert_array_equal(np.asarray(layout.source), source)
    np.testing.assert_array_equal(np.asarray(layout.tile_group), tile_group)


def test_tile_layout_reference_by_hand():
    """sizes [3, 0, 2], tile 2: group 0 fills tiles 0-1 (one padding row), group 2 tile 2, tile 3 unused."""
    slot, source, tile_group = gm.tile_layout_reference([3, 0, 2], 6, 2)  # row 5 is in no group
    assert gm.num_tiles(6, 3, 2) == 4
    np.testing.assert_array_equal(slot, [0, 1, 2, 4, 5, 8])
    np.testing.assert_array_equal(source, [0, 1, 2, 6, 3, 4, 6, 6])
    np.testing.assert_array_equal(tile_group, [0, 0, 2, 2])


def test_tile_layout_random_against_numpy():
    rng = np.random.default_rng(0)
    layout = jax.jit(gm.tile_layout, static_argnums=(1, 2))
    for _ in range(20):
        g, rows, tile = int(rng.integers(1, 9)), int(rng.integers(1, 40)), int(rng.integers(1, 9))
        sizes = np.bincount(rng.integers(0, g + 1, rows), minlength=g + 1)[:g]  # the last bin: rows in no group
        got = layout(jnp.asarray(sizes, jnp.int32), rows, tile)
        for a, b in zip(got, gm.tile_layout_reference(sizes, rows, tile), strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("rows, groups, tile", [(6, 3, 2), (5, 4, 3), (4, 6, 2), (7, 2, 4)])
def test_num_tiles_is_a_tight_bound(rows, groups, tile):
    """Over every split of up to ``rows`` rows into ``groups`` groups the used tiles never exceed the
    static bound, and some split reaches it."""
    bound = gm.num_tiles(rows, groups, tile)
    worst = max(used_tiles(c, tile) for c in itertools.product(range(rows + 1), repeat=groups) if sum(c) <= rows)
    assert worst == bound


def rowwise_oracle(x, w, sizes):
    """numpy: row r of group g times w[g]; rows past the groups 0."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out = np.zeros((x.shape[0], w.shape[-1]))
    start = 0
    for g, n in enumerate(np.asarray(sizes)):
        out[start:start + n] = x[start:start + n] @ w[g]
        start += n
    return out


MATMUL_CASES = [  # (group sizes, rows)
    [3, 0, 5, 1],
    [0, 9, 0, 0],  # all rows in one expert
    [2, 0, 0, 3],  # 4 rows in no group
    [0, 0, 0, 0],  # no row in any group
]


@pytest.mark.parametrize("sizes", MATMUL_CASES)
@pytest.mark.parametrize("tile", [1, 4, 16])
def test_tiled_equals_ragged_dot_values_and_gradients(sizes, tile):
    rows, d, f = 9, 5, 3
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (rows, d))
    w = jax.random.normal(kw, (len(sizes), d, f))
    cot = jax.random.normal(kc, (rows, f))
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(impl):
        return jax.jit(jax.value_and_grad(
            lambda x, w: jnp.sum(gm.grouped_matmul(x, w, gs, impl=impl, tile=tile) * cot), argnums=(0, 1)))

    y = jax.jit(lambda x, w: gm.grouped_matmul(x, w, gs, impl="tiled", tile=tile))(x, w)
    np.testing.assert_allclose(np.asarray(y), rowwise_oracle(x, w, sizes), rtol=1e-5, atol=1e-5)
    (v_t, (dx_t, dw_t)), (v_r, (dx_r, dw_r)) = loss("tiled")(x, w), loss("ragged_dot")(x, w)
    np.testing.assert_allclose(float(v_t), float(v_r), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx_t), np.asarray(dx_r), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw_t), np.asarray(dw_r), rtol=1e-5, atol=1e-5)
    # the oracle's gradients: dx_r = cot_r @ w[g]^T, dw_g = x_g^T cot_g; rows in no group get none
    start = 0
    dx_want, dw_want = np.zeros((rows, d)), np.zeros(w.shape)
    for g, n in enumerate(sizes):
        dx_want[start:start + n] = np.asarray(cot[start:start + n]) @ np.asarray(w[g]).T
        dw_want[g] = np.asarray(x[start:start + n]).T @ np.asarray(cot[start:start + n])
        start += n
    np.testing.assert_allclose(np.asarray(dx_t), dx_want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw_t), dw_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sizes", MATMUL_CASES[:4])
def test_megablox_equals_the_oracle_values_and_gradients(sizes):
    """JAX's Pallas TPU grouped matmul (the TPU default), in the Pallas interpreter on this CPU."""
    rows, d, f = 9, 5, 3
    kx, kw, kc = jax.random.split(jax.random.key(1), 3)
    x, w, cot = jax.random.normal(kx, (rows, d)), jax.random.normal(kw, (len(sizes), d, f)), jax.random.normal(
        kc, (rows, f))
    gs = jnp.asarray(sizes, jnp.int32)

    def loss(impl):
        return jax.value_and_grad(lambda x, w: jnp.sum(gm.grouped_matmul(x, w, gs, impl=impl, tile=4) * cot),
                                  argnums=(0, 1))(x, w)

    (v_m, (dx_m, dw_m)), (v_t, (dx_t, dw_t)) = loss("megablox"), loss("tiled")
    y = gm.grouped_matmul(x, w, gs, impl="megablox")
    np.testing.assert_allclose(np.asarray(y), rowwise_oracle(x, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(v_m), float(v_t), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx_m), np.asarray(dx_t), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw_m), np.asarray(dw_t), rtol=1e-5, atol=1e-5)


def test_no_groups_gives_zeros():
    x = jnp.ones((4, 3))
    y = gm.grouped_matmul(x, jnp.zeros((0, 3, 2)), jnp.zeros((0,), jnp.int32), impl="tiled", tile=2)
    assert y.shape == (4, 2) and not np.asarray(y).any()
    with pytest.raises(ValueError, match="at least one group"):
        gm.tile_layout(jnp.zeros((0,), jnp.int32), 4, 2)


def test_resolve_impl():
    assert gm.resolve_impl("auto", "tpu") == "megablox"
    assert gm.resolve_impl("auto", "cpu") == "tiled"
    assert gm.resolve_impl("auto", "gpu") == "tiled"
    assert gm.resolve_impl("ragged_dot", "cpu") == "ragged_dot"
    assert gm.resolve_impl("tiled", "tpu") == "tiled"
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        gm.resolve_impl("dense")
    with pytest.raises(ValueError, match="tile must be >= 1"):
        gm.num_tiles(8, 2, 0)
