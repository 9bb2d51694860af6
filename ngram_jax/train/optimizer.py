"""AdamW with warmup + cosine decay and parameter groups, and row-wise optimizers for N-gram tables.

Groups (found by parameter type, :mod:`ngram_jax.ngram.lookup`): ``tables`` (every :class:`Table`:
token, N-gram and per-layer embedding tables; their own learning-rate multiplier and weight decay,
default none), ``decay`` (every other parameter of 2+ dimensions) and ``no_decay`` (norm scales and
other vectors). Gradients are clipped by their global norm first.

``train.table_optimizer`` chooses how the N-gram tables (:class:`NgramTable`) learn:

- ``dense``: the AdamW above over the full table gradient (the control; its cost grows with the table).
- ``rowwise_adagrad``: one accumulator per row, ``acc_r += mean_j(g_rj^2)``,
  ``w_r -= lr * (g_r / (sqrt(acc_r) + eps) + wd * w_r)``.
- ``lazy_adam``: Adam moments updated only for the rows a batch read, with the global step's bias
  correction, ``w_r -= lr * (m_hat_r / (sqrt(v_hat_r) + eps) + wd * w_r)``.

In both row-wise modes ``lr`` is the schedule times ``train.ngram_lr_multiplier``, ``wd`` is
``train.ngram_weight_decay`` (applied to the rows read, as the update is lazy), ``g_r`` is the sum of
the row's gradients over the batch (duplicates summed first), and the gradient clipping uses the global
norm of the dense gradients together with these summed row gradients (the norm of the full gradient).
Rows no token read are left bit-identical.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ngram_jax.config import TrainConfig
from ngram_jax.ngram.lookup import HashedTables, NgramTable, hashed_tables, table_paths
from ngram_jax.ngram.row_sharded import row_sharded_update
from ngram_jax.sharding import logical_axes


def schedule(t: TrainConfig, multiplier: float = 1.0) -> optax.Schedule:
    peak = t.lr * multiplier
    if t.schedule == "constant":
        return optax.warmup_constant_schedule(0.0, peak, max(t.warmup_steps, 1))
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
                                              end_value=peak * t.min_lr_ratio)


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def param_labels(params, tables: frozenset[tuple[str, ...]]) -> object:
    """A pytree of group names matching ``params`` (an nnx.State of Params or its pure dict)."""

    def label(path, leaf) -> str:
        names = _names(path)
        if any(names[: len(t)] == t for t in tables):
            return "tables"
        return "decay" if getattr(leaf, "ndim", 0) >= 2 else "no_decay"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(t: TrainConfig, tables: frozenset[tuple[str, ...]], clip: bool = True
                   ) -> optax.GradientTransformation:
    """One Adam over every parameter, then per-group decoupled weight decay and learning rate:
    equivalent to an AdamW per group, with stateless masks only (no per-group optimizer state)."""

    def mask(group: str):
        return lambda params: jax.tree.map(lambda label: label == group, param_labels(params, tables))

    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip) if clip else optax.identity(),
        optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
        optax.add_decayed_weights(t.weight_decay, mask=mask("decay")),
        optax.add_decayed_weights(t.ngram_weight_decay, mask=mask("tables")),
        optax.masked(optax.scale(t.ngram_lr_multiplier), mask("tables")),
        optax.scale_by_learning_rate(schedule(t)),
    )


# ----------------------------------------------------------------------------------------------
# Row-wise optimizers


class RowState(nnx.Variable):
    """Optimizer state of N-gram table rows, sharded like the table's rows."""


def dedupe_rows(ids: jax.Array, grads: jax.Array, num_rows: int) -> tuple[jax.Array, jax.Array]:
    """Sum the gradients of duplicate rows. ids int [n] (local rows; outside [0, num_rows) = not ours),
    grads [n, W] -> (unique rows [n], padded with ``num_rows``; summed gradients [n, W])."""
    n = ids.shape[0]
    ids = jnp.where((ids >= 0) & (ids < num_rows), ids, num_rows)
    uniq, inverse = jnp.unique(ids, size=n, fill_value=num_rows, return_inverse=True)
    summed = jax.ops.segment_sum(grads, inverse.reshape(-1), num_segments=n)
    return uniq, jnp.where((uniq < num_rows)[:, None], summed, 0)


class RowwiseTableOptimizer(nnx.Module):
    """The row-wise optimizer state of one N-gram table and its sparse update."""

    def __init__(self, lookup: HashedTables, t: TrainConfig):
        self.kind, self.t = t.table_optimizer, t
        rows, width = lookup.ngram_table.shape
        if self.kind == "rowwise_adagrad":
            self.acc = RowState(jnp.zeros((rows,), jnp.float32), **logical_axes(("ngram_rows",)))
        elif self.kind == "lazy_adam":
            self.mu = RowState(jnp.zeros((rows, width), jnp.float32), **logical_axes(("ngram_rows", "ngram_dim")))
            self.nu = RowState(jnp.zeros((rows, width), jnp.float32), **logical_axes(("ngram_rows", "ngram_dim")))
        else:
            raise ValueError(f"train.table_optimizer={self.kind!r} is not a row-wise optimizer")

    def _state(self) -> tuple[jax.Array, ...]:
        return (self.acc[...],) if self.kind == "rowwise_adagrad" else (self.mu[...], self.nu[...])

    def sq_norm(self, lookup: HashedTables, rows: jax.Array, grads: jax.Array) -> jax.Array:
        """Squared norm of the table's (duplicate-summed) gradient. rows [B, S, T], grads [B, S, T, W]."""

        def local(arrays, start, args, _):
            (tab,), (ids, g) = arrays, args
            _, summed = dedupe_rows(ids.reshape(-1) - start, g.reshape(-1, g.shape[-1]), tab.shape[0])
            return (tab,), (jnp.sum(jnp.square(summed.astype(jnp.float32))),)

        _, (sq,) = row_sharded_update(local, (lookup.ngram_table[...],), (rows, grads))
        return sq

    def update(self, lookup: HashedTables, rows: jax.Array, grads: jax.Array, step: jax.Array,
               grad_scale: jax.Array) -> None:
        """Apply one update to the rows read. step: the optimizer step before this update (0-based)."""
        t, kind = self.t, self.kind
        lr = schedule(t, t.ngram_lr_multiplier)(step)

        def local(arrays, start, args, scalars):
            tab, *state = arrays
            ids, g = args
            lr_, scale, count = scalars
            uniq, summed = dedupe_rows(ids.reshape(-1) - start, g.reshape(-1, g.shape[-1]), tab.shape[0])
            summed = summed.astype(jnp.float32) * scale
            w = tab.at[uniq].get(mode="fill", fill_value=0).astype(jnp.float32)
            if kind == "rowwise_adagrad":
                (acc,) = state
                a = acc.at[uniq].get(mode="fill", fill_value=0) + jnp.mean(jnp.square(summed), axis=-1)
                upd = summed / (jnp.sqrt(a)[:, None] + t.eps)
                new_state = (acc.at[uniq].set(a, mode="drop"),)
            else:
                mu, nu = state
                m = t.b1 * mu.at[uniq].get(mode="fill", fill_value=0) + (1 - t.b1) * summed
                v = t.b2 * nu.at[uniq].get(mode="fill", fill_value=0) + (1 - t.b2) * jnp.square(summed)
                m_hat, v_hat = m / (1 - t.b1 ** count), v / (1 - t.b2 ** count)
                upd = m_hat / (jnp.sqrt(v_hat) + t.eps)
                new_state = (mu.at[uniq].set(m, mode="drop"), nu.at[uniq].set(v, mode="drop"))
            new_w = (w - lr_ * (upd + t.ngram_weight_decay * w)).astype(tab.dtype)
            return (tab.at[uniq].set(new_w, mode="drop"), *new_state), ()

        count = (step + 1).astype(jnp.float32)
        new, _ = row_sharded_update(local, (lookup.ngram_table[...], *self._state()), (rows, grads),
                                    (jnp.asarray(lr, jnp.float32), jnp.asarray(grad_scale, jnp.float32), count))
        lookup.ngram_table[...] = new[0]
        if kind == "rowwise_adagrad":
            self.acc[...] = new[1]
        else:
            self.mu[...], self.nu[...] = new[1], new[2]


class Optimizer(nnx.Module):
    """The training optimizer: optax AdamW over the dense parameters (and, with
    ``table_optimizer: dense``, the N-gram tables), row-wise optimizers for the N-gram tables otherwise.
    ``train.freeze_target``: AdamW over the draft head's parameters only (``wrt``), nothing else moves."""

    def __init__(self, model: nnx.Module, t: TrainConfig):
        self.freeze_target = t.freeze_target  # only the draft head's parameters train (dense AdamW)
        self.sparse = t.table_optimizer != "dense" and not t.freeze_target
        if t.freeze_target:
            self.wrt = nnx.All(nnx.Param, nnx.PathContains("draft_head"))
        else:
            self.wrt = nnx.All(nnx.Param, nnx.Not(NgramTable)) if self.sparse else nnx.Param
        self.dense = nnx.Optimizer(model, make_optimizer(t, table_paths(model), clip=not self.sparse),
                                   wrt=self.wrt)
        self.grad_clip = t.grad_clip
        self.tables = nnx.Dict({k: RowwiseTableOptimizer(m, t) for k, m in hashed_tables(model)}) \
            if self.sparse else None

    @property
    def step(self) -> nnx.Variable:
        return self.dense.step
