"""Fused hashed-gather kernels against the pure-JAX oracle: values and gradients, on CPU with the Pallas
TPU kernel in TPU interpret mode (small shapes), the TPU lowering checked by jax.export."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

from ngram_jax.kernels.ngram_gather import available_implementations, ngram_gather
from ngram_jax.kernels.ngram_gather.pallas_tpu import TOKENS_PER_STEP, ngram_gather_pallas_tpu
from ngram_jax.kernels.ngram_gather.reference import flat_rows, ngram_gather_reference
from ngram_jax.ngram import hashing
from ngram_jax.sharding import make_mesh_from_spec

INTERPRET = pltpu.InterpretParams()
LAY = hashing.make_layout(300, 3, 2, 1.37, row_multiple=8)
EOS = 5


def tokens_case():
    t = np.random.default_rng(0).integers(0, 300, (2, 8)).astype(np.int32)
    t[0, 3] = EOS  # history reset
    t[1, 2:6] = 7  # repeated n-grams: duplicate row ids
    return jnp.asarray(t)


@pytest.fixture(scope="module")
def table():
    return jax.random.normal(jax.random.key(0), (LAY.padded_rows, 128))


@pytest.mark.parametrize("impl,dtype", [("xla", "float32"), ("pallas_tpu", "float32"), ("pallas_tpu", "bfloat16")])
def test_values_and_gradients_equal_the_oracle(impl, dtype, table):
    """bfloat16 tables: the kernel moves the aligned 2-row slab of each row (TPU tiling) and keeps its row."""
    table = table.astype(dtype)
    tok = tokens_case()
    seg = jnp.asarray([[1] * 8, [1] * 5 + [2] * 3])
    kw = dict(layout=LAY, eos_id=EOS, segment_ids=seg, implementation=impl, interpret=INTERPRET)
    got = ngram_gather(tok, table, **kw)
    want = ngram_gather_reference(tok, table, layout=LAY, eos_id=EOS, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    w = jax.random.normal(jax.random.key(1), want.shape)
    g = jax.grad(lambda tb: jnp.sum(ngram_gather(tok, tb, **kw) * w))(table)
    g_ref = jax.grad(lambda tb: jnp.sum(ngram_gather_reference(tok, tb, layout=LAY, eos_id=EOS, segment_ids=seg) * w))(
        table)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=1e-5 if dtype ==
                               "float32" else 0.05)
    rows = np.asarray(flat_rows(tok, LAY, EOS, seg)).ravel()
    assert {r % 2 for r in rows.tolist()} == {0, 1}  # both rows of a bfloat16 slab were asked for
    assert len(set(rows.tolist())) < rows.size  # duplicates were exercised and accumulated
    assert set(np.flatnonzero(np.abs(np.asarray(g)).sum(1)).tolist()) == set(rows.tolist())


def test_projected_mean_option(table):
    tok = tokens_case()
    proj = jax.random.normal(jax.random.key(2), (LAY.num_tables, 128, 32))
    want = ngram_gather_reference(tok, table, layout=LAY, eos_id=EOS, proj=proj)
    for impl in ("xla", "pallas_tpu"):
        got = ngram_gather(tok, table, layout=LAY, eos_id=EOS, proj=proj, implementation=impl, interpret=INTERPRET)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("max_n", [2, 4])
def test_exact_hashing_in_kernel_at_the_limits(max_n):
    """V near 2^20 and sub-tables as large as flat int32 row ids allow (near 2^31 rows for N=2; for N=4, K=1
    the three sub-tables share 2^31): a 64-row shard window around an id the oracle computes (the rest of
    the virtual table is never materialised; ids outside the window give zeros). 40 tokens span two grid
    steps, and the probed token sits right after the block edge, so its highest-order hash reads its
    history from the halo."""
    vocab = (1 << 20) - 3
    t = max_n - 1  # K = 1: one sub-table per order
    lay = hashing.make_layout(vocab, max_n, 1, ((1 << 31) - 64) // t / vocab)
    assert lay.total_rows < 2**31 and lay.table_sizes[-1] > 2**31 // t - 70
    tok = jnp.asarray(np.random.default_rng(3).integers(vocab - 1000, vocab, (1, 40)).astype(np.int32))
    probe = TOKENS_PER_STEP + max_n - 2  # its N-1 predecessors include the previous block's last token
    rows = np.asarray(flat_rows(tok, lay, None))
    start = int(rows[0, probe, t - 1]) - 30  # a window that holds its N-gram row, at an arbitrary offset
    shard = jax.random.normal(jax.random.key(4), (64, 128))
    got = ngram_gather(tok, shard, layout=lay, eos_id=None, row_start=start, implementation="pallas_tpu",
                       interpret=INTERPRET)
    want = ngram_gather_reference(tok, shard, layout=lay, eos_id=None, row_start=start)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert np.abs(np.asarray(got)[0, probe, t - 1]).sum() > 0  # that row was really fetched


def test_history_crosses_grid_steps(table):
    """3 grid steps: the N-1 tokens before a block come from its halo, and resets at block edges hold (a
    segment starting at a block's last token, an EOS as a block's last token, a batch row starting
    mid-block)."""
    tb = TOKENS_PER_STEP
    s = tb + tb // 2  # 2 rows of 48 tokens: block edges at row 0 position tb, row 1 position tb // 2
    t = np.random.default_rng(5).integers(0, 300, (2, s)).astype(np.int32)
    t[t == EOS] = EOS + 1
    t[1, tb // 2 - 1] = EOS  # last token of block 1: block 2 starts with no history
    seg = np.ones((2, s), np.int32)
    seg[0, tb - 1:] = 2  # a segment starts at block 0's last token: block 1's first token sees 1 of 2
    tok, seg = jnp.asarray(t), jnp.asarray(seg)
    got = ngram_gather(tok, table, layout=LAY, eos_id=EOS, segment_ids=seg, implementation="pallas_tpu",
                       interpret=INTERPRET)
    want = ngram_gather_reference(tok, table, layout=LAY, eos_id=EOS, segment_ids=seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_shard_each_inside_shard_map(dtype, table):
    """Rows split over 2 devices; each device's kernel fetches its own rows (edges included)."""
    table = table.astype(dtype)
    tok = tokens_case()
    mesh = make_mesh_from_spec("data=2", devices=jax.devices()[:2])
    per_shard = LAY.padded_rows // 2

    def local(tb, t):
        start = jax.lax.axis_index("data") * per_shard
        part = ngram_gather(t, tb, layout=LAY, eos_id=EOS, row_start=start, implementation="pallas_tpu",
                            interpret=INTERPRET)
        return jax.lax.psum(part, "data")

    out = jax.shard_map(local, mesh=mesh, in_specs=(P("data", None), P()), out_specs=P(), check_vma=False)(table, tok)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ngram_gather_reference(tok, table, layout=LAY,
                                                                                     eos_id=EOS)))
    rows = np.asarray(flat_rows(tok, LAY, EOS)).ravel()
    assert (rows < per_shard).any() and (rows >= per_shard).any()  # both shards served rows


def test_a_bfloat16_shard_of_odd_rows_is_refused(table):
    with pytest.raises(ValueError, match="slabs of 2 rows.*row_multiple"):
        ngram_gather_pallas_tpu(tokens_case(), table[:7].astype(jnp.bfloat16), layout=LAY, eos_id=EOS,
                                interpret=INTERPRET)


def test_tpu_lowering_exports(table):
    tok = tokens_case()
    fn = jax.jit(lambda t, tb: ngram_gather_pallas_tpu(t, tb, layout=LAY, eos_id=EOS))
    exported = jax.export.export(fn, platforms=["tpu"])(tok, table)
    assert "tpu_custom_call" in exported.mlir_module()


def _pallas_calls(jaxpr):
    """Every pallas_call equation in a jaxpr, nested ones (custom_vjp, pjit) included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            found.append(eqn)
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    found += _pallas_calls(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    found += _pallas_calls(sub)
    return found


def test_smem_per_grid_step_is_bounded_at_a_million_tokens():
    """LongCat-Flash-Lite's NE (V=131072, N=4, K=4, r=78) on 8 x 131072 = 1M tokens: what one grid step
    holds in SMEM (scalar-prefetched operands, its token block, SMEM scratch) must not grow with the token
    count, and the whole thing must lower for TPU."""
    lay = hashing.make_layout(131072, 4, 4, 78.0)
    b, s = 8, 131072
    tok = jax.ShapeDtypeStruct((b, s), jnp.int32)
    shard = jax.ShapeDtypeStruct((1 << 20, 256), jnp.bfloat16)
    fn = jax.jit(lambda t, tb: ngram_gather_pallas_tpu(t, tb, layout=lay, eos_id=EOS, row_start=1 << 20))
    (eqn,) = _pallas_calls(jax.make_jaxpr(fn)(tok, shard).jaxpr)
    gm = eqn.params["grid_mapping"]
    t, hist = lay.num_tables, lay.max_n - 1
    prefetch = [v.aval for v in eqn.invars[: gm.num_index_operands]]
    assert prefetch and all(a.size <= t * hist for a in prefetch), [a.shape for a in prefetch]
    smem = pltpu.MemorySpace.SMEM
    smem_blocks = [bm for bm in gm.block_mappings if bm.block_aval.memory_space == smem]
    assert len(smem_blocks) == 2  # the token block in, the row-id block out
    blk, ids = smem_blocks
    tb = TOKENS_PER_STEP
    assert 2 * tb + hist <= blk.block_aval.size <= 128  # halo + tokens + history counts (+ padding)
    assert ids.block_aval.size == tb * t  # one row id per (token, sub-table) of the block
    for bm in smem_blocks:
        assert bm.array_aval.size == gm.grid[0] * bm.block_aval.size and gm.grid == (b * s // tb,)
    for bm in gm.block_mappings:  # no other operand brings a token-sized block anywhere
        assert bm.block_aval.memory_space == smem or bm.block_aval.size <= tb * t * 2 * 256 or bm.has_trivial_window()
    scratch = sum(a.size for a in gm.scratch_avals if a.memory_space == smem)
    words = sum(a.size for a in prefetch) + 2 * (blk.block_aval.size + ids.block_aval.size) + scratch  # double-buffered
    assert words <= 1100, words  # 1085 words, 4.2 KiB

    def tiled(n):  # Mosaic lays 1-D int32 SMEM arrays out in tiles of 128 * (1, 2, 4 or 8) words
        tile = 128 * min(8, 1 << (-(-n // 128) - 1).bit_length())
        return -(-n // tile) * tile

    padded = sum(tiled(a.size) for a in prefetch) + 2 * (blk.block_aval.size + ids.block_aval.size) + sum(
        tiled(a.size) for a in gm.scratch_avals if a.memory_space == smem)
    assert padded <= 2048, padded  # <= 8 KiB: half the 16 KiB SMEM of TPU v2/v3 (v4 and later: 1 MiB)
    exported = jax.export.export(fn, platforms=["tpu"])(tok, shard)
    assert "tpu_custom_call" in exported.mlir_module()


def test_api_selection_and_errors(table):
    assert jax.default_backend() == "cpu"
    assert available_implementations() == ["reference", "xla"]
    assert "pallas_tpu" in available_implementations(interpret=True)
    tok = tokens_case()
    out = ngram_gather(tok, table, layout=LAY, eos_id=EOS)  # default on CPU: xla
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ngram_gather_reference(tok, table, layout=LAY,
                                                                                      eos_id=EOS)))
    with pytest.raises(ValueError, match="pallas_tpu compiles only for TPU .* interpret=True"):
        ngram_gather(tok, table, layout=LAY, eos_id=EOS, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="unknown implementation 'triton'"):
        ngram_gather(tok, table, layout=LAY, eos_id=EOS, implementation="triton")
