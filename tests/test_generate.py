"""Decoding: incremental logits equal a full forward pass; the N-gram cache follows EOS, padding and
batch reordering; sampling filters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import ngram_ids_reference

from ngram_jax import generate as G
from ngram_jax.config import load_config
from ngram_jax.model import build_model
from ngram_jax.ngram import hashing

VARIANTS = ["tiny_ne", "tiny_plne", "tiny_gqa"]


@pytest.fixture(scope="module")
def models():
    with nnx.use_eager_sharding(False):
        return {n: build_model(load_config(f"configs/models/{n}.yaml"), nnx.Rngs(0)) for n in VARIANTS}


EOS = load_config("configs/models/tiny_ne.yaml").model.eos_id  # 1: not the zero fill of padding and histories


def prompts_with_eos():
    assert EOS not in (None, 0)
    rng = np.random.default_rng(0)
    p = [list(rng.integers(2, 4096, 7)), list(rng.integers(2, 4096, 3)), list(rng.integers(2, 4096, 5))]
    p[0][3] = EOS  # an EOS inside a prompt
    p[2][-1] = EOS  # a prompt ending with EOS: the first new token starts with zero history
    return p


def decode_all(model, prompts, fed):
    """Incremental logits for each prompt followed by the tokens ``fed`` [steps, B]."""
    toks, seg = G.left_pad(prompts)
    logits, state = nnx.jit(G.prefill, static_argnums=(3,))(model, jnp.asarray(toks), jnp.asarray(seg), 24)
    step = nnx.jit(G.decode_step)
    out = [logits]
    for tok in fed:
        logits, state = step(model, jnp.asarray(tok, jnp.int32), state)
        out.append(logits)
    return np.stack([np.asarray(x) for x in out], axis=1), state  # [B, steps+1, V]


@pytest.mark.parametrize("name", VARIANTS)
def test_incremental_logits_equal_full_forward(models, name):
    model = models[name]
    prompts = prompts_with_eos()
    fed = [[5, 17, 9], [6, EOS, 11], [7, 18, EOS], [8, 19, 12]]  # EOS fed in the middle of decoding too
    inc, _ = decode_all(model, prompts, fed)
    for i, p in enumerate(prompts):
        seq = list(p) + [f[i] for f in fed]
        full = np.asarray(model(np.asarray([seq])))[0]
        np.testing.assert_allclose(inc[i], full[len(p) - 1 :], atol=1e-5, rtol=0)


def test_ngram_cache_history_matches_the_formula():
    eos = 6  # not 0, the value a reset history is filled with
    tokens = jnp.asarray([[4, eos, 7, 8, 9]])
    seg = jnp.ones_like(tokens)
    hist = G.prefill_history(tokens, seg, eos_id=eos, length=3)
    np.testing.assert_array_equal(np.asarray(hist), [[9, 8, 7]])  # stops at the EOS before 7
    hist = G.prefill_history(tokens[:, :3], seg[:, :3], eos_id=eos, length=3)
    np.testing.assert_array_equal(np.asarray(hist), [[7, 0, 0]])  # zero-filled, the EOS itself not kept
    hist = G.advance_history(hist, jnp.asarray([eos]), eos_id=eos)
    np.testing.assert_array_equal(np.asarray(hist), [[0, 0, 0]])  # after an EOS: zero history
    hist = G.advance_history(hist, jnp.asarray([3]), eos_id=eos)
    np.testing.assert_array_equal(np.asarray(hist), [[3, 0, 0]])
    # O(N) ids from the cache equal the full-sequence ids at that position
    lay = hashing.make_layout(4096, 4, 2, 2.37)
    seq = np.array([[4, eos, 7, 8, 9, 5]])
    h = G.prefill_history(jnp.asarray(seq[:, :-1]), jnp.ones((1, 5), jnp.int32), eos, 3)
    ids = hashing.ids_from_history(jnp.asarray(seq[:, -1:]), h[:, None], vocab_size=4096, table_sizes=lay.table_sizes,
                                   max_n=4)
    want = ngram_ids_reference(seq, vocab_size=4096, table_sizes=lay.table_sizes, max_n=4, splits=2, eos_id=eos)
    np.testing.assert_array_equal(np.asarray(ids)[0, 0], want[0, -1])


@pytest.mark.slow  # CI time: make test-all runs it
def test_reordering_keeps_the_caches_consistent(models):
    model = models["tiny_ne"]
    prompts = prompts_with_eos()
    fed_a = [[5, 17, 9], [6, 21, 11]]
    _, state = decode_all(model, prompts, fed_a)
    order = jnp.asarray([2, 0, 0])  # beam-style: drop row 1, duplicate row 0
    state = G.reorder(state, order)
    logits, _ = nnx.jit(G.decode_step)(model, jnp.asarray([30, 31, 32], jnp.int32), state)
    for row, src in enumerate(np.asarray(order)):
        seq = list(prompts[src]) + [f[src] for f in fed_a] + [[30, 31, 32][row]]
        full = np.asarray(model(np.asarray([seq])))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[row]), full, atol=1e-5, rtol=0)


@pytest.mark.slow  # CI time (58 s): make test-all runs it
def test_generate_greedy_matches_argmax_of_full_forward(models):
    model = models["tiny_gqa"]
    prompt = [11, 12, 13, 14]
    (new,) = G.generate(model, [prompt], 5, stop_at_eos=False)
    seq = list(prompt)
    for _ in range(5):
        seq.append(int(np.argmax(np.asarray(model(np.asarray([seq])))[0, -1])))
    assert new == seq[len(prompt):]


def test_sampling_filters():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    def draws(**kw):
        return set(np.asarray(jax.vmap(lambda k: G.sample(logits, k, **kw)[0])(keys)).tolist())

    assert int(G.sample(logits, keys[0])[0]) == 0  # greedy
    assert draws(temperature=1.0, top_k=2) == {0, 1}
    assert draws(temperature=1.0, top_p=0.7) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert draws(temperature=1.0) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="at least one token"):
        G.left_pad([[1], []])
