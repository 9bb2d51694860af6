"""MoE: routing against numpy, zero experts, bias semantics, dispatch equivalence, balancing."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hlo import copied_sizes

from ngram_jax.config import MoEConfig
from ngram_jax.layers import moe as moe_lib
from ngram_jax.layers.moe import MoE, bias_update, capacity_slots, numpy_route, route, sort_assignments

D = 16


def make(dispatch="dropless", e=4, z=2, k=3, **kw):
    kw.setdefault("few_tokens_dense", False)  # the dropless tests run the grouped matmul whatever the token count
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


@pytest.mark.parametrize("dispatch, kw", [("dropless", {"grouped_matmul": "ragged_dot"}),
                                          ("dropless", {"grouped_matmul": "tiled", "grouped_matmul_tile": 4}),
                                          ("dropless", {"grouped_matmul": "tiled", "grouped_matmul_tile": 64}),
                                          ("capacity", {"capacity_factor": 100.0})])
def test_dispatch_equals_dense_reference(dispatch, kw):
    dense, other = make("dense"), make(dispatch, **kw)
    x = x_in(2)
    np.testing.assert_allclose(np.asarray(other(x)), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_dropless_with_an_expert_receiving_no_tokens(impl):
    dense, dropless = make("dense", e=5, z=1, k=2), make("dropless", e=5, z=1, k=2, grouped_matmul=impl,
                                                           grouped_matmul_tile=4)
    for layer in (dense, dropless):
        layer.bias[...] = jnp.array([0.0, 0.0, -100.0, 0.0, 0.0, 0.0])  # expert 2 never chosen
    x = x_in(3)
    y = dropless(x)
    assert int(dropless.counts[...][2]) == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_gradients_match_and_reach_the_router(impl):
    x = x_in(4)

    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

    gd, gr = grads(make("dense")), grads(make("dropless", grouped_matmul=impl, grouped_matmul_tile=4))
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


@pytest.mark.parametrize("rule, rate", [("sign", 0.01), ("proportional", 0.05)])  # proportional: rate * share gap
def test_bias_update_moves_skewed_load_toward_balance(rule, rate):
    layer = make(e=4, z=0, k=1, bias_update_rate=rate, bias_update_rule=rule)
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
    # proportional: rate * (target share - T_i / (K * T_all)) = 0.5 * (0.5 - [0.75, 0.25])
    np.testing.assert_allclose(np.asarray(bias_update(jnp.zeros(2), jnp.array([3, 1]), 0.5, "proportional")),
                               [-0.125, 0.125])
    np.testing.assert_array_equal(np.asarray(bias_update(jnp.ones(2), jnp.array([0, 0]), 0.5, "sign")), [1, 1])


def test_bias_update_steers_real_experts_per_token():
    """LongCat-Flash's balancing rule (layers/moe.py): E=2 real, Z=2 zero, K=2, K_e=1.5: targets 1.5/(2*2) =
    0.375 per real expert and 0.5/(2*2) = 0.125 per zero expert; loads [3, 1, 2, 2] / 8 = [0.375, 0.125, 0.25, 0.25]."""
    targets = moe_lib.balance_targets(2, 2, 2, 1.5)
    np.testing.assert_allclose(targets, [0.375, 0.375, 0.125, 0.125])
    counts = jnp.array([3, 1, 2, 2])
    np.testing.assert_allclose(np.asarray(bias_update(jnp.zeros(4), counts, 0.1, "sign", targets)),
                               [0, 0.1, -0.1, -0.1])
    np.testing.assert_allclose(np.asarray(bias_update(jnp.zeros(4), counts, 0.1, "proportional", targets)),
                               [0, 0.025, -0.0125, -0.0125], atol=1e-7)
    # K_e = K: the zero experts' target is 0 (pushed out); without zero experts K_e = K is plain balance
    np.testing.assert_allclose(moe_lib.balance_targets(2, 2, 2, 2.0), [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(moe_lib.balance_targets(4, 0, 2, 2.0), [0.25] * 4)


@pytest.mark.parametrize("rule, rate", [("sign", 2e-3), ("proportional", 0.1)])
@pytest.mark.parametrize("real_per_token", [1.5, 2.0])
def test_training_realises_the_configured_real_expert_share(rule, rate, real_per_token):
    """E=4 real + Z=4 zero, top-2: the bias drives the realised real-expert share of the slots to
    K_e/K, balancing the real experts among themselves (the old rule balanced all 8 equally: 1/2)."""
    layer = make(e=4, z=4, k=2, bias_update_rate=rate, bias_update_rule=rule, real_experts_per_token=real_per_token)
    x = x_in(8, (4, 64, D))
    step = nnx.jit(lambda m, x: (m(x), moe_lib.update_selection_bias(m)))
    shares, real_loads = [], []
    for _ in range(300):
        step(layer, x)
        c = np.asarray(layer.counts[...], np.float64)
        shares.append(c[:4].sum() / c.sum())
        real_loads.append(c[:4] / c[:4].sum())
    want = real_per_token / 2
    assert abs(np.mean(shares[-50:]) - want) < 0.05, (want, shares[-50:])
    assert np.abs(np.mean(real_loads[-50:], 0) - 0.25).max() < 0.08, np.mean(real_loads[-50:], 0)


def test_padding_counts_in_no_load_and_no_loss():
    """Tokens with token_mask False change neither the counts nor the auxiliary loss."""
    x = x_in(9, (2, 8, D))
    mask = jnp.array([[True] * 5 + [False] * 3, [True] * 8])
    for dispatch in ("dropless", "capacity", "dense"):
        kw = {"capacity_factor": 100.0} if dispatch == "capacity" else {}
        full = make(dispatch, load_balance_loss_weight=1.0, router_z_loss_weight=0.5, **kw)
        full(x, token_mask=mask)
        alone = make(dispatch, load_balance_loss_weight=1.0, router_z_loss_weight=0.5, **kw)
        y_alone = alone(jnp.concatenate([x[0, :5], x[1]])[None])  # the 13 real tokens only
        np.testing.assert_array_equal(np.asarray(full.counts[...]), np.asarray(alone.counts[...]))
        assert int(full.counts[...].sum()) == 13 * 3
        np.testing.assert_allclose(float(full.aux_loss[...]), float(alone.aux_loss[...]), rtol=1e-5)
        y = full(x, token_mask=mask)
        np.testing.assert_allclose(np.asarray(y[0, :5]), np.asarray(y_alone[0, :5]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["ragged_dot", "tiled"])
def test_dropless_padding_gets_no_expert_and_changes_no_gradient(impl):
    """Padding tokens are given to no real expert (so they cost no tile rows); the real tokens' outputs
    and every gradient of a loss over the real tokens equal the dense oracle's."""
    x = x_in(12, (2, 8, D))
    mask = jnp.array([[True] * 3 + [False] * 5, [False] * 2 + [True] * 6])
    sel = np.asarray(mask)

    def run(layer):
        def loss(m, x):
            return jnp.sum(jnp.where(mask[..., None], m(x, token_mask=mask), 0) ** 2)
        (value, (g_m, g_x)) = nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)
        return value, g_m, g_x, layer(x, token_mask=mask)

    want, got = run(make("dense")), run(make("dropless", grouped_matmul=impl, grouped_matmul_tile=4))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[3])[sel], np.asarray(want[3])[sel], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[2]), np.asarray(want[2]), rtol=1e-4, atol=1e-5)
    for name in ("router", "gate", "up", "down"):
        np.testing.assert_allclose(np.asarray(got[1][name][...]), np.asarray(want[1][name][...]), rtol=1e-4,
                                   atol=1e-5)
    # every real-expert assignment of a padding token yields 0 (not computed), zero experts the identity
    y = np.asarray(got[3])[~sel]
    r = route(x[~sel], make().router[...], jnp.zeros(6), 3, 2.5)
    zero_part = np.einsum("nk,nkd->nd", np.asarray(r.weights) * (np.asarray(r.experts) >= 4),
                          np.broadcast_to(np.asarray(x[~sel])[:, None], (y.shape[0], 3, D)))
    np.testing.assert_allclose(y, zero_part, rtol=1e-5, atol=1e-6)


def test_padding_takes_no_capacity_slot():
    """12 padding rows that route like the first real token come first; with 12 slots per expert
    (16 tokens * 3 / 4) they would fill its experts' buffers and drop its assignments."""
    real = x_in(10, (1, 4, D))
    x = jnp.concatenate([jnp.repeat(real[:, :1], 12, axis=1), real], axis=1)  # [1, 16, D]
    mask = jnp.arange(16)[None] >= 12
    tight, dense = make("capacity", capacity_factor=1.0), make("dense")
    assert tight.capacity(16) == 12
    want = np.asarray(dense(x))[:, 12:]
    np.testing.assert_allclose(np.asarray(tight(x, token_mask=mask))[:, 12:], want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(tight(x))[:, 12], want[:, 0], atol=1e-4)  # unmasked: dropped


def test_model_excludes_padding_from_expert_counts():
    from ngram_jax.config import load_config
    from ngram_jax.model import build_model

    cfg = load_config("configs/models/tiny_moe.yaml", ["model.d_model=32", "model.ffn_dim=32", "model.num_blocks=1",
                                                        "model.moe.expert_dim=16"])
    model = build_model(cfg, nnx.Rngs(0))
    tokens = jnp.arange(24, dtype=jnp.int32).reshape(2, 12) + 7
    seg = jnp.array([[1] * 9 + [0] * 3, [1] * 4 + [2] * 6 + [0] * 2])
    model(tokens, segment_ids=seg)
    counts = np.asarray(model.blocks[0].moe.counts[...])
    assert counts.sum() == cfg.model.moe.top_k * 19  # 19 real tokens; 5 padding tokens not counted


def test_aux_losses():
    layer = make(load_balance_loss_weight=1.0)
    layer(x_in())
    lb = float(layer.aux_loss[...])
    assert lb > 0
    with_z = make(load_balance_loss_weight=1.0, router_z_loss_weight=1.0)
    with_z(x_in())
    assert float(with_z.aux_loss[...]) > lb


def _router_dots(jaxpr, logits_shape):
    """dot_general equations (at any nesting depth) whose output has the router logits' shape."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.shape == logits_shape:
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += _router_dots(sub, logits_shape)
    return found


def test_router_logits_are_float32_at_highest_precision():
    layer = make(e=4, z=2, k=2)
    graphdef, state = nnx.split(layer)
    x = x_in(7).astype(jnp.bfloat16)

    def forward(state, x):  # the MoE layer's own forward pass, as a pure function
        return nnx.merge(graphdef, state)(x)

    with jax.default_matmul_precision("bfloat16"):  # a global default must not lower the router's precision
        closed = jax.make_jaxpr(forward)(state, x)
        dots = _router_dots(closed.jaxpr, (14, 6))  # [B*S, E+Z]
        assert dots, closed
        for eqn in dots:
            assert eqn.params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST), eqn
            assert eqn.params["preferred_element_type"] == jnp.float32
            assert all(v.aval.dtype == jnp.float32 for v in eqn.invars)
        hlo = jax.jit(lambda x: route(x.reshape(-1, D), layer.router[...], layer.bias[...], 2, 1.0)).lower(x).as_text()
    assert re.search(r"dot_general .*precision = \[HIGHEST, HIGHEST\].*-> tensor<14x6xf32>", hlo), hlo


def test_expert_parallel_excludes_padding_like_the_local_path():
    """experts split over 2 devices, tokens over 2: masked counts and losses equal the local path's."""
    from ngram_jax.sharding import make_mesh_from_spec, param_context

    x = x_in(11, (4, 6, D))
    mask = jnp.array([[1] * 6, [1] * 2 + [0] * 4, [0] * 6, [1] * 5 + [0]], bool)
    kw = dict(e=4, z=2, k=3, load_balance_loss_weight=1.0, router_z_loss_weight=0.5)
    local = make(**kw)
    y_local = local(x, token_mask=mask)
    y_dense = make("dense", **kw)(x)
    mesh = make_mesh_from_spec("data=2,expert=2", devices=jax.devices()[:4])
    with param_context(mesh):
        sharded = make(**kw)
        y = nnx.jit(lambda m, x, mask: m(x, token_mask=mask))(sharded, x, mask)
    sel = np.asarray(mask)  # real tokens: expert-parallel (tiled grouped matmul) = local = dense
    np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(y_local)[sel], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y)[sel], np.asarray(y_dense)[sel], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(sharded.counts[...]), np.asarray(local.counts[...]))
    assert int(local.counts[...].sum()) == 13 * 3
    np.testing.assert_allclose(float(sharded.aux_loss[...]), float(local.aux_loss[...]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sharded.routing[...]), np.asarray(local.routing[...]), rtol=1e-5)
    # capacity slots per destination device: a tight capacity drops assignments there too, and says so
    tight = dict(kw, dispatch="capacity", capacity_factor=0.3)
    with param_context(mesh):
        capped = make(**tight)
        nnx.jit(lambda m, x, mask: m(x, token_mask=mask))(capped, x, mask)
    dropped = float(capped.routing[...][3])
    assert 0 < dropped < 13 * 3


_DTYPE_BYTES = {"f32": 4, "s32": 4, "bf16": 2, "f16": 2, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def all_to_all_bytes(hlo: str) -> int:
    """Summed operand bytes of every all-to-all in a compiled HLO module's text (an all-to-all's result
    has its operands' shapes; the compiled text prints only the result's)."""
    total = 0
    for line in hlo.splitlines():
        if " all-to-all(" not in line:
            continue
        result = line.split(" = ", 1)[1].split(" all-to-all(", 1)[0]
        for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", result):
            total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))
    return total


def test_expert_parallel_all_to_all_bytes_follow_routed_tokens_not_experts():
    """Compiled (not run) forward+backward on 2 devices, experts split over them: the all-to-all operand
    bytes are identical for 8 and 32 experts at equal tokens and double with double the tokens."""
    from ngram_jax.sharding import make_mesh_from_spec, param_context

    mesh = make_mesh_from_spec("expert=2", devices=jax.devices()[:2])

    def a2a_bytes(num_experts, tokens):
        with param_context(mesh):
            layer = make(e=num_experts, z=2, k=3)
            graphdef, params, rest = nnx.split(layer, nnx.Param, ...)
            x = jnp.zeros((2, tokens // 2, D))

            def step(params, rest, x):  # the MoE layer's forward and backward pass
                return nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(nnx.merge(graphdef, params, rest), x)

            hlo = jax.jit(step).lower(params, rest, x).compile().as_text()
        return all_to_all_bytes(hlo)

    b8, b32, b8_twice = a2a_bytes(8, 16), a2a_bytes(32, 16), a2a_bytes(8, 32)
    # per device 8 tokens * top-3 = 24 slots for each of the 2 devices: the rows (D=16 f32) out and back
    # in the forward pass, both transposed in the backward pass, and the expert ids (s32) once
    assert b8 == 4 * (2 * 24 * D * 4) + 2 * 24 * 4, b8
    assert b8 == b32
    assert b8_twice == 2 * b8


def _primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= _primitives(sub)
    return names


def _layer_primitives(layer, x) -> set[str]:
    """The primitives of one traced call of an MoE layer on x."""
    graphdef, state = nnx.split(layer)
    return _primitives(jax.make_jaxpr(lambda state, x: nnx.merge(graphdef, state)(x))(state, x).jaxpr)


@pytest.mark.parametrize("setting, backend, primitive", [
    ("auto", "cpu", None), ("auto", "tpu", "pallas_call"), ("ragged_dot", "cpu", "ragged_dot_general"),
    ("megablox", "cpu", "pallas_call"), ("tiled", "tpu", None)])
def test_grouped_matmul_setting_selects_the_implementation(setting, backend, primitive):
    """``model.moe.grouped_matmul``: auto is megablox (JAX's Pallas TPU grouped matmul) when the compile target
    is TPU (``ngram_jax.backend.compile_target``, as tools.aot compiles), the tiled layout elsewhere."""
    from ngram_jax.backend import compile_target

    with compile_target(backend):
        prims = _layer_primitives(make(grouped_matmul=setting), x_in())
    for p in ("pallas_call", "ragged_dot_general"):
        assert (p in prims) == (p == primitive), (p, sorted(prims))


def test_few_tokens_run_every_expert_with_the_dropless_outputs():
    """``model.moe.few_tokens_dense``: a pass of 3 tokens (decoding) runs the dense combination, no sort and
    no tiles, with the tiled layout's outputs and gradients; a batch of 512 tokens keeps the tiled layout."""
    few, tiled = make(grouped_matmul="tiled", few_tokens_dense=True), make(grouped_matmul="tiled")
    assert moe_lib.dense_is_fewer_rows(3, 3, 4, 64) and not moe_lib.dense_is_fewer_rows(512, 3, 4, 64)
    x = x_in(5, (1, 3, D))
    assert "sort" not in _layer_primitives(few, x) and "sort" in _layer_primitives(tiled, x)
    assert "sort" in _layer_primitives(few, x_in(6, (8, 64, D)))
    np.testing.assert_allclose(np.asarray(few(x)), np.asarray(tiled(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(few.counts[...]), np.asarray(tiled.counts[...]))
    gf, gt = (nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer) for layer in (few, tiled))
    for name in ("router", "gate", "up", "down"):
        np.testing.assert_allclose(np.asarray(gf[name][...]), np.asarray(gt[name][...]), rtol=1e-4, atol=1e-5)


def test_few_tokens_read_the_expert_weights_in_place():
    """The every-expert pass of a few tokens is a matmul batched over experts on the weights as stored: the
    compiled program copies none of them (``nd,edf->nef`` had XLA transpose every expert weight at every
    decoding step)."""
    layer = make(grouped_matmul="tiled", few_tokens_dense=True)
    graphdef, state = nnx.split(layer)
    hlo = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x_in(5, (1, 3, D))).compile().as_text()
    weights = {p[...].size for p in (layer.gate, layer.up, layer.down)}
    assert weights == {4 * D * 8}
    assert not weights & copied_sizes(hlo)


def test_normalized_and_scaled_routing_match_numpy():
    """normalize_topk: the selected probabilities sum to 1 before the scale; routed_scale=num_experts multiplies
    the scale by (E + Z) / k, so an unnormalised mass starts near routed_scaling_factor."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, D)).astype(np.float32)
    kernel = rng.normal(scale=0.3, size=(D, 6)).astype(np.float32)
    bias = rng.normal(scale=0.05, size=6).astype(np.float32)
    r = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), 3, 2.5, normalize=True)
    experts, weights = numpy_route(x, kernel, bias, 3, 2.5, normalize=True)
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    np.testing.assert_allclose(np.asarray(r.weights), weights, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(r.weights).sum(-1), 2.5, rtol=1e-5)
    cfg = MoEConfig(num_experts=60, num_zero_experts=4, top_k=2, routed_scaling_factor=1.5, routed_scale="num_experts")
    assert moe_lib.routed_scale(cfg) == pytest.approx(1.5 * 64 / 2)
    assert moe_lib.routed_scale(MoEConfig(num_experts=60, top_k=2, routed_scaling_factor=1.5)) == 1.5


def test_bias_step_in_mean_probability_units():
    """bias_update_units=mean_probability moves the bias by rate / (E + Z): the same relative step at any E."""
    for e in (8, 1024):
        cfg = MoEConfig(num_experts=e, num_zero_experts=0, top_k=2, bias_update_rate=0.008,
                        bias_update_units="mean_probability")
        assert moe_lib.bias_step(cfg) == pytest.approx(0.008 / e)
    assert moe_lib.bias_step(MoEConfig(num_experts=1024, top_k=2, bias_update_rate=1e-3)) == 1e-3
    layer = MoE(MoEConfig(num_experts=8, top_k=2, bias_update_rate=0.08, bias_update_units="mean_probability",
                          dispatch="dense"), D, rngs=nnx.Rngs(0))
    layer(x_in())
    moe_lib.update_selection_bias(layer)
    np.testing.assert_allclose(np.abs(np.asarray(layer.bias[...])), 0.01, rtol=1e-6)  # sign steps of 0.08 / 8


def _numpy_routing_totals(x, kernel, bias, k, scale, normalize, capacity, n_real, mask):
    """[tokens, routed mass, bias-changed, dropped] of one routing, from numpy: the oracle of MoE.routing."""
    experts, weights = numpy_route(x, kernel, bias, k, scale, normalize)
    plain, _ = numpy_route(x, kernel, np.zeros_like(bias), k, scale, normalize)
    changed = np.array([[e not in p for e in row] for row, p in zip(experts, plain, strict=True)])
    fill = np.zeros(n_real, int)
    dropped = np.zeros_like(changed)
    for n in range(len(x)):  # capacity slots in (token, choice) order over real tokens
        for j, e in enumerate(experts[n]):
            if mask[n] and e < n_real:
                dropped[n, j] = fill[e] >= capacity
                fill[e] += 1
    m = mask.astype(float)
    return np.array([m.sum(), (m * weights.sum(-1)).sum(), (m * changed.sum(-1)).sum(), (m * dropped.sum(-1)).sum()])


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_routing_totals_match_numpy(dispatch):
    """MoE.routing holds the tokens, routed mass, bias-changed and dropped assignments of the last pass over
    the real tokens, as numpy counts them (dropless drops nothing)."""
    layer = make(dispatch, e=4, z=2, k=3, capacity_factor=0.5)
    layer.bias[...] = jnp.asarray(np.random.default_rng(5).normal(scale=0.3, size=6), jnp.float32)
    x = x_in(seed=4, shape=(2, 9, D))
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False  # padding
    layer(x, token_mask=jnp.asarray(mask))
    flat = np.asarray(x).reshape(-1, D)
    cap = layer.capacity(flat.shape[0]) if dispatch == "capacity" else 10**9
    want = _numpy_routing_totals(flat, np.asarray(layer.router[...]), np.asarray(layer.bias[...]), 3, 2.5, False,
                                 cap, 4, mask.reshape(-1))
    got = np.asarray(layer.routing[...])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert (got[3] > 0) == (dispatch == "capacity") and got[2] > 0  # the test exercises drops and bias changes
    d = moe_lib.routing_diagnostics(np.asarray(layer.counts[...])[None], got[None], 4, 3)
    assert d["dropped_fraction"] == pytest.approx(want[3] / (want[0] * 3))
    assert d["routed_mass"] == pytest.approx(want[1] / want[0])
    assert d["bias_changed_fraction"] == pytest.approx(want[2] / (want[0] * 3))


def test_normalize_with_num_experts_scale_is_refused():
    from ngram_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="routed_scale=num_experts"):
        load_config("configs/models/tiny_moe.yaml", ["model.moe.normalize_topk=true",
                                                     "model.moe.routed_scale=num_experts"])


def test_lecun_expert_init_matches_the_dense_ffn_scale():
    """expert_init=lecun draws every expert as the dense FFN's Linear (std 1/sqrt(fan_in)); normal keeps 0.02."""
    cfg = MoEConfig(num_experts=64, top_k=2, expert_dim=32, expert_init="lecun")
    layer = MoE(cfg, 64, rngs=nnx.Rngs(0))
    for w, fan_in in ((layer.gate, 64), (layer.up, 64), (layer.down, 32)):
        assert np.asarray(w[...]).std() == pytest.approx(1 / np.sqrt(fan_in), rel=0.05)
    plain = MoE(MoEConfig(num_experts=64, top_k=2, expert_dim=32), 64, rngs=nnx.Rngs(0))
    assert np.asarray(plain.down[...]).std() == pytest.approx(0.02, rel=0.05)
    assert np.asarray(layer.router[...]).std() == pytest.approx(0.02, rel=0.05)


def test_bias_on_logits_selects_by_odds_and_leaves_the_weights():
    """bias_on=logits: topk(x W_r + b) against numpy (another selection than topk(p + b)); the weights stay the
    unbiased probabilities."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(50, D)).astype(np.float32)
    kernel = rng.normal(scale=0.3, size=(D, 8)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=8).astype(np.float32)
    r = route(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(bias), 2, 1.0, bias_on="logits")
    experts, weights = numpy_route(x, kernel, bias, 2, 1.0, bias_on="logits")
    np.testing.assert_array_equal(np.asarray(r.experts), experts)
    np.testing.assert_allclose(np.asarray(r.weights), weights, rtol=1e-5)
    assert not np.array_equal(experts, numpy_route(x, kernel, bias, 2, 1.0)[0])  # another selection than on probs
