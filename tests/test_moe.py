"""MoE: routing against numpy, zero experts, bias semantics, dispatch equivalence, balancing."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngram_jax.config import MoEConfig
from ngram_jax.layers import moe as moe_lib
from ngram_jax.layers.moe import MoE, bias_update, capacity_slots, numpy_route, route, sort_assignments

D = 16


def make(dispatch="dropless", e=4, z=2, k=3, **kw):
    cfg = MoEConfig(num_experts=e, num_zero_experts=z, top_k=k, expert_dim=8, routed_scaling_factor=2.5,
                    dispatch=dispatch, **kw)
    return MoE(cfg, D, init_std=0.5, rngs=nnx.Rngs(0))


def x_in(seed=1, shape=(2, 7, D)):
    return jax.random.normal(jax.random.key(seed), shape)


def test_route_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, D)).astype(np.float32)
    kernel = rng.normal(size=(D, 6)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=6).astype(np.float32)
    r = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), 3, 2.5)
    experts, weights = numpy_route(x, kernel, bias, 3, 2.5)
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    np.testing.assert_allclose(np.asarray(r.weights), weights, rtol=1e-5)
    assert r.probs.dtype == jnp.float32


def test_bias_changes_selection_not_weights():
    rng = np.random.default_rng(1)
    x, kernel = jnp.asarray(rng.normal(size=(30, D)), jnp.float32), jnp.asarray(rng.normal(size=(D, 6)), jnp.float32)
    plain = route(x, kernel, jnp.zeros(6), 2, 1.0)
    bias = jnp.zeros(6).at[5].set(10.0)  # force expert 5 into every selection
    biased = route(x, kernel, bias, 2, 1.0)
    assert (np.asarray(biased.experts) == 5).any(axis=1).all()
    assert not (np.asarray(plain.experts) == 5).any(axis=1).all()
    # weights are the unbiased probabilities of the selected experts, times the scale
    np.testing.assert_allclose(np.asarray(biased.weights),
                               np.take_along_axis(np.asarray(plain.probs), np.asarray(biased.experts), 1), rtol=1e-6)


def test_zero_experts_are_identity():
    layer = make("dense", e=2, z=3, k=2)
    layer.bias[...] = jnp.array([-10.0, -10.0, 0.0, 0.0, 0.0])  # select only zero experts
    x = x_in()
    y = layer(x)
    r = route(x.reshape(-1, D), layer.router[...], layer.bias[...], 2, 2.5)
    assert (np.asarray(r.experts) >= 2).all()
    want = np.asarray(x).reshape(-1, D) * np.asarray(r.weights).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, D), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_dispatch_equals_dense_reference(dispatch):
    kw = {"capacity_factor": 100.0} if dispatch == "capacity" else {}
    dense, other = make("dense"), make(dispatch, **kw)
    x = x_in(2)
    np.testing.assert_allclose(np.asarray(other(x)), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)


def test_dropless_with_an_expert_receiving_no_tokens():
    dense, dropless = make("dense", e=5, z=1, k=2), make("dropless", e=5, z=1, k=2)
    for layer in (dense, dropless):
        layer.bias[...] = jnp.array([0.0, 0.0, -100.0, 0.0, 0.0, 0.0])  # expert 2 never chosen
    x = x_in(3)
    y = dropless(x)
    assert int(dropless.counts[...][2]) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)


def test_gradients_match_and_reach_the_router():
    x = x_in(4)

    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    gd, gr = grads(make("dense")), grads(make("dropless"))
    assert float(jnp.abs(gr["router"][...]).sum()) > 0
    for name in ("router", "gate", "up", "down"):
        np.testing.assert_allclose(np.asarray(gr[name][...]), np.asarray(gd[name][...]), rtol=1e-4, atol=1e-5)


def test_bias_and_stats_are_not_params():
    layer = make()
    params = nnx.state(layer, nnx.Param)
    assert "bias" not in params and "counts" not in params
    assert isinstance(layer.bias, moe_lib.SelectionBias)


def test_sort_and_capacity_index_maths():
    experts = jnp.array([[2, 0], [4, 2], [1, 2]])  # E=3 real, expert 4 is a zero expert
    order, sizes, real = sort_assignments(experts, 3)
    flat = np.array([2, 0, 4, 2, 1, 2])
    np.testing.assert_array_equal(flat[np.asarray(order)], [0, 1, 2, 2, 2, 4])
    np.testing.assert_array_equal(np.asarray(sizes), [1, 1, 3])
    np.testing.assert_array_equal(np.asarray(real), [1, 1, 1, 1, 1, 0])
    slot, kept = capacity_slots(experts, 3, capacity=2)
    np.testing.assert_array_equal(np.asarray(slot), [[0, 0], [0, 1], [0, 2]])
    np.testing.assert_array_equal(np.asarray(kept), [[1, 1], [0, 1], [1, 0]])  # 3rd use of expert 2 dropped


def test_capacity_drops_overflow():
    tight = make("capacity", capacity_factor=0.25)
    dense = make("dense")
    x = x_in(5)
    assert not np.allclose(np.asarray(tight(x)), np.asarray(dense(x)), atol=1e-4)


@pytest.mark.parametrize("rule", ["sign", "proportional"])
def test_bias_update_moves_skewed_load_toward_balance(rule):
    layer = make(e=4, z=0, k=1, bias_update_rate=0.01, bias_update_rule=rule)
    w0 = layer.router[...][:, 0]
    x = x_in(6, (4, 32, D)) + 2.0 * w0 / jnp.linalg.norm(w0)  # inputs lean toward expert 0
    step = nnx.jit(lambda m, x: (m(x), moe_lib.update_selection_bias(m)))
    spread = []
    for _ in range(100):
        step(layer, x)
        counts = np.asarray(layer.counts[...])
        spread.append(counts.max() - counts.min())
    assert spread[0] > 64, spread  # really skewed at the start (128 tokens, 4 experts)
    assert np.mean(spread[-20:]) < spread[0] / 2, spread
    assert float(layer.bias[...][0]) < 0  # the over-loaded expert is pushed down


def test_bias_update_rules():
    np.testing.assert_allclose(np.asarray(bias_update(jnp.zeros(3), jnp.array([6, 2, 1]), 0.1, "sign")),
                               [-0.1, 0.1, 0.1])
    np.testing.assert_allclose(np.asarray(bias_update(jnp.zeros(2), jnp.array([3, 1]), 0.5, "proportional")),
                               [-0.25, 0.25])


def test_aux_losses():
    layer = make(load_balance_loss_weight=1.0)
    layer(x_in())
    lb = float(layer.aux_loss[...])
    assert lb > 0
    with_z = make(load_balance_loss_weight=1.0, router_z_loss_weight=1.0)
    with_z(x_in())
    assert float(with_z.aux_loss[...]) > lb


def _router_dots(jaxpr, n_experts):
    """dot_general equations (at any nesting depth) whose output has the router's width."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape[-1] == n_experts:
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _router_dots(sub, n_experts)
    return found


def test_router_logits_are_float32_at_highest_precision():
    layer = make(e=4, z=2, k=2)
    graphdef, state = nnx.split(layer)
    x = x_in(7).astype(jnp.bfloat16)

    def forward(state, x):  # the MoE layer's own forward pass, as a pure function
        return nnx.merge(graphdef, state)(x)

    with jax.default_matmul_precision("bfloat16"):  # a global default must not lower the router's precision
        closed = jax.make_jaxpr(forward)(state, x)
        dots = _router_dots(closed.jaxpr, 6)
        assert dots, closed
        for eqn in dots:
            assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST), eqn
            assert eqn.params["preferred_element_type"] == jnp.float32
            assert all(v.aval.dtype == jnp.float32 for v in eqn.invars)
        hlo = jax.jit(lambda x: route(x.reshape(-1, D), layer.router[...], layer.bias[...], 2, 1.0)).lower(x).as_text()
    assert re.search(r"dot_general .*precision = \[HIGHEST, HIGHEST\].*-> tensor<14x6xf32>", hlo), hlo
