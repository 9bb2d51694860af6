"""The one next-token loss, used by training (:func:`loss_fn`) and evaluation (:func:`eval_step`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``logsumexp(logits) - logits[target]`` per position: logits float [..., V], targets int [...] -> [...].

    The same values as ``optax.softmax_cross_entropy_with_integer_labels``; the backward pass is
    written out (``softmax - onehot``, one exp over the logits) instead of differentiating
    log-softmax, which XLA:CPU ran about 25% slower for the head + loss of the tiny models."""
    return _lse(logits) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def _lse(logits: jax.Array) -> jax.Array:
    return jax.nn.logsumexp(logits, axis=-1)


def _ce_fwd(logits, targets):
    lse = _lse(logits)
    return lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0], (logits, lse, targets)


def _ce_bwd(res, g):
    logits, lse, targets = res
    p = jnp.exp(logits - lse[..., None])
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=p.dtype)
    return (p - onehot) * g[..., None], None


softmax_cross_entropy.defvjp(_ce_fwd, _ce_bwd)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masked next-token cross-entropy: ``(sum over scored targets, number of scored targets)``.

    logits float [B, S, V], targets int [B, S], mask [B, S] (1 where a target is scored: not padding,
    not a repeated context token)."""
    mask = mask.astype(jnp.float32)
    ce = softmax_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(ce * mask), jnp.sum(mask)


def mean_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of :func:`cross_entropy` over the scored targets (0 when there are none)."""
    total, count = cross_entropy(logits, targets, mask)
    return total / jnp.maximum(count, 1.0)


def forward(model, batch: dict) -> jax.Array:
    return model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])


def loss_fn(model, batch: dict, draft_head_weight: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """The training objective ``(mean cross-entropy + MoE auxiliary losses [+ weighted draft-head
    cross-entropy], mean cross-entropy)``. The draft head's loss: next token (``ngram``) or the token
    after it (``mtp``: the head reads the target's last hidden state at t and input embedding of t+1,
    both from this forward pass, and predicts token t+2; scored where t+2 is a scored target of t+1's
    document)."""
    kind = model.config.draft_head if draft_head_weight > 0 else "none"
    if kind == "mtp":
        emb, ple = model.inputs(batch["inputs"], segment_ids=batch["segment_ids"])  # [B, S, D]
        logits, hidden = model.trunk(emb, batch["positions"], batch["segment_ids"], ple, return_hidden=True)
    else:
        logits = forward(model, batch)
    loss = mean_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    total = loss + model.aux_loss()
    if kind == "ngram":
        draft = model.draft_logits(batch["inputs"], segment_ids=batch["segment_ids"])
        total = total + draft_head_weight * mean_cross_entropy(draft, batch["targets"], batch["loss_mask"])
    elif kind == "mtp":
        seg = batch["segment_ids"]
        draft = model.mtp_training_logits(hidden, emb, batch["positions"], seg)  # [B, S-1, V]
        mask = batch["loss_mask"][:, 1:] * (seg[:, :-1] == seg[:, 1:])
        total = total + draft_head_weight * mean_cross_entropy(draft, batch["targets"][:, 1:], mask)
    return total, loss


def eval_step(model, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(sum of cross-entropy, number of scored targets)`` of a batch (sum over batches, then divide)."""
    return cross_entropy(forward(model, batch), batch["targets"], batch["loss_mask"])
