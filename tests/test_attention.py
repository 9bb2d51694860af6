"""Causal attention in query blocks: values against a numpy loop, gradients against one block and
``jax.nn.dot_product_attention``, and the block count it picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ngram_jax.layers.attention import MAX_QUERY_BLOCKS, MIN_QUERY_BLOCK, causal_attention, query_blocks
from tests.oracles import causal_attention_reference

SCALE = 0.3
attend = jax.jit(causal_attention, static_argnums=(4,), static_argnames=("blocks",))  # one compile per case


def qkv(b=2, s=16, h=4, hk=2, dq=12, dv=8, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles for seconds per shape
    return tuple(jnp.asarray(rng.standard_normal(shape), dtype)
                 for shape in ((b, s, h, dq), (b, s, hk, dq), (b, s, hk, dv)))


SEGMENTS = np.array([[1] * 5 + [2] * 8 + [3] * 3, [1] * 16])  # packed documents; row 1 is one document


@pytest.mark.parametrize("blocks,segments,heads", [
    (1, SEGMENTS, (4, 4)), (2, SEGMENTS, (4, 2)), (4, SEGMENTS, (4, 1)), (8, SEGMENTS, (4, 2)),
    (4, None, (4, 4)), (8, None, (4, 1))], ids=["1-packed-mha", "2-packed-gqa", "4-packed-mqa", "8-packed-gqa",
                                               "4-one-doc-mha", "8-one-doc-mqa"])
def test_values_match_the_loop(blocks, segments, heads):
    q, k, v = qkv(h=heads[0], hk=heads[1])
    out = attend(q, k, v, None if segments is None else jnp.asarray(segments), SCALE, blocks=blocks)
    assert out.shape == (2, 16, heads[0], 8) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), causal_attention_reference(q, k, v, segments, SCALE),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("blocks", [2, 4])
def test_gradients_equal_one_block_and_dot_product_attention(blocks):
    q, k, v = qkv(h=4, hk=4, dv=12)  # one head size: jax.nn.dot_product_attention takes it as is
    seg = jnp.asarray(SEGMENTS)
    w = jnp.asarray(np.random.default_rng(9).standard_normal((2, 16, 4, 12)), jnp.float32)

    def loss(f):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * w), argnums=(0, 1, 2)))(q, k, v)

    ours = loss(lambda q, k, v: causal_attention(q, k, v, seg, SCALE, blocks=blocks))
    one = loss(lambda q, k, v: causal_attention(q, k, v, seg, SCALE, blocks=1))
    mask = (seg[:, :, None] == seg[:, None, :])[:, None]
    ref = loss(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=SCALE))
    for a, b, c in zip(ours, one, ref, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-5)


def test_bfloat16_operands():
    q, k, v = qkv(dtype=jnp.bfloat16)
    out = attend(q, k, v, jnp.asarray(SEGMENTS), SCALE, blocks=4)
    assert out.dtype == jnp.bfloat16
    ref = causal_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                     SEGMENTS, SCALE)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


def test_block_count():
    assert query_blocks(10) == 1  # decoding prompts, short test sequences: one block
    assert query_blocks(2 * MIN_QUERY_BLOCK) == 2
    assert query_blocks(4096) == MAX_QUERY_BLOCKS
    assert query_blocks(4 * MIN_QUERY_BLOCK + 1) == 1  # odd: no block count divides it
    for s in (64, 96, 128, 200, 256, 1000, 4096):
        n = query_blocks(s)
        assert s % n == 0 and (n == 1 or s // n >= MIN_QUERY_BLOCK) and n <= MAX_QUERY_BLOCKS
    with pytest.raises(ValueError, match="3 query blocks do not divide a sequence of 16"):
        causal_attention(*qkv(), None, SCALE, blocks=3)


@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_splash_attention_equals_causal_attention(heads):
    """JAX's TPU splash attention kernel (model.attention.kernel=splash, the TPU default for long sequences) in
    the Pallas interpreter: MLA's unequal head sizes (Dq != Dv), packed documents, values and gradients."""
    from ngram_jax.layers.attention import attention_kernel, splash_causal_attention

    h, hk = heads
    b, s, dq, dv = 2, 256, 48, 32
    kq, kk, kv, kc = jax.random.split(jax.random.key(3), 4)
    q, k = jax.random.normal(kq, (b, s, h, dq)), jax.random.normal(kk, (b, s, hk, dq))
    v, cot = jax.random.normal(kv, (b, s, hk, dv)), jax.random.normal(kc, (b, s, h, dv))
    seg = jnp.asarray(np.repeat([[1, 2], [1, 1]], [100, 156], axis=1), jnp.int32)
    scale = dq ** -0.5

    def loss(fn):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v, seg, scale) * cot), argnums=(0, 1, 2))(q, k, v)

    (lv, grads), (lw, want) = loss(splash_causal_attention), loss(causal_attention)
    np.testing.assert_allclose(float(lv), float(lw), rtol=1e-4)
    for g, w in zip(grads, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-3, atol=2e-3)
    assert attention_kernel("auto", 4096) == "xla"  # this process compiles for CPU
    with pytest.raises(ValueError, match="divisible by 128"):
        splash_causal_attention(q[:, :100], k[:, :100], v[:, :100], None, scale)
