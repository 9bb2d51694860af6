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


def linear_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, mask: jax.Array,
                         chunks: int = 1) -> tuple[jax.Array, jax.Array]:
    """:func:`cross_entropy` of the logits ``x @ w`` without keeping them: ``(sum over scored targets,
    number of scored targets)``.

    x [B, S, D] (the normalised last hidden state, in the compute dtype), w [D, V], targets int [B, S],
    mask [B, S]. The sequence is cut into ``chunks`` pieces (padded with unscored positions), and the logits
    of one piece at a time are computed, [B, S/chunks, V] float32 from operands in x's dtype (as
    ``Model.output``). Under differentiation the forward pass also forms each piece's input and weight
    gradients (the loss is a scalar: the backward only scales them), so no [B, S, V] array is kept and the
    logits are computed once; the weight gradient is accumulated piece by piece. On XLA:CPU, 8 pieces ran
    the study model's training step 1.79x faster than logits + :func:`cross_entropy`
    (``benchmarks/loss_head.py``, docs/BENCHMARKS.md): the unchunked backward wrote the [B*S, V] logit
    gradient a second time, transposed, for the weight gradient; forming the gradients in the forward pass
    took the head + loss from 69 to 54 ms (8x128 tokens, V 4096)."""
    mask = mask.astype(jnp.float32)
    b, s = targets.shape
    size = -(-s // chunks)
    pad = size * chunks - s
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
        targets, mask = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))

    def pieces(a):  # [B, S, ...] -> [chunks, B, S/chunks, ...]
        return jnp.moveaxis(a.reshape(b, chunks, size, *a.shape[2:]), 1, 0)

    total = _linear_ce(pieces(x), w.astype(x.dtype), pieces(targets), pieces(mask))
    return total, jnp.sum(mask)


def _piece_logits(x, w):
    return jnp.matmul(x, w, preferred_element_type=jnp.float32)  # [B, c, V]


@jax.custom_vjp
def _linear_ce(x, w, targets, mask):
    """Sum of the masked cross-entropy of every piece (x [n, B, c, D], w [D, V], targets, mask [n, B, c])."""
    def piece(total, xs):
        xc, tc, mc = xs
        return total + jnp.sum(softmax_cross_entropy(_piece_logits(xc, w), tc) * mc), None

    return jax.lax.scan(piece, jnp.float32(0.0), (x, targets, mask))[0]


def _linear_ce_fwd(x, w, targets, mask):
    """The loss and, in the same pass over the pieces, its gradients for a cotangent of 1.

    The loss is a scalar, so the backward pass only scales these by its cotangent: each piece's logits
    are computed once, and three matmuls per piece (logits, input and weight gradients) do the whole
    forward and backward. Under plain evaluation (no differentiation) ``_linear_ce`` itself runs: the
    logits and nothing else."""
    def piece(carry, xs):  # x [B, c, D], targets, mask [B, c]
        total, dw = carry
        xc, tc, mc = xs
        ce, res = _ce_fwd(_piece_logits(xc, w), tc)
        dlogits = _ce_bwd(res, mc)[0].astype(x.dtype)  # (softmax - onehot) * mask  [B, c, V]
        dx = jnp.matmul(dlogits, w.T, preferred_element_type=jnp.float32).astype(x.dtype)  # [B, c, D]
        dw = dw + jnp.matmul(xc.reshape(-1, xc.shape[-1]).T, dlogits.reshape(-1, dlogits.shape[-1]),
                             preferred_element_type=jnp.float32)
        return (total + jnp.sum(ce * mc), dw), dx

    (total, dw), dx = jax.lax.scan(piece, (jnp.float32(0.0), jnp.zeros(w.shape, jnp.float32)), (x, targets, mask))
    return total, (dx, dw)


def _linear_ce_bwd(res, g):
    dx, dw = res  # w is in x's dtype (linear_cross_entropy casts it)
    return (g * dx).astype(dx.dtype), (g * dw).astype(dx.dtype), None, None


_linear_ce.defvjp(_linear_ce_fwd, _linear_ce_bwd)


def _mean(total: jax.Array, count: jax.Array) -> jax.Array:
    return total / jnp.maximum(count, 1.0)


def mean_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of :func:`cross_entropy` over the scored targets (0 when there are none)."""
    return _mean(*cross_entropy(logits, targets, mask))


def _head_inputs(model, batch: dict):
    """``(input embeddings [B, S, D], the last block's output [B, S, D])`` of a batch."""
    emb, ple = model.inputs(batch["inputs"], segment_ids=batch["segment_ids"])  # [B, S, D]
    return emb, model.hidden(emb, batch["positions"], batch["segment_ids"], ple)


def loss_fn(model, batch: dict, draft_head_weight: float = 1.0, loss_chunks: int = 1) -> tuple[jax.Array, jax.Array]:
    """The training objective ``(mean cross-entropy + MoE auxiliary losses [+ weighted draft-head
    cross-entropy], mean cross-entropy)``. The draft head's loss: next token (``ngram``) or the token
    after it (``mtp``: the head reads the target's last hidden state at t and input embedding of t+1,
    both from this forward pass, and predicts token t+2; scored where t+2 is a scored target of t+1's
    document). The output head and its cross-entropy run in ``loss_chunks`` pieces of the sequence
    (:func:`linear_cross_entropy`; ``train.loss_chunks``)."""
    kind = model.config.draft_head if draft_head_weight > 0 else "none"
    emb, hidden = _head_inputs(model, batch)
    head = model.head_weight()  # [D, V]
    loss = _mean(*linear_cross_entropy(model.final_norm(hidden), head, batch["targets"], batch["loss_mask"],
                                       loss_chunks))
    total = loss + model.aux_loss()
    if kind == "ngram":
        draft = model.draft_logits(batch["inputs"], segment_ids=batch["segment_ids"])
        total = total + draft_head_weight * mean_cross_entropy(draft, batch["targets"], batch["loss_mask"])
    elif kind == "mtp":
        seg = batch["segment_ids"]
        x = model.mtp_training_features(hidden, emb, batch["positions"], seg)  # [B, S-1, D]
        mask = batch["loss_mask"][:, 1:] * (seg[:, :-1] == seg[:, 1:])
        total = total + draft_head_weight * _mean(*linear_cross_entropy(x, head, batch["targets"][:, 1:], mask,
                                                                        loss_chunks))
    return total, loss


def eval_step(model, batch: dict, loss_chunks: int = 1) -> tuple[jax.Array, jax.Array]:
    """``(sum of cross-entropy, number of scored targets)`` of a batch (sum over batches, then divide)."""
    _, hidden = _head_inputs(model, batch)
    return linear_cross_entropy(model.final_norm(hidden), model.head_weight(), batch["targets"], batch["loss_mask"],
                                loss_chunks)
