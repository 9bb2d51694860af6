"""PLE and PLNE (the paper, section 5): per-layer formula, one gather for all layers, the gated FFN."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import ngram_ids_reference

from ngram_jax.config import load_config
from ngram_jax.ngram.ple import PerLayerEmbedding, PerLayerNgramEmbedding, PLEFeedForward

V, L, F, D, N, K, EOS = 61, 3, 16, 12, 3, 2, 4


def plne(num_layers=L, seed=0):
    return PerLayerNgramEmbedding(V, num_layers, F, max_n=N, splits=K, ratio=1.37, eos_id=EOS,
                                  rngs=nnx.Rngs(seed))


def tokens(seed=0, shape=(2, 11)):
    t = np.random.default_rng(seed).integers(0, V, shape)
    t[0, 3] = EOS
    return t


def numpy_plne(layer, toks):
    """Layer l: (E0^l[x_t] + sum_idx E^l_idx[h_idx(t)] @ W^l_idx) / (1 + T), from the raw slices."""
    lay = layer.layout
    t_, d_e = lay.num_tables, F // lay.num_tables
    base = np.asarray(layer.embedding[...], np.float64)
    flat = np.asarray(layer.ngram_table[...], np.float64)
    proj = np.asarray(layer.ngram_proj[...], np.float64)
    h = ngram_ids_reference(toks, vocab_size=V, table_sizes=lay.table_sizes, max_n=N, splits=K, eos_id=EOS)
    out = np.zeros((*toks.shape, layer.num_layers, F))
    for b, s in np.ndindex(*toks.shape):
        for layer_idx in range(layer.num_layers):
            acc = base[toks[b, s], layer_idx * F : (layer_idx + 1) * F].copy()
            for idx in range(t_):
                row = flat[lay.row_offsets[idx] + h[b, s, idx], layer_idx * d_e : (layer_idx + 1) * d_e]
                acc += row @ proj[layer_idx, idx]
            out[b, s, layer_idx] = acc / (1 + t_)
    return out


def test_plne_matches_numpy_per_layer():
    layer = plne()
    toks = tokens()
    np.testing.assert_allclose(np.asarray(layer(toks)), numpy_plne(layer, toks), rtol=1e-5, atol=1e-6)


def test_ple_is_a_per_layer_slice():
    layer = PerLayerEmbedding(V, L, F, rngs=nnx.Rngs(0))
    toks = tokens(1)
    out = np.asarray(layer(toks))
    table = np.asarray(layer.embedding[...])
    assert out.shape == (*toks.shape, L, F)
    for layer_idx in range(L):
        np.testing.assert_array_equal(out[:, :, layer_idx], table[toks, layer_idx * F : (layer_idx + 1) * F])


def count_gathers(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)

    def walk(j):
        n = 0
        for eqn in j.eqns:
            n += eqn.primitive.name == "gather"
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                n += walk(sub)
        return n

    return walk(jaxpr.jaxpr)


@pytest.mark.parametrize("num_layers", [1, 4, 9])
def test_one_gather_serves_all_layers(num_layers):
    toks = tokens(2)
    assert count_gathers(lambda t: plne(num_layers)(t), toks) == 2  # token table + n-gram table
    ple = PerLayerEmbedding(V, num_layers, F, rngs=nnx.Rngs(0))
    assert count_gathers(lambda t: ple(t), toks) == 1


def test_plne_causal_and_gradients_hit_looked_up_rows():
    layer = plne()
    toks = tokens(3)
    out = np.asarray(layer(toks))
    other = toks.copy()
    other[:, 6:] = (other[:, 6:] + 1) % V
    np.testing.assert_array_equal(np.asarray(layer(other))[:, :6], out[:, :6])

    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
    grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(toks) ** 2))(params)
    lay = layer.layout
    h = ngram_ids_reference(toks, vocab_size=V, table_sizes=lay.table_sizes, max_n=N, splits=K, eos_id=EOS)
    g = np.abs(np.asarray(grads["ngram_table"][...])).sum(1)
    assert set(np.flatnonzero(g).tolist()) == set((h + np.array(lay.row_offsets)).ravel().tolist())


def test_parameter_count_closed_form():
    layer = plne()
    t = K * (N - 1)
    closed = V * L * F + sum(layer.layout.table_sizes) * L * (F // t) + L * t * (F // t) * F
    assert sum(x.size for x in jax.tree.leaves(nnx.state(layer, nnx.Param))) == closed


def test_ple_ffn_formula():
    ffn = PLEFeedForward(D, F, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, D)).astype(np.float32)
    e = rng.normal(size=(2, 5, F)).astype(np.float32)
    wa, wd = np.asarray(ffn.w_a[...], np.float64), np.asarray(ffn.w_d[...], np.float64)
    a = x @ wa
    want = (a / (1 + np.exp(-a)) * e) @ wd  # W_d(SiLU(W_a x) * e)
    np.testing.assert_allclose(np.asarray(ffn(x, e)), want, rtol=1e-5, atol=1e-5)


def test_from_config_and_bad_ids():
    m = load_config("configs/models/tiny_plne.yaml").model
    layer = PerLayerNgramEmbedding.from_config(m, rngs=nnx.Rngs(0))
    assert layer.num_layers == 2 * m.num_blocks and layer.width == m.ffn_dim
    with pytest.raises(ValueError, match="outside"):
        layer(np.array([[m.vocab_size]]))
    with pytest.raises(ValueError, match="outside"):
        PerLayerEmbedding.from_config(m, rngs=nnx.Rngs(0))(np.array([[-3]]))
