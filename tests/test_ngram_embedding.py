"""NgramEmbedding against a straightforward numpy implementation of the paper's section 3."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh
from oracles import ngram_ids_reference

from ngram_jax.config import load_config
from ngram_jax.ngram import hashing
from ngram_jax.ngram.embedding import NgramEmbedding
from ngram_jax.sharding import param_context

V, D, N, K, R, EOS = 97, 24, 3, 2, 2.37, 5


def make(amplification="none", seed=0, **kw):
    args = dict(max_n=N, splits=K, ratio=R, eos_id=EOS, amplification=amplification, init_std=0.5)
    args.update(kw)
    return NgramEmbedding(V, D, **args, rngs=nnx.Rngs(seed))


def numpy_ne(layer: NgramEmbedding, tokens, segment_ids=None):
    """e_t = (E0[x_t] + sum_idx E_idx[h_idx(t)] @ W_idx) / (1 + T), then amplification."""
    lay = layer.layout
    e0 = np.asarray(layer.embedding[...], np.float64)
    flat = np.asarray(layer.ngram_table[...], np.float64)
    proj = np.asarray(layer.ngram_proj[...], np.float64)
    tables = [flat[o : o + m] for o, m in zip(lay.row_offsets, lay.table_sizes, strict=True)]
    h = ngram_ids_reference(tokens, vocab_size=lay.vocab_size, table_sizes=lay.table_sizes, max_n=lay.max_n,
                            splits=lay.splits, eos_id=layer.eos_id, segment_ids=segment_ids)
    b, s = tokens.shape
    out = np.zeros((b, s, e0.shape[1]))
    for bi in range(b):
        for t in range(s):
            acc = e0[tokens[bi, t]].copy()
            for idx in range(lay.num_tables):
                acc += tables[idx][h[bi, t, idx]] @ proj[idx]
            out[bi, t] = acc / (1 + lay.num_tables)
    if layer.amplification == "sqrt_d":
        out *= math.sqrt(out.shape[-1])
    elif layer.amplification == "layernorm":
        mu = out.mean(-1, keepdims=True)
        var = out.var(-1, keepdims=True)
        out = (out - mu) / np.sqrt(var + layer.norm.epsilon)
        out = out * np.asarray(layer.norm.scale[...]) + np.asarray(layer.norm.bias[...])
    return out


def tokens_with_eos(seed=0, shape=(3, 17)):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, V, shape)
    t[0, 4] = EOS
    t[1, [2, 3, 9]] = EOS
    return t


@pytest.mark.parametrize("amplification", ["none", "sqrt_d", "layernorm"])
def test_matches_numpy_formula(amplification):
    layer = make(amplification)
    if layer.norm is not None:  # non-trivial LayerNorm parameters
        rng = np.random.default_rng(3)
        layer.norm.scale[...] = jnp.asarray(rng.normal(1, 0.3, D), jnp.float32)
        layer.norm.bias[...] = jnp.asarray(rng.normal(0, 0.3, D), jnp.float32)
    tokens = tokens_with_eos()
    np.testing.assert_allclose(np.asarray(layer(tokens)), numpy_ne(layer, tokens), rtol=1e-5, atol=1e-6)


def test_segments_and_explicit_history():
    layer = make()
    tokens = tokens_with_eos(1)
    seg = np.repeat(np.array([[1] * 6 + [2] * 5 + [3] * 6]), 3, axis=0)
    want = numpy_ne(layer, tokens, seg)
    np.testing.assert_allclose(np.asarray(layer(tokens, segment_ids=seg)), want, rtol=1e-5, atol=1e-6)
    # the N-gram cache form: each position's history given explicitly (longer than N-1 is fine)
    hist = hashing.history(jnp.asarray(tokens), N + 1, EOS, jnp.asarray(seg))
    np.testing.assert_allclose(np.asarray(layer(tokens, history=hist)), want, rtol=1e-5, atol=1e-6)


def test_jit_and_causality():
    layer = make("layernorm")
    f = nnx.jit(lambda m, t: m(t))
    tokens = tokens_with_eos(2)
    base = np.asarray(f(layer, tokens))
    rng = np.random.default_rng(9)
    for t in (0, 5, 15):
        other = tokens.copy()
        other[:, t + 1 :] = rng.integers(0, V, other[:, t + 1 :].shape)
        np.testing.assert_array_equal(np.asarray(f(layer, other))[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(np.asarray(f(layer, other))[:, t + 1 :], base[:, t + 1 :])


def test_gradients_reach_exactly_the_rows_looked_up():
    layer = make()
    tokens = tokens_with_eos(4)
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(tokens) ** 2)

    grads = jax.grad(loss)(params)
    lay = layer.layout
    h = ngram_ids_reference(tokens, vocab_size=V, table_sizes=lay.table_sizes, max_n=N, splits=K, eos_id=EOS)
    used_rows = set((h + np.array(lay.row_offsets)).ravel().tolist())
    nonzero_rows = set(np.flatnonzero(np.abs(np.asarray(grads["ngram_table"][...])).sum(1)).tolist())
    assert nonzero_rows == used_rows
    nonzero_tokens = set(np.flatnonzero(np.abs(np.asarray(grads["embedding"][...])).sum(1)).tolist())
    assert nonzero_tokens == set(tokens.ravel().tolist())
    assert np.abs(np.asarray(grads["ngram_proj"][...])).min(axis=(1, 2)).shape == (lay.num_tables,)
    assert (np.abs(np.asarray(grads["ngram_proj"][...])).sum(axis=(1, 2)) > 0).all()


@pytest.mark.parametrize("amplification, extra", [("none", 0), ("sqrt_d", 0), ("layernorm", 2 * D)])
def test_parameter_count_closed_form(amplification, extra):
    layer = make(amplification)
    sizes = layer.layout.table_sizes
    t = K * (N - 1)
    closed = V * D + sum(sizes) * (D // t) + t * (D // t) * D + extra
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert counted == closed
    assert layer.ngram_table.shape == (sum(sizes), D // t)  # ONE flattened table
    assert layer.ngram_proj.shape == (t, D // t, D)  # one stacked projection


@pytest.mark.parametrize("bad", [-1, V, V + 1000])
def test_bad_token_ids_raise(bad):
    layer = make()
    tokens = tokens_with_eos()
    tokens[2, 7] = bad
    with pytest.raises(ValueError, match=rf"outside \[0, {V}\); first: {bad} at index \(2, 7\)"):
        layer(tokens)


def test_width_must_divide():
    with pytest.raises(ValueError, match=r"width 24 is not divisible by K\*\(N-1\) = 5\*\(3-1\) = 10"):
        make(splits=5)
    with pytest.raises(ValueError, match="amplification"):
        make("cubic")


def test_logical_axis_names_and_mesh_sharding():
    layer = make()
    assert layer.ngram_table.get_metadata()["out_sharding"] == ("ngram_rows", "ngram_dim")
    assert layer.embedding.get_metadata()["out_sharding"] == ("vocab_rows", "table_embed")
    assert layer.ngram_proj.get_metadata()["out_sharding"] == ("ngram_tables", "ngram_dim", "embed")
    # built under a real 8-device mesh, the flattened table is split by rows
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    # V=96: sum(M) = 4*floor(2.5*96) + 16 = 976 rows, divisible by the 8 devices
    with param_context(mesh):
        sharded = NgramEmbedding(96, D, max_n=N, splits=K, ratio=2.5, eos_id=EOS, rngs=nnx.Rngs(0))
    table = sharded.ngram_table[...]
    assert table.shape == (976, D // 4)
    assert {s.data.shape for s in table.addressable_shards} == {(976 // 8, D // 4)}  # rows split 8 ways
    out = jax.jit(lambda t: sharded(t))(np.arange(16, dtype=np.int32).reshape(2, 8))
    np.testing.assert_allclose(np.asarray(out), numpy_ne(sharded, np.arange(16).reshape(2, 8)), rtol=1e-5,
                               atol=1e-6)


def test_from_config():
    """from_config uses every model.ngram key, model.embedding and model.eos_id: its values equal the numpy
    formula, and a config that changes a key changes the layer the same way as the direct constructor."""
    cfg = load_config("configs/models/tiny_ne.yaml", ["model.ngram.ratio=1.37", "model.embedding.init_std=0.5"])
    m, n = cfg.model, cfg.model.ngram
    layer = NgramEmbedding.from_config(m, rngs=nnx.Rngs(0))
    assert layer.eos_id == m.eos_id == 1 and layer.amplification == "sqrt_d"
    assert layer.layout == hashing.make_layout(m.vocab_size, n.max_n, n.splits, n.ratio, n.row_multiple)
    tokens = np.random.default_rng(0).integers(2, m.vocab_size, (2, 12))
    tokens[0, 3] = tokens[1, [1, 7]] = m.eos_id  # history resets at the config's (non-zero) EOS
    out = np.asarray(layer(jnp.asarray(tokens, jnp.int32)))
    want = numpy_ne(layer, tokens)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    assert np.abs(want).max() > 1e-2  # init_std 0.5: values far from zero
    direct = NgramEmbedding(m.vocab_size, m.d_model, max_n=n.max_n, splits=n.splits, ratio=n.ratio, eos_id=m.eos_id,
                            amplification=m.embedding.amplification, init_std=m.embedding.init_std,
                            row_multiple=n.row_multiple,
                            rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(out, np.asarray(direct(jnp.asarray(tokens, jnp.int32))))
    # an EOS at 0 (the zero fill) instead would give other n-gram ids after the resets
    zero_eos = NgramEmbedding.from_config(dataclasses.replace(m, eos_id=0), rngs=nnx.Rngs(0))
    assert not np.allclose(np.asarray(zero_eos(jnp.asarray(tokens, jnp.int32))), out)
