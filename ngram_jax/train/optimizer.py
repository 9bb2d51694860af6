"""AdamW with warmup + cosine decay and parameter groups.

Groups: ``tables`` (the N-gram, token and per-layer embedding tables: their own learning-rate
multiplier and weight decay, default none), ``decay`` (every other parameter of 2+ dimensions) and
``no_decay`` (norm scales and other vectors). Gradients are clipped by their global norm first.
"""

from __future__ import annotations

import jax
import optax

from ngram_jax.config import TrainConfig

TABLE_NAMES = ("ngram_table", "embedding")


def schedule(t: TrainConfig, multiplier: float = 1.0) -> optax.Schedule:
    peak = t.lr * multiplier
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1),
                                              end_value=peak * t.min_lr_ratio)


def _is_table(path) -> bool:
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    return any(n in TABLE_NAMES for n in names[-2:])


def param_labels(params) -> object:
    """A pytree of group names matching ``params`` (an nnx.State of Params or its pure dict)."""

    def label(path, leaf) -> str:
        if _is_table(path):
            return "tables"
        return "decay" if getattr(leaf, "ndim", 0) >= 2 else "no_decay"

    return jax.tree_util.tree_map_with_path(label, params)


def _mask(group: str):
    return lambda params: jax.tree.map(lambda label: label == group, param_labels(params))


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """One Adam over every parameter, then per-group decoupled weight decay and learning rate:
    equivalent to an AdamW per group, with stateless masks only (no per-group optimizer state)."""
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.scale_by_adam(b1=t.b1, b2=t.b2, eps=t.eps),
        optax.add_decayed_weights(t.weight_decay, mask=_mask("decay")),
        optax.add_decayed_weights(t.ngram_weight_decay, mask=_mask("tables")),
        optax.masked(optax.scale(t.ngram_lr_multiplier), _mask("tables")),
        optax.scale_by_learning_rate(schedule(t)),
    )
