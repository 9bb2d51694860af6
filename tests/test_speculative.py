"""Speculative decoding (issue 12): greedy output equals plain greedy decoding for every drafter,
with ragged prompts, EOS in the middle of the batch, ragged acceptance and reused compiled slots;
sampling follows the target's distribution (chi-square against exact probabilities); the n-gram
history read from the token table equals the full-sequence history; the MTP head's KV cache rolls back
by length (its drafts equal the head over the committed sequence), the NE-embedding cache, and the
MTP head's training (joint or on a frozen target)."""

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


def target_config(eos_id=1, vocab=4096, head="ngram", *extra):
    return load_config("configs/models/tiny_gqa.yaml", [*TINY, f"model.eos_id={eos_id}", f"model.vocab_size={vocab}",
                                                         f"model.draft_head={head}", *extra])


def target_model(eos_id=1, vocab=4096, head="ngram"):
    """The tiny target with a draft head; the head is built last, so the target's parameters do not
    depend on which head it has."""
    return build_model(target_config(eos_id, vocab, head), nnx.Rngs(0))


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


@pytest.fixture(scope="module")
def mtp_with_eos(with_eos):
    """The same target with the MTP draft head instead (same target parameters, same EOS mid-batch)."""
    model, _, plain = with_eos
    with nnx.use_eager_sharding(False):
        mtp = target_model(eos_id=model.config.eos_id, head="mtp")
    assert G.generate(mtp, PROMPTS, NEW) == plain
    return mtp, plain


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


@pytest.mark.parametrize("which", ["prompt_lookup", "model", "ngram", "corrupted", "self", "self_early_reject", "mtp",
                                   "mtp_nocache"])
def test_greedy_equals_plain_greedy(with_eos, mtp_with_eos, which):
    model, draft, plain = with_eos
    if which.startswith("mtp"):
        model = mtp_with_eos[0]
    drafter = {"prompt_lookup": S.PromptLookup(), "model": S.ModelDrafter(draft), "corrupted": Corrupted(model),
               "self": S.ModelDrafter(model), "ngram": S.NgramDrafter(),
               "self_early_reject": S.ModelDrafter(model), "mtp": S.MTPDrafter(),
               "mtp_nocache": S.MTPDrafter(cache_embeddings=False)}[which]
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


@pytest.mark.parametrize("which", [pytest.param("model", marks=pytest.mark.slow), "prompt_lookup",
                                   pytest.param("model_early_reject", marks=pytest.mark.slow),
                                   pytest.param("mtp", marks=pytest.mark.slow)])  # CI time: one in make test
def test_sampling_follows_the_target_distribution(which):
    """Chi-square of (first, second) new token pairs from speculative sampling against the exact
    target probabilities, on an 8-token vocabulary; fixed seeds make it deterministic."""
    with nnx.use_eager_sharding(False):
        model = target_model(eos_id=7, vocab=8, head="mtp" if which == "mtp" else "ngram")
        draft = build_model(load_config("configs/draft_tiny.yaml", ["model.d_model=16", "model.attention.head_dim=8",
                                                                    "model.vocab_size=8", "model.eos_id=7"]),
                            nnx.Rngs(3))
    sampling = (1.3, 6, 0.97)  # temperature, top-k, top-p applied to p and q alike
    prompt = [2, 3, 2]
    n = 3000
    drafter = {"prompt_lookup": S.PromptLookup(), "mtp": S.MTPDrafter()}.get(which, S.ModelDrafter(draft))
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
        results[cache] = S.verify(model, filled, start, length, k + 1, kv, prop.embeddings)[:2]
        assert sum(looked_up) == len(PROMPTS) * ((k + 1) if cache else (2 * k + 1))
    (lc, kvc), (lr, kvr) = results[True], results[False]
    np.testing.assert_allclose(np.asarray(lc), np.asarray(lr), atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(kvc), jax.tree.leaves(kvr), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)


def committed_mtp_logits(model, table, start, length) -> np.ndarray:
    """Reference: the MTP head over each row's committed tokens as in training (one pass of the target
    over the whole sequence, no cache): its logits at position L-2, which predict the token at L. [B, V]."""
    out = []
    for row, s0, n in zip(np.asarray(table), np.asarray(start), np.asarray(length), strict=True):
        seq = jnp.asarray(row[s0:n])[None]  # [1, L - start]
        positions = jnp.arange(seq.shape[1], dtype=jnp.int32)[None]
        emb, ple = model.inputs(seq)
        _, hidden = model.trunk(emb, positions, None, ple, return_hidden=True)
        out.append(np.asarray(model.mtp_training_logits(hidden, emb, positions)[0, -1]))
    return np.stack(out)


@pytest.mark.parametrize("rounds", [2, pytest.param(3, marks=pytest.mark.slow)])  # 2: a rollback, then its check
def test_mtp_cache_rolls_back_by_length_and_verification_reuses_its_embeddings(mtp_with_eos, monkeypatch, rounds):
    """Rounds of draft -> verify -> commit with forced ragged acceptance (row b commits (b + round) % (K+1)
    of the head's drafts, then the target's token: rollbacks at every index and full acceptances). Every
    round:
    - the head's first-draft logits equal the head run over the committed sequence as in training (so its
      KV cache holds exactly the committed positions: rejected drafts were rolled back by the index alone);
    - verification with the head's cached NE outputs gives the logits and KV cache of a verification that
      recomputes them, and the N-gram lookup runs once per verified token (K+1 positions per row and
      round: the head looks up the newly committed token and drafts 1..K-1, verification the last draft)
      instead of 2K+1."""
    from ngram_jax.ngram.lookup import HashedTables

    model, _ = mtp_with_eos
    k, b = 3, len(PROMPTS)
    toks, seg = G.left_pad(PROMPTS)
    p = toks.shape[1]
    s_max = p + rounds * (k + 1) + k + 4
    logits0, st, prompt = G.prefill(model, jnp.asarray(toks), jnp.asarray(seg), s_max, return_hidden=True)
    table = jnp.zeros((b, s_max), jnp.int32).at[:, :p].set(toks).at[:, p].set(jnp.argmax(logits0, -1))
    start = jnp.argmax(jnp.asarray(seg) != 0, axis=1).astype(jnp.int32)
    length = jnp.full((b,), p + 1, jnp.int32)
    kv = S.per_row_index(st.kv, length - 1)
    drafter = S.MTPDrafter()
    dstate = drafter.init((model,), jnp.asarray(toks), jnp.asarray(seg), s_max, k, prompt)
    looked_up = []
    real_gather = HashedTables.gather

    def counting(self, tokens, **kw):
        looked_up.append(tokens.shape[0] * tokens.shape[1])
        return real_gather(self, tokens, **kw)

    for r in range(rounds):
        monkeypatch.setattr(HashedTables, "gather", counting)
        looked_up.clear()
        # sampling at temperature 1 with no filter: q holds the head's logits
        prop = drafter.propose((model,), dstate, table, length, start, k, jax.random.key(r), (1.0, 0, 1.0))
        assert sum(looked_up) == b * k
        filled = S.write(table, length, prop.drafts)
        looked_up.clear()
        ver = S.verify(model, filled, start, length, k + 1, kv, prop.embeddings)
        assert sum(looked_up) == b
        looked_up.clear()
        again = S.verify(model, filled, start, length, k + 1, kv)
        assert sum(looked_up) == b * (k + 1)
        monkeypatch.setattr(HashedTables, "gather", real_gather)
        np.testing.assert_allclose(np.asarray(prop.q[:, 0]), committed_mtp_logits(model, table, start, length),
                                   atol=2e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(ver.logits), np.asarray(again.logits), atol=1e-5, rtol=0)
        for x, y in zip(jax.tree.leaves(ver.kv), jax.tree.leaves(again.kv), strict=True):
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
        a = jnp.asarray((np.arange(b) + r) % (k + 1), jnp.int32)  # drafts committed per row (forced)
        nxt = jnp.argmax(jnp.take_along_axis(ver.logits, a[:, None, None], axis=1)[:, 0], -1).astype(jnp.int32)
        table = S.write(filled, length + a, nxt[:, None])
        dstate = drafter.verified(prop.state, ver, length - 1)
        length = length + a + 1
        kv = S.set_index(ver.kv, length - 1)


def mtp_batch(vocab, seed=0, b=2, s=12):
    rng = np.random.RandomState(seed)
    tok = jnp.asarray(rng.randint(2, vocab, (b, s + 1)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 7 + [2] * (s - 7)], b, 0), jnp.int32)  # two packed documents
    from ngram_jax.model import default_positions

    return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "segment_ids": seg,
            "positions": default_positions(seg.shape, seg), "loss_mask": jnp.ones((b, s), jnp.float32)}


@pytest.mark.slow  # training steps of a target with the head, twice: make test-all
@pytest.mark.parametrize("freeze", [False, True])
def test_mtp_head_trains_jointly_or_on_a_frozen_target(freeze):
    """train_step with the MTP loss: joint training moves the target and the head (the head's loss reaches
    the target); with train.freeze_target only the head's parameters move, the target's parameters and
    its MoE selection bias stay bit-identical."""
    from ngram_jax.layers.moe import SelectionBias
    from ngram_jax.train.loop import train_step
    from ngram_jax.train.loss import loss_fn
    from ngram_jax.train.optimizer import Optimizer

    cfg = target_config(1, 512, "mtp", "model.moe.num_experts=4", "model.moe.num_zero_experts=2",
                        f"train.freeze_target={str(freeze).lower()}", "train.warmup_steps=1")
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
        opt = Optimizer(model, cfg.train)
    batch = mtp_batch(512)
    if not freeze:  # the MTP term's gradient reaches the target's blocks and its N-gram Embedding
        g = [nnx.grad(lambda m, w=w: loss_fn(m, batch, w)[0])(model) for w in (0.0, 1.0)]
        for path in (("blocks", 0, "attn", 0, "q", "kernel"), ("embed", "ngram_table")):
            x, y = (nnx.to_pure_dict(gi) for gi in g)
            for key in path:
                x, y = x[key], y[key]
            assert float(jnp.abs(x - y).max()) > 0, path

    def snapshot():  # path -> numpy copy of every parameter and the MoE selection biases
        state = nnx.state(model, nnx.Any(nnx.Param, SelectionBias))
        return {"/".join(map(str, k)): np.array(v[...]) for k, v in nnx.to_flat_state(state)}

    before = snapshot()
    step = nnx.jit(lambda m, o, bt: train_step(m, o, bt, cfg.train.draft_head_weight))
    for i in range(2):
        out = step(model, opt, mtp_batch(512, seed=i))
        assert np.isfinite(float(out["loss"]))
    moved = {n: not np.array_equal(v, before[n]) for n, v in snapshot().items()}
    head = [n for n in moved if n.startswith("draft_head/")]
    target = [n for n in moved if not n.startswith("draft_head/")]
    assert head and target and any(n.endswith("moe/bias") for n in target)
    assert all(moved[n] for n in head if n.endswith("kernel"))  # every head weight matrix trained
    if freeze:
        assert not any(moved[n] for n in target), [n for n in target if moved[n]]
    else:
        assert all(moved[n] for n in target if n.endswith("kernel")), [n for n in target if not moved[n]]
