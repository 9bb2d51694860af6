"""The one next-token loss: the hand-written cross-entropy backward equals optax's autodiff, and the
chunked output head + loss equals logits then cross-entropy."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ngram_jax.config import load_config
from ngram_jax.model import build_model, default_positions
from ngram_jax.train.loss import cross_entropy, linear_cross_entropy, loss_fn, softmax_cross_entropy

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def test_softmax_cross_entropy_values_and_gradients_equal_optax():
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(k1, (3, 5, 37)) * 4.0  # large logits: logsumexp must be stable
    targets = jax.random.randint(k2, (3, 5), 0, 37)
    ours = softmax_cross_entropy(logits, targets)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    weights = jnp.arange(15.0).reshape(3, 5)  # a different cotangent per position
    g_ours = jax.grad(lambda x: jnp.sum(softmax_cross_entropy(x, targets) * weights))(logits)
    g_ref = jax.grad(lambda x: jnp.sum(optax.softmax_cross_entropy_with_integer_labels(x, targets) * weights))(logits)
    np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    # numpy: softmax - onehot per row
    p = np.exp(np.asarray(logits) - np.log(np.exp(np.asarray(logits)).sum(-1, keepdims=True)))
    p[np.arange(3)[:, None], np.arange(5)[None], np.asarray(targets)] -= 1.0
    np.testing.assert_allclose(g_ours, p * np.asarray(weights)[..., None], rtol=1e-5, atol=1e-6)


def test_cross_entropy_masks_and_counts():
    logits = jnp.zeros((1, 4, 8))
    total, count = cross_entropy(logits, jnp.array([[1, 2, 3, 4]]), jnp.array([[1, 1, 0, 1]]))
    assert float(count) == 3.0
    np.testing.assert_allclose(float(total), 3 * np.log(8.0), rtol=1e-6)


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(chunks):
    """The chunked head + loss (forward and its hand-written backward) against autodiff of x @ w and
    cross_entropy; 3 pieces do not divide the 10 positions (padding), masked positions score nothing."""
    kx, kw, kt, km = jax.random.split(jax.random.key(1), 4)
    x = jax.random.normal(kx, (2, 10, 6))
    w = jax.random.normal(kw, (6, 37)) * 2.0
    targets = jax.random.randint(kt, (2, 10), 0, 37)
    mask = (jax.random.uniform(km, (2, 10)) > 0.3).astype(jnp.float32)

    def ref(x, w):
        total, count = cross_entropy(x @ w, targets, mask)
        return 2.5 * total, count

    def ours(x, w):
        total, count = linear_cross_entropy(x, w, targets, mask, chunks)
        return 2.5 * total, count

    (t_ref, c_ref), g_ref = jax.value_and_grad(ref, argnums=(0, 1), has_aux=True)(x, w)
    (t_ours, c_ours), g_ours = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(x, w)
    assert float(c_ours) == float(c_ref) == float(mask.sum())
    np.testing.assert_allclose(t_ours, t_ref, rtol=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(g_ours[0])[np.asarray(mask) == 0], 0.0)  # unscored: no gradient


def test_linear_cross_entropy_bfloat16_operands():
    """bfloat16 hidden state and head weight: float32 logits from bfloat16 operands (as Model.output); the
    gradients come back in each operand's dtype."""
    kx, kw, kt = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (2, 8, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(kw, (16, 64)).astype(jnp.bfloat16)
    targets = jax.random.randint(kt, (2, 8), 0, 64)
    mask = jnp.ones((2, 8))

    def ref(x, w):
        return cross_entropy(jnp.matmul(x, w, preferred_element_type=jnp.float32), targets, mask)[0]

    g_ref = jax.grad(ref, argnums=(0, 1))(x, w)
    t_ours, g_ours = jax.value_and_grad(lambda x, w: linear_cross_entropy(x, w, targets, mask, 4)[0],
                                        argnums=(0, 1))(x, w)
    np.testing.assert_allclose(t_ours, ref(x, w), rtol=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("overrides", [["model.tie_embeddings=true"], ["model.draft_head=mtp"]],
                         ids=["tied", "mtp_lm_head"])
def test_loss_fn_chunks_change_nothing_but_speed(overrides):
    """The training objective and every parameter gradient are the same for 1 and 4 loss chunks, and the
    main cross-entropy equals optax's on the model's own logits (the head applied by Model.output)."""
    cfg = load_config(CONFIGS / "tiny_ne.yaml", overrides=["data.seq_len=12", "model.num_blocks=1", *overrides])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(2, cfg.model.vocab_size, (2, 13)), jnp.int32)
    seg = jnp.asarray([[1] * 12, [1] * 5 + [2] * 7], jnp.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": seg,
             "positions": default_positions(seg.shape, seg), "loss_mask": jnp.ones((2, 12), jnp.float32)}
    results = []
    for chunks in (1, 4):
        (total, loss), grads = nnx.jit(nnx.value_and_grad(lambda m, c=chunks: loss_fn(m, batch, 1.0, c),
                                                          has_aux=True))(model)
        results.append((float(total), float(loss), nnx.to_flat_state(nnx.state(grads))))
    logits = nnx.jit(lambda m: m(batch["inputs"], segment_ids=seg, positions=batch["positions"]))(model)
    ref = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()
    np.testing.assert_allclose(results[0][1], float(ref), rtol=1e-5)
    np.testing.assert_allclose(results[1][:2], results[0][:2], rtol=1e-5)
    if "model.draft_head=mtp" in overrides:
        assert results[0][0] > results[0][1] + 1.0  # the MTP term is in the objective
    for (path, a), (_, b) in zip(results[0][2], results[1][2], strict=True):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-4, atol=1e-6, err_msg=str(path))
