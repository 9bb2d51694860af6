"""Mixture of Experts with zero experts (LongCat-Flash, arXiv 2509.01322).

Router: ``p = softmax(x W_r)`` over E real + Z zero experts in float32; selection
``topk(p + b, k)`` (or ``topk(x W_r + b, k)`` with ``bias_on: logits``) with a load-balancing bias b used
for selection only; weights
``w = p[selected] * scale`` (LongCat-Flash: no renormalisation, scale = ``routed_scaling_factor``), or
``w = p[selected] / sum(p[selected]) * scale`` with ``normalize_topk`` (DeepSeek-V3, Mixtral); ``routed_scale:
num_experts`` multiplies the scale by (E + Z) / k (:func:`routed_scale`). A zero expert returns its input
times its weight. Real experts are SwiGLU. The bias is not trained by gradients: it lives in a
:class:`SelectionBias` variable (outside the optimizer) and :func:`update_selection_bias` moves it
after each step (aux-loss-free balancing).

Balancing rule (LongCat-Flash, arXiv 2509.01322). With K = ``top_k``, E real and Z zero experts,
K_e = ``real_experts_per_token`` (the expected number of real experts per token; default K),
T_i the tokens routed to expert i and T_all the tokens of the step (padding excluded, so
``sum_i T_i = K * T_all``), every expert has a target share of the K * T_all routed slots:
``K_e / (K * E)`` for a real expert, ``(K - K_e) / (K * Z)`` for a zero expert, and its gap is
``g_i = target_i - T_i / (K * T_all)``. The update is ``Δb_i = μ * sign(g_i)`` (``bias_update_rule:
sign``) or ``Δb_i = μ * g_i`` (``proportional``), μ = ``bias_update_rate`` (``bias_update_units: absolute``)
or ``bias_update_rate / (E + Z)`` (``mean_probability``: the rate in units of the mean router probability).
So the real experts are
balanced toward their mean and the zero experts together absorb the share ``(K - K_e) / K`` of
the slots (K_e = K pushes zero experts out; Z = 0 needs K_e = K). The realised share is measurable:
``counts`` (a :class:`RoutingStats`) holds the last step's assignments per expert over real tokens;
the training loop logs ``zero_expert_fraction = zero-expert slots / all slots`` from it.

Padding (``token_mask`` False, i.e. ``segment_ids == 0``) counts in no expert load, in no
auxiliary loss and takes no capacity slot; its output is not meaningful.

Dispatch (index maths as pure functions, all equal on inputs where nothing is dropped):
- ``dense``: every expert on every token, then select (the test oracle);
- ``dropless``: sort assignments by expert, grouped matmuls (``model.moe.grouped_matmul``:
  ``jax.lax.ragged_dot`` on TPU, a tiled grouped matmul whose cost follows the routed rows on CPU and
  GPU; see :mod:`ngram_jax.layers.grouped_matmul`); with the tiled one, passes of a few tokens
  (decoding) run the dense combination instead when it is fewer rows (``model.moe.few_tokens_dense``);
- ``capacity``: fixed slots per expert, assignments beyond capacity dropped (static shapes).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from ngram_jax.config import ModelConfig, MoEConfig
from ngram_jax.layers.grouped_matmul import Grouping, num_tiles, resolve_impl
from ngram_jax.sharding import batch_axes_for, current_mesh, live_axes, logical_axes


class SelectionBias(nnx.Variable):
    """Per-expert bias added to router probabilities for top-k selection only; not a Param."""


class RoutingStats(nnx.Variable):
    """What the last forward pass routed: per-expert assignment counts and auxiliary losses."""


class RoutingSums(NamedTuple):
    """Per-layer routing totals over real (unmasked) tokens; summed over batch shards as they are."""

    counts: jax.Array  # int32 [E+Z] assignments per expert
    prob_sum: jax.Array  # f32 [E+Z] sum over tokens of the router probabilities
    lse_sq_sum: jax.Array  # f32 [] sum over tokens of logsumexp(logits)^2
    tokens: jax.Array  # f32 [] number of tokens
    mass_sum: jax.Array  # f32 [] sum over tokens of the routed weight mass sum_k w_k
    bias_changed: jax.Array  # f32 [] assignments the selection bias changed (in topk(p + b), not in topk(p))
    dropped: jax.Array  # f32 [] real-expert assignments dropped by capacity dispatch (0 when dropless)


_REPLICATED_SUMS = RoutingSums(*(P() for _ in RoutingSums._fields))  # shard_map out_specs: totals on every device
# the RoutingSums fields MoE.routing records, in order
ROUTING_TOTALS = ("tokens", "mass_sum", "bias_changed", "dropped")


def routing_diagnostics(counts: np.ndarray, totals: np.ndarray, num_experts: int, top_k: int) -> dict[str, float]:
    """What a routing did, from :class:`MoE` statistics summed over steps or batches and averaged over layers:
    ``counts`` [L, E+Z] assignments per expert, ``totals`` [L, 4] (:data:`ROUTING_TOTALS`).

    ``expert_load_max_over_mean`` (real experts), ``dropped_fraction`` (real-expert assignments dropped by
    capacity dispatch, over all assignments), ``routed_mass`` (mean sum of the routed weights per token),
    ``bias_changed_fraction`` (assignments not among the top-k of the router alone), ``zero_expert_fraction``."""
    counts, totals = np.asarray(counts, np.float64), np.asarray(totals, np.float64)
    real = counts[:, :num_experts]
    tok, mass, changed, dropped = (totals[:, i] for i in range(len(ROUTING_TOTALS)))
    slots = np.maximum(tok * top_k, 1.0)
    return {"expert_load_max_over_mean": float((real.max(1) / np.maximum(real.mean(1), 1e-9)).mean()),
            "dropped_fraction": float((dropped / slots).mean()),
            "routed_mass": float((mass / np.maximum(tok, 1.0)).mean()),
            "bias_changed_fraction": float((changed / slots).mean()),
            "zero_expert_fraction": float(1 - real.sum() / max(counts.sum(), 1.0))}


class Routing(NamedTuple):
    probs: jax.Array  # f32 [N, E+Z]
    logits: jax.Array  # f32 [N, E+Z]
    experts: jax.Array  # int32 [N, k]
    weights: jax.Array  # f32 [N, k]
    bias_changed: jax.Array  # bool [N, k]: the assignment is not among the top-k of p without the bias


def routed_scale(cfg: MoEConfig) -> float:
    """The factor on the routed weights: ``routed_scaling_factor``, times (E + Z) / top_k with ``routed_scale:
    num_experts`` (an unnormalised routed mass then starts at ``routed_scaling_factor`` at a uniform router)."""
    if cfg.routed_scale == "num_experts":
        return cfg.routed_scaling_factor * (cfg.num_experts + cfg.num_zero_experts) / cfg.top_k
    return cfg.routed_scaling_factor


def route(x: jax.Array, kernel: jax.Array, bias: jax.Array, top_k: int, scale: float,
          normalize: bool = False, bias_on: str = "probs") -> Routing:
    """x [N, D], kernel [D, E+Z], bias [E+Z] -> top-k experts and weights (float32 throughout); ``normalize``:
    the selected probabilities are renormalised to sum to 1 before ``scale``; ``bias_on``: the selection is
    ``topk(p + b)`` (``probs``) or ``topk(x W_r + b)`` (``logits``).

    The router matmul runs in float32 at ``Precision.HIGHEST`` on every backend: no bfloat16 passes
    on TPU, no TF32 on GPU, whatever ``jax_default_matmul_precision`` says (top-k is discontinuous:
    a rounding flip changes the selected expert)."""
    logits = jnp.matmul(x.astype(jnp.float32), kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs if bias_on == "probs" else logits
    _, experts = jax.lax.top_k(scores + jax.lax.stop_gradient(bias.astype(jnp.float32)), top_k)
    _, unbiased = jax.lax.top_k(jax.lax.stop_gradient(probs), top_k)
    changed = ~jnp.any(experts[:, :, None] == unbiased[:, None, :], axis=-1)  # [N, k]
    picked = jnp.take_along_axis(probs, experts, axis=-1)  # [N, k]
    if normalize:
        picked = picked / jnp.sum(picked, axis=-1, keepdims=True)
    return Routing(probs, logits, experts.astype(jnp.int32), picked * scale, changed)


def swiglu_experts(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Every expert on every row. x [N, D], gate/up [E, D, F], down [E, F, D] -> [N, E, D].

    A matmul batched over the experts reads each weight as stored; written ``nd,edf->nef`` (one matmul
    against [D, E*F]), XLA transposed every expert weight at every call: up to half of a decoding step."""
    xe = jnp.broadcast_to(x[None], (gate.shape[0], *x.shape))  # [E, N, D]
    h = jax.nn.silu(jnp.einsum("end,edf->enf", xe, gate)) * jnp.einsum("end,edf->enf", xe, up)
    return jnp.swapaxes(jnp.einsum("enf,efd->end", h, down), 0, 1)


def combine_dense(x, routing: Routing, gate, up, down) -> jax.Array:
    """Oracle: run all experts, pick the selected ones. [N, D]."""
    n_real = gate.shape[0]
    y_all = swiglu_experts(x, gate, up, down)  # [N, E, D]
    real = routing.experts < n_real
    picked = jnp.take_along_axis(y_all, jnp.where(real, routing.experts, 0)[..., None], axis=1)  # [N, k, D]
    contrib = jnp.where(real[..., None], picked, x[:, None, :])  # zero experts: identity
    return jnp.einsum("nk,nkd->nd", routing.weights.astype(x.dtype), contrib)


def dense_is_fewer_rows(tokens: int, top_k: int, num_experts: int, tile: int) -> bool:
    """Whether every expert on every token (``tokens * num_experts`` rows) is no more work than the tiled
    dropless layout, whose static bound is ``num_tiles(tokens * top_k, num_experts, tile) * tile`` rows.

    True for the passes of a few tokens that decoding runs: one token of top-2 of 8 experts is 8 dense rows
    against 2 tiles of 64, and a 5-token verification 40 rows against 8 tiles, each tile with its own gathered
    expert weights. False for training batches (8 x 128 tokens, 8 experts: 8,192 rows against 2,496)."""
    return tokens * num_experts <= num_tiles(tokens * top_k, num_experts, tile) * tile


def sort_assignments(experts: jax.Array, n_real: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flattened assignments sorted by expert, zero experts last.

    experts int [N, k] -> (order [N*k] indices into the flattened assignments,
    group_sizes int32 [E] rows per real expert, is_real bool [N*k] in sorted order).
    """
    flat = experts.reshape(-1)
    key = jnp.where(flat < n_real, flat, n_real)  # every zero expert sorts after the real ones
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=n_real + 1)[:n_real].astype(jnp.int32)
    return order, group_sizes, key[order] < n_real


def sorted_swiglu(xs: jax.Array, group_sizes: jax.Array, gate, up, down, *, impl: str = "auto",
                  tile: int = 64) -> jax.Array:
    """SwiGLU experts on rows sorted by expert. xs [M, D], group_sizes int [E] (rows past their sum are
    in no expert) -> [M, D], 0 for rows in no expert. ``impl``: ``auto | ragged_dot | tiled``."""
    g = Grouping(group_sizes, xs.shape[0], resolve_impl(impl), tile)
    h = g.enter(xs)  # the rows in the layout of the implementation (tiled: [T, tile, D])
    return g.leave(g.matmul(jax.nn.silu(g.matmul(h, gate)) * g.matmul(h, up), down))


def combine_dropless(x, routing: Routing, gate, up, down, mask: jax.Array | None = None, *,
                     impl: str = "auto", tile: int = 64) -> jax.Array:
    """Sorted grouped matmuls; nothing is dropped; tokens where ``mask`` [N] is False (padding) are
    given to no real expert (their output is not meaningful). [N, D]."""
    n, k = routing.experts.shape
    n_real = gate.shape[0]
    order, group_sizes, _ = sort_assignments(_unmasked(routing.experts, mask, n_real), n_real)
    xs = x[order // k]  # [N*k, D] sorted by expert; zero experts and padding last
    ys = sorted_swiglu(xs, group_sizes, gate, up, down, impl=impl, tile=tile)  # [N*k, D]
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # [N, k, D] in assignment order
    real = routing.experts < n_real
    contrib = jnp.where(real[..., None], y, x[:, None, :])  # zero experts: identity
    return jnp.einsum("nk,nkd->nd", routing.weights.astype(x.dtype), contrib)


def capacity_slots(experts: jax.Array, n_real: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Slot of each assignment inside its expert's buffer, in token order.

    experts int [N, k] -> (slot int32 [N, k], kept bool [N, k]); zero experts are never kept
    (they need no buffer), real assignments past ``capacity`` are dropped.
    """
    real = experts < n_real
    onehot = jax.nn.one_hot(jnp.where(real, experts, n_real), n_real + 1, dtype=jnp.int32)[..., :n_real]
    flat = onehot.reshape(-1, n_real)  # [N*k, E] in (token, choice) order
    position = (jnp.cumsum(flat, axis=0) - 1) * flat
    slot = position.sum(-1).reshape(experts.shape)
    return slot.astype(jnp.int32), real & (slot < capacity)


def combine_capacity(x, routing: Routing, gate, up, down, capacity: int, mask: jax.Array | None = None) -> jax.Array:
    """Fixed buffers [E, C, D]; overflowing assignments contribute nothing; tokens where ``mask`` [N]
    is False (padding) take no slot. [N, D]."""
    n, k = routing.experts.shape
    n_real = gate.shape[0]
    slot, kept = capacity_slots(_unmasked(routing.experts, mask, n_real), n_real, capacity)
    e = jnp.where(kept, routing.experts, n_real)  # dropped -> an out-of-range expert row
    s = jnp.where(kept, slot, 0)
    buf = jnp.zeros((n_real, capacity, x.shape[-1]), x.dtype)
    buf = buf.at[e, s].set(jnp.broadcast_to(x[:, None, :], (n, k, x.shape[-1])), mode="drop")
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, gate)) * jnp.einsum("ecd,edf->ecf", buf, up)
    out = jnp.einsum("ecf,efd->ecd", h, down)  # [E, C, D]
    y = out.at[e, s].get(mode="fill", fill_value=0)  # [N, k, D]
    real = routing.experts < n_real
    contrib = jnp.where(real[..., None], y, x[:, None, :])
    return jnp.einsum("nk,nkd->nd", routing.weights.astype(x.dtype), contrib)


def _unmasked(experts: jax.Array, mask: jax.Array | None, no_expert: int) -> jax.Array:
    """``experts`` [N, k] with the rows of masked-out tokens replaced by ``no_expert``."""
    return experts if mask is None else jnp.where(mask[:, None], experts, no_expert)


def grouped_swiglu(xs: jax.Array, groups: jax.Array, gate, up, down, *, impl: str = "auto",
                   tile: int = 64) -> jax.Array:
    """Rows [M, D] with expert ids [M] (``>= E``: no expert, output 0) -> [M, D]: sorted, then
    :func:`sorted_swiglu`."""
    order, sizes, _ = sort_assignments(groups[:, None], gate.shape[0])
    ys = sorted_swiglu(xs[order], sizes, gate, up, down, impl=impl, tile=tile)
    return jnp.zeros_like(ys).at[order].set(ys)


def combine_expert_parallel(x, routing: Routing, gate, up, down, *, axis: str, capacity: int,
                            mlp_axes: tuple[str, ...], mask: jax.Array | None = None, impl: str = "auto",
                            tile: int = 64) -> jax.Array:
    """Inside ``shard_map``: experts split over mesh ``axis`` (this device holds E_loc of them).

    Each real assignment is sent to the device owning its expert with ``all_to_all`` (fixed
    ``capacity`` slots per destination; dropless when capacity = tokens * top_k), computed there
    with grouped matmuls, and sent back; zero experts stay local. x [n, D] -> [n, D].
    """
    n, k = routing.experts.shape
    ep = jax.lax.axis_size(axis)
    e_loc = gate.shape[0]
    n_real = e_loc * ep
    real = routing.experts < n_real
    dest = jnp.where(real, routing.experts // e_loc, ep)  # [n, k]; ep = "stays here"
    dest = _unmasked(dest, mask, ep)
    slot, kept = capacity_slots(dest, ep, capacity)  # per-destination slots
    d_idx, s_idx = jnp.where(kept, dest, ep), jnp.where(kept, slot, 0)
    send_x = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[d_idx, s_idx].set(
        jnp.broadcast_to(x[:, None, :], (n, k, x.shape[-1])), mode="drop")
    send_e = jnp.full((ep, capacity), e_loc, jnp.int32).at[d_idx, s_idx].set(
        routing.experts % e_loc, mode="drop")  # local expert id at the destination; e_loc = empty
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True)  # [ep, C, D]: row j came from device j
    recv_e = jax.lax.all_to_all(send_e, axis, 0, 0, tiled=True)
    y = grouped_swiglu(recv_x.reshape(-1, x.shape[-1]), recv_e.reshape(-1), gate, up, down, impl=impl, tile=tile)
    if mlp_axes:  # expert_mlp split over e.g. tensor: partial sums
        y = jax.lax.psum(y, mlp_axes)
    back = jax.lax.all_to_all(y.reshape(ep, capacity, -1), axis, 0, 0, tiled=True)  # [ep, C, D]
    got = back.at[d_idx, s_idx].get(mode="fill", fill_value=0)  # [n, k, D]
    contrib = jnp.where(real[..., None], got, x[:, None, :])
    return jnp.einsum("nk,nkd->nd", routing.weights.astype(x.dtype), contrib)


def routing_sums(routing: Routing, mask: jax.Array | None = None, dropped: jax.Array | None = None) -> RoutingSums:
    """Totals of one routing over the tokens where ``mask`` [N] is True (all when None); ``dropped`` bool [N, k]
    marks the assignments dispatch dropped (:func:`dropped_assignments`; None: dropless)."""
    n, k = routing.experts.shape
    m = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    n_all = routing.probs.shape[-1]
    counts = jnp.bincount(routing.experts.reshape(-1), weights=jnp.repeat(m, k), length=n_all)
    lse = jax.nn.logsumexp(routing.logits, axis=-1)
    mass = jax.lax.stop_gradient(jnp.sum(routing.weights, axis=-1))  # [N]
    changed = jnp.sum(routing.bias_changed.astype(jnp.float32), axis=-1)  # [N]
    lost = jnp.zeros((n,), jnp.float32) if dropped is None else jnp.sum(dropped.astype(jnp.float32), axis=-1)
    return RoutingSums(counts.astype(jnp.int32), jnp.einsum("n,ne->e", m, routing.probs),
                       jnp.sum(m * lse**2), jnp.sum(m), jnp.sum(m * mass), jnp.sum(m * changed), jnp.sum(m * lost))


def dropped_assignments(experts: jax.Array, dest: jax.Array, n_dest: int, capacity: int,
                        mask: jax.Array | None = None) -> jax.Array:
    """bool [N, k]: the real-expert assignments of real tokens that capacity dispatch drops. ``dest`` [N, k] is
    the buffer each goes to (its expert, or its device in expert parallelism; ``>= n_dest``: none, e.g. a
    zero expert), each of the ``n_dest`` buffers holding ``capacity`` slots in token order."""
    dest = _unmasked(dest, mask, n_dest)
    _, kept = capacity_slots(dest, n_dest, capacity)
    return (dest < n_dest) & ~kept


def load_balance_loss_from_sums(sums: RoutingSums) -> jax.Array:
    """Switch loss ``(E+Z) * sum_i f_i * P_i`` (f: fraction of assignments, P: mean probability)."""
    n_all = sums.counts.shape[-1]
    f = sums.counts.astype(jnp.float32) / jnp.maximum(jnp.sum(sums.counts), 1).astype(jnp.float32)
    p = sums.prob_sum / jnp.maximum(sums.tokens, 1.0)
    return n_all * jnp.sum(jax.lax.stop_gradient(f) * p)


def router_z_loss_from_sums(sums: RoutingSums) -> jax.Array:
    return sums.lse_sq_sum / jnp.maximum(sums.tokens, 1.0)


def load_balance_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    """Switch loss over all E+Z experts and the tokens where ``mask`` is True."""
    return load_balance_loss_from_sums(routing_sums(routing, mask))


def router_z_loss(routing: Routing, mask: jax.Array | None = None) -> jax.Array:
    return router_z_loss_from_sums(routing_sums(routing, mask))


class MoE(nnx.Module):
    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> MoE:
        return cls(m.moe, m.d_model, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __init__(self, cfg: MoEConfig, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 init_std: float = 0.02, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        e, z, f = cfg.num_experts, cfg.num_zero_experts, cfg.expert_dim
        normal = nnx.initializers.normal(init_std)
        # the experts: normal(init_std), or as the dense FFN (lecun-normal, std 1/sqrt(fan_in)) with expert_init=lecun
        w_init = normal if cfg.expert_init == "normal" else nnx.initializers.lecun_normal(batch_axis=(0,))
        self.router = nnx.Param(normal(rngs.params(), (d_model, e + z), jnp.float32),
                                **logical_axes(("embed", "router")))  # [D, E+Z], kept in float32
        self.gate = nnx.Param(w_init(rngs.params(), (e, d_model, f), param_dtype),
                              **logical_axes(("expert", "embed", "expert_mlp")))  # [E, D, F]
        self.up = nnx.Param(w_init(rngs.params(), (e, d_model, f), param_dtype),
                            **logical_axes(("expert", "embed", "expert_mlp")))  # [E, D, F]
        self.down = nnx.Param(w_init(rngs.params(), (e, f, d_model), param_dtype),
                              **logical_axes(("expert", "expert_mlp", "embed")))  # [E, F, D]
        self.bias = SelectionBias(jnp.zeros((e + z,), jnp.float32))
        self.counts = RoutingStats(jnp.zeros((e + z,), jnp.int32))
        self.aux_loss = RoutingStats(jnp.zeros((), jnp.float32))
        # f32 [4]: tokens, routed weight mass, bias-changed and dropped assignments (ROUTING_TOTALS), summed
        # over the real tokens of the last forward pass
        self.routing = RoutingStats(jnp.zeros((len(ROUTING_TOTALS),), jnp.float32))

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
        """x [B, S, D] -> [B, S, D]; records per-expert counts and the weighted auxiliary loss.

        ``token_mask`` bool [B, S] (e.g. ``segment_ids != 0``) marks the real tokens: padding counts
        in no expert load and no auxiliary loss, and takes no capacity slot. Inside a mesh context
        whose rules split the ``expert`` logical axis, experts run expert-parallel (``all_to_all``
        inside ``shard_map``); otherwise by ``cfg.dispatch``.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).astype(self.dtype)  # [N, D]
        mask = jnp.ones(flat.shape[:1], bool) if token_mask is None else jnp.asarray(token_mask).reshape(-1) != 0
        experts = (p[...].astype(self.dtype) for p in (self.gate, self.up, self.down))
        params = (self.router[...], self.bias[...], *experts)
        mesh = current_mesh()
        ep_axes = live_axes(mesh, "expert") if mesh is not None else ()
        if ep_axes:
            y, sums = self._expert_parallel(flat, mask, params, mesh, ep_axes, shape[0])
        elif mesh is not None and self._kernel_dispatch():
            y, sums = self._per_batch_shard(flat, mask, params, mesh, shape[0])
        else:
            y, sums = self._local(flat, mask, *params)
        self.counts[...] = sums.counts
        self.aux_loss[...] = self._aux_loss(sums)
        self.routing[...] = jnp.stack([getattr(sums, k) for k in ROUTING_TOTALS])
        return y.reshape(shape)

    def _aux_loss(self, sums: RoutingSums) -> jax.Array:
        c = self.cfg
        aux = jnp.zeros((), jnp.float32)
        if c.load_balance_loss_weight:
            aux = aux + c.load_balance_loss_weight * load_balance_loss_from_sums(sums)
        if c.router_z_loss_weight:
            aux = aux + c.router_z_loss_weight * router_z_loss_from_sums(sums)
        return aux

    def _local(self, flat, mask, router, bias, gate, up, down):
        c = self.cfg
        routing = route(flat, router, bias, c.top_k, routed_scale(c), c.normalize_topk, c.bias_on)
        dropped = None
        if c.dispatch == "dense":
            y = combine_dense(flat, routing, gate, up, down)
        elif c.dispatch == "capacity":
            capacity = self.capacity(flat.shape[0])
            y = combine_capacity(flat, routing, gate, up, down, capacity, mask)
            dropped = dropped_assignments(routing.experts, routing.experts, c.num_experts, capacity, mask)
        elif c.few_tokens_dense and resolve_impl(c.grouped_matmul) == "tiled" and dense_is_fewer_rows(
                flat.shape[0], c.top_k, c.num_experts, c.grouped_matmul_tile):
            y = combine_dense(flat, routing, gate, up, down)  # dropless too: nothing is ever dropped
        else:
            y = combine_dropless(flat, routing, gate, up, down, mask, impl=c.grouped_matmul,
                                 tile=c.grouped_matmul_tile)
        return y, routing_sums(routing, mask, dropped)

    def _kernel_dispatch(self) -> bool:
        """Whether :meth:`_local` runs a Pallas kernel (megablox), which must run inside ``shard_map``."""
        c = self.cfg
        return c.dispatch == "dropless" and resolve_impl(c.grouped_matmul) == "megablox"

    def _per_batch_shard(self, flat, mask, params, mesh, batch: int):
        """:meth:`_local` on each device's batch shard inside ``shard_map`` (a Mosaic kernel cannot be partitioned
        by the compiler), with every expert's weights on each device (gathered over the axes that split them,
        as the compiler would for the matmuls); routing totals summed over the batch shards."""
        batch_axes = batch_axes_for(mesh, live_axes(mesh, "batch"), batch)  # a few sequences: on every device
        n_batch = math.prod(mesh.shape[a] for a in batch_axes)
        if flat.shape[0] % n_batch:
            from ngram_jax.config import ConfigError

            raise ConfigError(f"{flat.shape[0]} tokens cannot be split over the {n_batch} batch shards")

        def local(x, m, *p):
            y, sums = self._local(x, m, *p)
            return y, RoutingSums(*(jax.lax.psum(v, batch_axes) for v in sums)) if batch_axes else sums

        b = batch_axes or None
        return jax.shard_map(local, mesh=mesh, check_vma=False,
                             in_specs=(P(b, None), P(b), *(P() for _ in params)),
                             out_specs=(P(b, None), _REPLICATED_SUMS))(flat, mask, *params)

    def _expert_parallel(self, flat, mask, params, mesh, ep_axes: tuple[str, ...], batch: int):
        from ngram_jax.config import ConfigError

        c = self.cfg
        if len(ep_axes) != 1:
            raise ConfigError(f"expert parallelism over one mesh axis only; mesh.rules.expert gives {ep_axes}")
        axis = ep_axes[0]
        ep = mesh.shape[axis]
        if c.num_experts % ep:
            raise ConfigError(f"model.moe.num_experts={c.num_experts} is not divisible by the {ep} devices of "
                              f"mesh axis {axis!r}")
        batch_axes = batch_axes_for(mesh, live_axes(mesh, "batch"), batch)  # a few sequences: on every device
        mlp_axes = live_axes(mesh, "expert_mlp")
        n_batch = math.prod(mesh.shape[a] for a in batch_axes)
        if flat.shape[0] % n_batch:
            raise ConfigError(f"{flat.shape[0]} tokens cannot be split over the {n_batch} batch shards")
        n_local = flat.shape[0] // n_batch
        n_experts, e_loc = c.num_experts, c.num_experts // ep
        capacity = n_local * c.top_k  # dropless: every assignment could go to one device
        if c.dispatch == "capacity":
            capacity = max(1, math.ceil(c.capacity_factor * n_local * c.top_k / ep))

        def local(x, m, router, bias, gate, up, down):
            routing = route(x, router, bias, c.top_k, routed_scale(c), c.normalize_topk, c.bias_on)
            y = combine_expert_parallel(x, routing, gate, up, down, axis=axis, capacity=capacity,
                                        mlp_axes=mlp_axes, mask=m, impl=c.grouped_matmul,
                                        tile=c.grouped_matmul_tile)
            real = routing.experts < n_experts
            dropped = dropped_assignments(routing.experts, jnp.where(real, routing.experts // e_loc, ep), ep,
                                          capacity, m)
            sums = routing_sums(routing, m, dropped)
            if batch_axes:  # exact totals over the global batch
                sums = RoutingSums(*(jax.lax.psum(v, batch_axes) for v in sums))
            return y, sums

        b = batch_axes or None
        mlp = mlp_axes or None
        w_spec = P(axis, None, mlp)
        return jax.shard_map(local, mesh=mesh, check_vma=False,
                             in_specs=(P(b, None), P(b), P(), P(), w_spec, w_spec, P(axis, mlp, None)),
                             out_specs=(P(b, None), _REPLICATED_SUMS))(flat, mask, *params)

    def capacity(self, tokens: int) -> int:
        c = self.cfg
        return max(1, math.ceil(c.capacity_factor * tokens * c.top_k / max(c.num_experts, 1)))


def real_experts_per_token(cfg: MoEConfig) -> float:
    """K_e: the configured expected number of real experts per token (default: all of top_k)."""
    return float(cfg.top_k if cfg.real_experts_per_token is None else cfg.real_experts_per_token)


def balance_targets(num_experts: int, num_zero_experts: int, top_k: int, real_per_token: float) -> np.ndarray:
    """Target share of the routed slots per expert, float32 [E+Z] summing to 1:
    ``K_e / (K * E)`` for each real expert, ``(K - K_e) / (K * Z)`` for each zero expert."""
    e, z, k = num_experts, num_zero_experts, top_k
    real = np.full(e, real_per_token / (k * e))
    zero = np.full(z, (k - real_per_token) / (k * z) if z else 0.0)
    return np.concatenate([real, zero]).astype(np.float32)


def bias_update(bias: jax.Array, counts: jax.Array, rate: float, rule: str,
                targets: jax.Array | np.ndarray | None = None) -> jax.Array:
    """Aux-loss-free balancing: ``Δb_i = rate * sign(g_i)`` (``sign``) or ``rate * g_i`` (``proportional``)
    with the gap ``g_i = targets_i - T_i / (K * T_all)`` (``counts`` = T_i, whose sum is K * T_all).

    ``targets`` (see :func:`balance_targets`) default to equal shares. A step without tokens (all
    padding) leaves the bias unchanged.
    """
    load = counts.astype(jnp.float32)
    total = load.sum()
    if targets is None:
        targets = jnp.full(load.shape, 1.0 / load.shape[-1], jnp.float32)
    gap = jnp.where(total > 0, jnp.asarray(targets, jnp.float32) - load / jnp.maximum(total, 1.0), 0.0)
    if rule == "sign":
        return bias + rate * jnp.sign(gap)
    if rule == "proportional":
        return bias + rate * gap
    raise ValueError(f"unknown bias update rule {rule!r}; use 'sign' or 'proportional'")


def bias_step(cfg: MoEConfig) -> float:
    """μ of :func:`bias_update`: ``bias_update_rate``, or that rate times the mean router probability
    1 / (E + Z) with ``bias_update_units: mean_probability``."""
    if cfg.bias_update_units == "mean_probability":
        return cfg.bias_update_rate / (cfg.num_experts + cfg.num_zero_experts)
    return cfg.bias_update_rate


def update_selection_bias(model: nnx.Module) -> None:
    """Apply :func:`bias_update` to every MoE layer of ``model`` from its last recorded counts,
    toward the targets of ``model.moe.real_experts_per_token`` (see the module docstring)."""
    for _, module in nnx.iter_modules(model):
        if isinstance(module, MoE):
            c = module.cfg
            targets = balance_targets(c.num_experts, c.num_zero_experts, c.top_k, real_experts_per_token(c))
            module.bias[...] = bias_update(module.bias[...], module.counts[...], bias_step(c),
                                           c.bias_update_rule, targets)


def numpy_route(x, kernel, bias, top_k, scale, normalize=False, bias_on="probs"):
    """numpy reference of :func:`route` (ties broken toward the lower index, as ``lax.top_k``)."""
    logits = np.asarray(x, np.float64) @ np.asarray(kernel, np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    scores = p if bias_on == "probs" else logits
    experts = np.argsort(-(scores + np.asarray(bias)), axis=-1, kind="stable")[:, :top_k]
    picked = np.take_along_axis(p, experts, -1)
    if normalize:
        picked = picked / picked.sum(-1, keepdims=True)
    return experts, picked * scale
