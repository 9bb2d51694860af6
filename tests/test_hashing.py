"""n-gram id maths: hand-computed cases, the int64 oracle, exact 32-bit modular arithmetic."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracles import ngram_ids_reference

from ngram_jax.ngram import hashing
from ngram_jax.ngram.hashing import (
    MAX_TABLE_SIZE,
    make_layout,
    mulmod_u32,
    ngram_ids,
    table_sizes,
)


def ids(tokens, vocab, sizes, max_n, splits, eos_id=None, segment_ids=None):
    kw = dict(vocab_size=vocab, table_sizes=sizes, max_n=max_n, splits=splits, eos_id=eos_id)
    got = np.asarray(ngram_ids(jnp.asarray(tokens), segment_ids=segment_ids, **kw))
    want = ngram_ids_reference(tokens, segment_ids=segment_ids, **kw)
    np.testing.assert_array_equal(got, want)
    return got


def test_x64_is_off():
    assert not jax.config.jax_enable_x64  # the 32-bit path is what runs on TPU


def test_table_sizes_formula_and_layout():
    assert table_sizes(10, 3, 1, 2) == (21, 23)
    assert table_sizes(131072, 4, 4, 78) == tuple(78 * 131072 + 2 * i + 1 for i in range(12))
    # 8.37 * 32768 = 274268.16 -> 274268 + 1
    assert table_sizes(32768, 2, 1, 8.37) == (274269,)
    lay = make_layout(100, 3, 2, 1.5)
    assert lay.table_sizes == (151, 153, 155, 157)
    assert lay.row_offsets == (0, 151, 304, 459)
    assert lay.total_rows == 151 + 153 + 155 + 157
    assert [lay.order_of(i) for i in range(4)] == [2, 2, 3, 3]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=100, max_n=1, splits=1, ratio=2), "max_n"),
        (dict(vocab_size=100, max_n=3, splits=0, ratio=2), "splits"),
        (dict(vocab_size=100, max_n=3, splits=1, ratio=0), "ratio"),
        (dict(vocab_size=1 << 18, max_n=3, splits=1, ratio=8192), "2\\^31"),
    ],
)
def test_table_sizes_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        table_sizes(**kwargs)


def test_hand_computed():
    # V=10, N=3, K=1, r=2: M = (21, 23). tokens 3 5 7:
    #   t=0: 3, 3 | t=1: 5+3*10=35 -> 35%21=14, 35%23=12 | t=2: 7+50=57%21=15, 7+50+300=357%23=12
    got = ids([[3, 5, 7]], 10, (21, 23), 3, 1)
    np.testing.assert_array_equal(got[0], [[3, 3], [14, 12], [15, 12]])


def test_hand_computed_eos_reset():
    # eos=1: the EOS hashes with its own predecessors; the token after it has zero history
    got = ids([[3, 1, 7, 5]], 10, (21, 23), 3, 1, eos_id=1)
    # t=1 (EOS): 1+30=31 -> 10, 8 | t=2: 7, 7 | t=3: 5+70=75 -> 75%21=12, 75%23=6 (x~_{t-2}=0)
    np.testing.assert_array_equal(got[0], [[3, 3], [10, 8], [7, 7], [12, 6]])


def test_hand_computed_segments():
    # packed documents [3 5] [7 5]: the second document starts with zero history
    got = ids([[3, 5, 7, 5]], 10, (21, 23), 3, 1, segment_ids=np.array([[1, 1, 2, 2]]))
    np.testing.assert_array_equal(got[0], [[3, 3], [14, 12], [7, 7], [12, 6]])


def test_reduces_token_modulo_tiny_table():
    # M smaller than V: x_t itself must be reduced
    got = ids([[9, 8]], 10, (3, 5), 2, 2)
    np.testing.assert_array_equal(got[0], [[0, 4], [(8 + 9 * 10) % 3, (8 + 9 * 10) % 5]])


def test_history_never_reads_the_future():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (2, 20))
    base = ids(tokens, 50, table_sizes(50, 4, 2, 3.7), 4, 2, eos_id=3)
    for t in (0, 7, 19):
        changed = tokens.copy()
        changed[:, t + 1 :] = rng.integers(0, 50, changed[:, t + 1 :].shape)
        other = ids(changed, 50, table_sizes(50, 4, 2, 3.7), 4, 2, eos_id=3)
        np.testing.assert_array_equal(other[:, : t + 1], base[:, : t + 1])


def test_jit_matches_eager_and_is_int32():
    sizes = table_sizes(131072, 4, 4, 78)
    tokens = np.random.default_rng(1).integers(0, 131072, (2, 33))
    f = jax.jit(lambda t: ngram_ids(t, vocab_size=131072, table_sizes=sizes, max_n=4, splits=4, eos_id=2))
    out = f(tokens)
    assert out.dtype == jnp.int32 and out.shape == (2, 33, 12)
    np.testing.assert_array_equal(
        np.asarray(out),
        ngram_ids_reference(tokens, vocab_size=131072, table_sizes=sizes, max_n=4, splits=4, eos_id=2),
    )


def test_mulmod_exhaustive_edges_and_random():
    """Millions of products a*c mod m, including every extreme, against exact Python/numpy."""
    rng = np.random.default_rng(0)
    n = 1 << 20
    m = rng.integers(1, MAX_TABLE_SIZE + 1, n, dtype=np.int64)
    m[: n // 4] = MAX_TABLE_SIZE - rng.integers(0, 64, n // 4)  # near 2^31 - 1
    c = rng.integers(0, m, dtype=np.int64)
    c[::7] = m[::7] - 1
    a = rng.integers(0, 1 << 20, n, dtype=np.int64)
    a[::5] = (1 << 20) - 1
    a[::11] = 0
    got = mulmod_u32(jnp.asarray(a, jnp.uint32), jnp.asarray(c, jnp.uint32), jnp.asarray(m, jnp.uint32),
                     jnp.asarray((c / m).astype(np.float32)))
    np.testing.assert_array_equal(np.asarray(got).astype(np.int64), (a * c) % m)


@st.composite
def hash_cases(draw):
    vocab = draw(st.one_of(st.integers(2, 300), st.integers(2, 1 << 18), st.just(1 << 18)))
    max_n = draw(st.integers(2, 5))
    splits = draw(st.integers(1, 3))
    t = splits * (max_n - 1)
    top = (MAX_TABLE_SIZE - 2 * t) // vocab
    ratio = draw(st.one_of(
        st.floats(0.01, min(100.0, top), allow_nan=False),
        st.floats(max(0.01, top - 3), top, allow_nan=False),  # tables near 2^31
    ))
    b, s = 3, 24  # fixed shape: eager ops compile once per shape, which dominates the run time
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=b * s, max_size=b * s))
    tokens = np.array(tokens, np.int64).reshape(b, s)
    eos = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    if eos is not None:  # plant some EOS tokens
        mask = np.array(draw(st.lists(st.booleans(), min_size=b * s, max_size=b * s))).reshape(b, s)
        tokens = np.where(mask & (np.arange(s) % 3 == 1), eos, tokens)
    seg = None
    if draw(st.booleans()):
        cuts = np.array(draw(st.lists(st.integers(0, 1), min_size=b * s, max_size=b * s))).reshape(b, s)
        seg = np.cumsum(cuts, axis=1)
    return vocab, max_n, splits, ratio, tokens, eos, seg


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hash_cases())
def test_matches_int64_reference(case):
    vocab, max_n, splits, ratio, tokens, eos, seg = case
    sizes = table_sizes(vocab, max_n, splits, ratio)
    out = ids(tokens, vocab, sizes, max_n, splits, eos_id=eos, segment_ids=seg)
    assert (out >= 0).all() and (out < np.array(sizes)).all()


def test_check_token_ids():
    hashing.check_token_ids(np.array([[0, 9]]), 10)
    with pytest.raises(ValueError, match=r"outside \[0, 10\); first: 10 at index \(0, 1\)"):
        hashing.check_token_ids(np.array([[0, 10]]), 10)
    with pytest.raises(ValueError, match="first: -1"):
        hashing.check_token_ids(jnp.array([[-1, 3]]), 10)
    with pytest.raises(ValueError, match="integers"):
        hashing.check_token_ids(np.array([0.5]), 10)


def reference_table_sizes(vocab_size, max_n, splits, ratio):
    """Transcription of the reference (HF modeling_longcat_ngram.py NgramEmbedding, sglang, vLLM):
    ``m = ngram_vocab_size_ratio * vocab_size``; table i has ``int(m + i * 2 + 1)`` rows."""
    m = ratio * vocab_size
    return tuple(int(m + i * 2 + 1) for i in range(splits * (max_n - 1)))


def test_table_sizes_follow_the_reference_float_arithmetic():
    # 0.57 * 100 = 56.99999999999999 in floats: the reference truncates, a decimal reading would not
    assert table_sizes(100, 3, 2, 0.57) == (57, 59, 61, 63)
    assert table_sizes(100, 7, 2, 0.57)[4:6] == (66, 68)  # 56.99999999999999 + 9 rounds up to 66.0
    assert table_sizes(131072, 4, 4, 78) == reference_table_sizes(131072, 4, 4, 78)


@settings(max_examples=300, deadline=None)
@given(vocab=st.integers(2, 1 << 20), max_n=st.integers(2, 5), splits=st.integers(1, 4),
       ratio=st.one_of(st.floats(0.01, 2000.0, allow_nan=False, allow_infinity=False),
                       st.integers(1, 2000), st.decimals("0.01", "200", places=2).map(float)))
def test_table_sizes_equal_the_reference_formula(vocab, max_n, splits, ratio):
    want = reference_table_sizes(vocab, max_n, splits, ratio)
    if want[-1] > MAX_TABLE_SIZE:
        with pytest.raises(ValueError, match="2\\^31"):
            table_sizes(vocab, max_n, splits, ratio)
    else:
        assert table_sizes(vocab, max_n, splits, ratio) == want
