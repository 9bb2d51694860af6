"""Speculative decoding (issue 12): greedy output equals plain greedy decoding for every drafter,
with ragged prompts, EOS in the middle of the batch, ragged acceptance and reused compiled slots;
sampling follows the target's distribution (chi-square against exact probabilities); the n-gram
history read from the token table equals the full-sequence history."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats as sps

from ngram_jax import generate as G
from ngram_jax import speculative as S
from ngram_jax.config import load_config
from ngram_jax.model import build_model
from ngram_jax.ngram import hashing

TINY = ["model.d_model=32", "model.num_blocks=1", "model.ffn_dim=64", "model.attention.head_dim=8",
        "model.moe.expert_dim=16"]
PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [9, 10, 11, 12], [3], [40, 41, 42, 43, 44, 45]]  # ragged
NEW = 10


def target_model(eos_id=1, vocab=4096):
    cfg = load_config("configs/models/tiny_gqa.yaml", [*TINY, f"model.eos_id={eos_id}", f"model.vocab_size={vocab}",
                                                        "model.draft_head=ngram"])
    return build_model(cfg, nnx.Rngs(0))


@pytest.fixture(scope="module")
def with_eos():
    """A target whose EOS is a token plain greedy decoding emits mid-way for prompt 1 only: rebuilt with
    that token as eos_id (same parameters; history resets only after it appears)."""
    with nnx.use_eager_sharding(False):
        probe = G.generate(target_model(), PROMPTS, NEW, stop_at_eos=False)
        row = probe[1]
        others = probe[0] + probe[2] + probe[3]
        eos = next(t for i, t in enumerate(row[2:6], 2) if t not in row[:i] and t not in others)
        model = target_model(eos_id=eos)
        draft = build_model(load_config("configs/draft_tiny.yaml", ["model.d_model=16", "model.attention.head_dim=8",
                                                                    f"model.eos_id={eos}"]), nnx.Rngs(1))
    plain = G.generate(model, PROMPTS, NEW)
    assert plain[1][-1] == eos and len(plain[1]) < NEW and all(len(r) == NEW for i, r in enumerate(plain) if i != 1)
    return model, draft, plain


class Corrupted(S.ModelDrafter):
    """The target itself as the draft model, with draft i of row b replaced by a wrong token when
    (b + i + step) % 3 == 2: acceptance lengths differ per row and per step (ragged), with rejections
    and full acceptances both happening."""

    name = "corrupted"

    def propose(self, models, dstate, table, length, start, k, key, sampling):
        prop = super().propose(models, dstate, table, length, start, k, key, sampling)
        b = jnp.arange(prop.drafts.shape[0])[:, None]
        i = jnp.arange(k)[None, :]
        bad = (b + i + length[:, None]) % 3 == 2
        return prop._replace(drafts=jnp.where(bad, (prop.drafts + 1) % self.draft.config.vocab_size, prop.drafts))


@pytest.mark.parametrize("which", ["prompt_lookup", "model", "ngram", "corrupted", "self", "self_early_reject"])
def test_greedy_equals_plain_greedy(with_eos, which):
    model, draft, plain = with_eos
    drafter = {"prompt_lookup": S.PromptLookup(), "model": S.ModelDrafter(draft), "corrupted": Corrupted(model),
               "self": S.ModelDrafter(model), "ngram": S.NgramDrafter(),
               "self_early_reject": S.ModelDrafter(model)}[which]
    # early rejection at 1/V: about half the tokens score above it under the untrained N-gram head
    reject = 1 / model.config.vocab_size if which == "self_early_reject" else None
    out, st = S.speculative_generate(model, PROMPTS, NEW, drafter=drafter, num_draft=3, early_reject=reject)
    assert out == plain
    if which == "self_early_reject":  # perfect drafts, truncated: every verified draft accepted, not all verified
        assert 0 < st["verified"] < st["proposed"] and st["accepted"] == st["verified"]
    else:
        assert st["verified"] == st["proposed"]
    assert st["verify_steps"] > 0 and st["draft_calls"] > 0 and st["proposed"] >= 3 * st["verify_steps"]
    if which == "self":  # a perfect drafter: every proposal of a live row accepted, ~K+1 tokens per pass
        assert st["accepted"] > 0 and st["verify_steps"] <= -(-NEW // 4) + 1
    if which == "corrupted":
        assert 0 < st["accepted"] < st["proposed"]


def test_reused_slots_start_clean(with_eos):
    """A compiled program run on one batch and then another gives the second batch's plain output:
    nothing of the first run (table, KV caches, draft cache) leaks into the next."""
    model, draft, _ = with_eos
    compiled = {}
    other = [[100, 101, 102, 103, 104, 105, 106, 107], [7, 7, 7, 7], [8], [2000, 2001, 2002, 2003, 2004, 2005]]
    drafter = S.ModelDrafter(draft)
    first, _ = S.speculative_generate(model, other, NEW, drafter=drafter, num_draft=3, compiled=compiled)
    assert first == G.generate(model, other, NEW)
    again, _ = S.speculative_generate(model, PROMPTS, NEW, drafter=drafter, num_draft=3, compiled=compiled)
    assert len(compiled) == 1 and again == G.generate(model, PROMPTS, NEW)


def test_table_history_equals_sequence_history():
    eos = 6
    seq = np.array([[0, 0, 4, 5, eos, 7, 8, 9, 2, eos, 3]], np.int32)  # two padding slots, EOS twice
    seg = (np.arange(seq.shape[1]) >= 2).astype(np.int32)[None]
    want = np.asarray(hashing.history(jnp.asarray(seq), 4, eos, jnp.asarray(seg)))  # [1, S, 3]
    table = jnp.asarray(np.pad(seq, ((0, 0), (0, 5))))
    for first in range(2, seq.shape[1] - 2):
        got = S.table_history(table, jnp.asarray([2]), jnp.asarray([first]), 3, 3, eos)
        np.testing.assert_array_equal(np.asarray(got)[0], want[0, first : first + 3])


def exact_pair_probs(model, prompt, sampling):
    """Exact target probabilities of the first two new tokens after ``prompt``. [V, V]."""
    v = model.config.vocab_size
    first = jax.nn.softmax(G.filter_logits(model(jnp.asarray([prompt]))[0, -1], *sampling))
    seqs = jnp.asarray([list(prompt) + [t] for t in range(v)])
    second = jax.nn.softmax(G.filter_logits(model(seqs)[:, -1], *sampling), axis=-1)
    return np.asarray(first)[:, None] * np.asarray(second)


@pytest.mark.parametrize("which", ["model", "prompt_lookup", "model_early_reject"])
def test_sampling_follows_the_target_distribution(which):
    """Chi-square of (first, second) new token pairs from speculative sampling against the exact
    target probabilities, on an 8-token vocabulary; fixed seeds make it deterministic."""
    with nnx.use_eager_sharding(False):
        model = target_model(eos_id=7, vocab=8)
        draft = build_model(load_config("configs/draft_tiny.yaml", ["model.d_model=16", "model.attention.head_dim=8",
                                                                    "model.vocab_size=8", "model.eos_id=7"]),
                            nnx.Rngs(3))
    sampling = (1.3, 6, 0.97)  # temperature, top-k, top-p applied to p and q alike
    prompt = [2, 3, 2]
    n = 3000
    drafter = S.PromptLookup() if which == "prompt_lookup" else S.ModelDrafter(draft)
    reject = 1 / 8 if which == "model_early_reject" else None  # the restricted q keeps the output exact
    out, st = S.speculative_generate(model, [prompt] * n, 3, drafter=drafter, num_draft=2, temperature=sampling[0],
                                     top_k=sampling[1], top_p=sampling[2], seed=1, stop_at_eos=False,
                                     early_reject=reject)
    assert 0 < st["accepted"] < st["verified"]  # both acceptances and rejections happened
    assert (st["verified"] < st["proposed"]) == (reject is not None)
    counts = np.zeros((8, 8))
    for row in out:
        counts[row[0], row[1]] += 1
    probs = exact_pair_probs(model, prompt, sampling).reshape(-1)
    counts = counts.reshape(-1)
    assert counts[probs == 0].sum() == 0  # never a token the filters removed
    probs = probs.astype(np.float64) / probs.sum()
    keep = probs > 0
    exp = probs[keep] * n
    big = exp >= 5  # pool the rare cells into one
    obs_c, exp_c = counts[keep][big], exp[big]
    if (~big).any():
        obs_c, exp_c = np.append(obs_c, counts[keep][~big].sum()), np.append(exp_c, exp[~big].sum())
    pval = sps.chisquare(obs_c, exp_c * (obs_c.sum() / exp_c.sum())).pvalue
    assert pval > 1e-3, pval


def test_cached_ne_embeddings_verify_like_a_recompute_with_one_lookup_per_token(with_eos, monkeypatch):
    """The N-gram drafter hands the NE outputs it computed to verification: same logits and KV cache as
    verification that recomputes them, and the lookup runs once per token (K + 1 positions per round,
    not 2K + 1)."""
    from ngram_jax.ngram.lookup import HashedTables

    model, _, _ = with_eos
    k = 3
    toks, seg = G.left_pad(PROMPTS)
    p = toks.shape[1]
    logits0, st = G.prefill(model, jnp.asarray(toks), jnp.asarray(seg), p + 8)
    table = jnp.zeros((len(PROMPTS), p + 8), jnp.int32).at[:, :p].set(toks).at[:, p].set(jnp.argmax(logits0, -1))
    start = jnp.argmax(jnp.asarray(seg) != 0, axis=1).astype(jnp.int32)
    length = jnp.full((len(PROMPTS),), p + 1, jnp.int32)
    kv = S.per_row_index(st.kv, length - 1)
    looked_up = []
    real_gather = HashedTables.gather

    def counting(self, tokens, **kw):
        looked_up.append(tokens.shape[0] * tokens.shape[1])
        return real_gather(self, tokens, **kw)

    monkeypatch.setattr(HashedTables, "gather", counting)
    results = {}
    for cache in (True, False):
        looked_up.clear()
        prop = S.NgramDrafter(cache).propose((model,), (), table, length, start, k, jax.random.key(0), None)
        assert (prop.embeddings is not None) == cache
        filled = S.write(table, length, prop.drafts)
        results[cache] = S.verify(model, filled, start, length, k + 1, kv, prop.embeddings)
        assert sum(looked_up) == len(PROMPTS) * ((k + 1) if cache else (2 * k + 1))
    (lc, kvc), (lr, kvr) = results[True], results[False]
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lr), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(kvc), jax.tree.leaves(kvr), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
