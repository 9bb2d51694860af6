"""The one next-token loss: the hand-written cross-entropy backward equals optax's autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ngram_jax.train.loss import cross_entropy, softmax_cross_entropy


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
