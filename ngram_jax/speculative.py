"""Speculative decoding (paper section 6; docs/DECODING.md): draft K tokens, verify them with one
target pass over K+1 positions, accept a prefix, all inside one jitted ``lax.while_loop``.

Decoding state per sequence slot (:class:`SpecState`):
- ``table`` int32 [B, S_max]: the token at every position (left-padded prompts, then generated and
  draft tokens), ``length`` [B]: committed positions (padding included), ``start`` [B]: first real one.
- The n-gram history of any position is read from the table (the H tokens before it inside its
  segment, reset after an EOS, :func:`table_history`), so a draft token written at ``length + i`` has
  exactly the context a verified token would have. The model computes n-gram ids from that history
  through its one lookup path (``Model.__call__(..., history=...)``).
- The target's KV cache keeps a per-row write index equal to ``length - 1``: the last committed
  token is fed again, with the K drafts, by the next verification. Rejection is a length update:
  table, target KV cache and the draft model's KV cache roll back by moving a pointer; stale slots
  after it are never read before they are rewritten.

Acceptance: greedy accepts while the draft equals the target's argmax, then emits the target's
token (output identical to plain greedy decoding); sampling uses speculative rejection sampling
(accept with min(1, p/q), else draw from normalise(max(0, p - q)); a bonus token from p when all K
are accepted), after temperature / top-k / top-p on both p and q, so the output follows the target.

Drafters: ``prompt_lookup`` (the continuation of the latest earlier match of the last 1..3 tokens),
``model`` (a smaller checkpoint with the same vocabulary, its own KV cache rolled back by length),
``ngram`` (the target's N-gram Embedding output alone through its draft head, ``model.draft_head:
ngram``; the NE outputs it computes are reused by verification), ``mtp`` (the target's one-block MTP /
NEXTN head, ``model.draft_head: mtp``, on the target's last hidden state and the target's N-gram
Embedding of the next token; its own KV cache rolled back by length; the NE outputs it computes are
reused by verification, and verification's by the head). Early rejection (any drafter) truncates
the draft at the first token the N-gram draft head scores below a threshold and verifies only the
surviving positions.

    outs, stats = speculative_generate(model, prompts, 64, drafter=ModelDrafter(draft), num_draft=4)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngram_jax.decoding import filter_logits, left_pad, prefill
from ngram_jax.model import Model, default_positions
from ngram_jax.ngram import hashing

DRAFTERS = ("prompt_lookup", "model", "ngram", "mtp")
# verify_steps: target verification passes; draft_calls: drafter forward passes (a prompt lookup counts
# one per round); proposed: draft tokens drafted; verified: those left after early rejection (sent to
# verification); accepted: those the target accepted. Summed over the rows still decoding.
STAT_NAMES = ("verify_steps", "draft_calls", "proposed", "verified", "accepted")


class SpecState(NamedTuple):
    table: jax.Array  # int32 [B, S_max]: token per position
    length: jax.Array  # int32 [B]: committed positions (left padding included)
    start: jax.Array  # int32 [B]: first real position of the row (left padding before it)
    done: jax.Array  # bool [B]: EOS emitted or the token budget reached
    kv: list  # target KV cache, per-row index == length - 1
    draft: Any  # drafter state (e.g. the draft model's KV cache)
    key: jax.Array
    stats: jax.Array  # int32 [5]: STAT_NAMES, summed over the rows still decoding


def history_size(model: Model) -> int:
    """History columns the decoding state computes (max N - 1, at least 1 as in prefill)."""
    return max(model.history_length(), 1)


def table_history(table: jax.Array, start: jax.Array, first: jax.Array, t: int, h: int,
                  eos_id: int | None) -> jax.Array:
    """N-gram history of positions ``first + 0..t-1`` read from the token table. int32 [B, t, h].

    table [B, S_max], start [B] (first real position), first [B]. Positions before ``start`` (padding)
    are outside the segment; an EOS resets the history (as :func:`ngram_jax.ngram.hashing.history`,
    which computes it over a window of the h tokens before ``first`` and the t positions)."""
    idx = first[:, None] - h + jnp.arange(h + t, dtype=jnp.int32)[None, :]  # [B, h+t]
    tok = jnp.take_along_axis(table, jnp.maximum(idx, 0), axis=1)
    seg = (idx >= start[:, None]).astype(jnp.int32)  # 0: padding or before the table
    return hashing.history(tok, h + 1, eos_id, seg)[:, h:]  # [B, t, h]


def window(table: jax.Array, first: jax.Array, t: int) -> jax.Array:
    """Tokens at positions ``first + 0..t-1``. int32 [B, t]."""
    return jnp.take_along_axis(table, first[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :], axis=1)


def write(table: jax.Array, first: jax.Array, tokens: jax.Array) -> jax.Array:
    """Write tokens [B, t] at positions ``first + 0..t-1`` of each row."""
    return jax.vmap(lambda row, x, j: jax.lax.dynamic_update_slice(row, x, (j,)))(table, tokens, first)


def set_index(kv: list, index: jax.Array) -> list:
    """Every KV cache of a model with its write index set to ``index`` [B] (the rollback)."""
    return [tuple(c._replace(index=index) for c in block) for block in kv]


def run_model(model: Model, table, start, first, t, kv):
    """The model over positions ``first + 0..t-1`` of the table, with its KV cache written from slot
    ``first``; the n-gram history comes from the table. Returns logits [B, t, V] and the cache."""
    tokens = window(table, first, t)
    positions = first[:, None] - start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    hist = None
    if model.history_length() > 0:
        hist = table_history(table, start, first, t, history_size(model), model.config.eos_id)
    return model(tokens, segment_ids=jnp.ones_like(tokens), positions=positions, cache=set_index(kv, first),
                 history=hist)


def per_row_index(kv: list, index: jax.Array) -> list:
    """A prefilled cache (shared index) turned into one with a per-row index [B]."""
    return set_index(kv, index)


# ----------------------------------------------------------------------------------------------
# Drafters. The protocol (models[0]: the target, then the drafter's own models, ``models()``):
# - ``init(models, tokens, seg, max_len, k, prompt)``: the drafter's state after the prefill of the
#   left-padded prompts tokens/seg [B, P]; ``prompt`` = (emb, hidden) [B, P, D]: the target's input
#   embeddings and last hidden states of the prompt positions (:func:`ngram_jax.decoding.prefill`).
# - ``propose(models, state, table, length, start, k, key, sampling)``: K draft tokens from the table,
#   a :class:`Proposal`.
# - ``verified(state, ver, first)``: the state after a verification pass (:class:`Verified`) over the
#   positions ``first + 0..t-1``, before the next ``propose``.


class Proposal(NamedTuple):
    drafts: jax.Array  # int32 [B, K]
    q: jax.Array | None  # draft logits [B, K, V] (filtered like p), None: deterministic (q = one-hot)
    state: Any  # the drafter's state for the next round
    calls: int  # drafter forward passes (a prompt lookup counts one)
    embeddings: jax.Array | None = None  # target NE output [B, K, D] of positions length-1 .. length+K-2
    head_logits: jax.Array | None = None  # N-gram draft head logits [B, K, V] at those positions


def _pick(logits: jax.Array, key: jax.Array, sampling):
    """Draft token [B] and the filtered logits [B, V] it was drawn from (argmax when greedy)."""
    if sampling is None:
        return jnp.argmax(logits, -1).astype(jnp.int32), logits
    f = filter_logits(logits, *sampling)
    return jax.random.categorical(key, f, axis=-1).astype(jnp.int32), f


class PromptLookup:
    """Training-free drafter: find the latest earlier occurrence of the last ``m`` committed tokens
    (m = max_ngram .. 1, longest first) and propose what followed it (periodically continued when
    the match ends less than K tokens before the end). No match: the last token repeated."""

    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3):
        self.max_ngram = max_ngram

    def models(self) -> tuple:
        return ()

    def init(self, models, tokens, seg, max_len, k, prompt):
        return ()

    def verified(self, dstate, ver, first):
        return dstate

    def propose(self, models, dstate, table, length, start, k, key, sampling):
        s_max = table.shape[1]
        pos = jnp.arange(s_max, dtype=jnp.int32)[None, :]  # [1, S]
        last = length - 1  # [B]
        best = jnp.full(length.shape, -1, jnp.int32)
        for m in range(1, self.max_ngram + 1):  # longer matches override shorter ones
            ok = (pos < last[:, None]) & (pos - m + 1 >= start[:, None])  # candidate end j < last
            for i in range(m):
                suffix = jnp.take_along_axis(table, jnp.maximum(last - i, 0)[:, None], axis=1)  # [B, 1]
                prev = jnp.take_along_axis(table, jnp.maximum(pos - i, 0).repeat(table.shape[0], 0), axis=1)
                ok = ok & (prev == suffix)
            ok = ok & (last - m + 1 >= start)[:, None]
            j = jnp.max(jnp.where(ok, pos, -1), axis=1)  # latest match
            best = jnp.where(j >= 0, j, best)
        period = jnp.maximum(last - best, 1)[:, None]  # [B, 1]
        offs = best[:, None] + 1 + jnp.arange(k, dtype=jnp.int32)[None, :] % period  # [B, K]
        drafts = jnp.where(best[:, None] >= 0, jnp.take_along_axis(table, jnp.maximum(offs, 0), axis=1),
                           jnp.take_along_axis(table, last[:, None], axis=1))
        return Proposal(drafts.astype(jnp.int32), None, dstate, 1)


class ModelDrafter:
    """A separate, smaller model with the same vocabulary drafts K tokens autoregressively.

    Its KV cache has a per-row index; each round re-feeds the last two committed tokens (one of them
    may be missing from its cache after a full acceptance) and then its own drafts, so a rejected
    draft is rolled back by the index alone."""

    name = "model"

    def __init__(self, draft: Model):
        self.draft = draft

    def models(self) -> tuple:
        return (self.draft,)

    def init(self, models, tokens, seg, max_len, k, prompt):
        draft = models[1]
        _, st = prefill(draft, tokens, seg, max_len)
        return per_row_index(st.kv, jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32))

    def verified(self, dstate, ver, first):
        return dstate

    def propose(self, models, dstate, table, length, start, k, key, sampling):
        draft = models[1]
        keys = jax.random.split(key, k)
        logits, kv = run_model(draft, table, start, length - 2, 2, dstate)
        tok, q = _pick(logits[:, -1], keys[0], sampling)
        table = write(table, length, tok[:, None])
        drafts, qs = [tok], [q]
        for i in range(1, k):  # K is small and static: unrolled
            logits, kv = run_model(draft, table, start, length + i - 1, 1, kv)
            tok, q = _pick(logits[:, 0], keys[i], sampling)
            table = write(table, length + i, tok[:, None])
            drafts.append(tok)
            qs.append(q)
        q = None if sampling is None else jnp.stack(qs, axis=1)
        return Proposal(jnp.stack(drafts, axis=1), q, kv, k)


def ngram_embeddings(target: Model, table, start, first, t) -> jax.Array:
    """The target's input embedding (NE output) of positions ``first + 0..t-1``, the history read from
    the table. [B, t, D]"""
    hist = table_history(table, start, first, t, history_size(target), target.config.eos_id)
    return target.embed(window(table, first, t), history=hist)


def ngram_head_logits(target: Model, table, start, first, t) -> jax.Array:
    """The target's N-gram draft head over positions ``first + 0..t-1`` (NE lookup with the history
    from the table, no transformer block): logits [B, t, V] for the positions after them."""
    hist = table_history(table, start, first, t, history_size(target), target.config.eos_id)
    return target.draft_logits(window(table, first, t), history=hist)


class Verified(NamedTuple):
    """A verification pass over t positions (the last committed token and t-1 drafts)."""

    logits: jax.Array  # [B, t, V]
    kv: list  # the target's KV cache, written from slot ``length - 1``
    hidden: jax.Array  # [B, t, D]: the last block's outputs (before the final norm; the MTP head reads them)
    embeddings: jax.Array  # [B, t, D]: the input embeddings (NE outputs) the pass used


def verify(target: Model, table, start, length, t: int, kv, embeddings: jax.Array | None = None) -> Verified:
    """The target over positions ``length-1 .. length+t-2`` (the last committed token and t-1 drafts),
    its KV cache written from slot ``length - 1``.

    ``embeddings`` [B, >= t-1, D]: input embeddings of the first positions computed while drafting (the
    NE cache); only the positions past them are looked up, then the trunk runs on the lot. (Per-layer
    embeddings, PLE/PLNE, are looked up for every position.)"""
    first = length - 1
    have = 0 if embeddings is None else min(embeddings.shape[1], t)
    parts = [] if embeddings is None else [embeddings[:, :have]]
    if have < t:
        parts.append(ngram_embeddings(target, table, start, first + have, t - have))
    h = jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]  # [B, t, D]
    ple = None
    if target.ple is not None:
        hist = table_history(table, start, first, t, history_size(target), target.config.eos_id)
        ple = target.ple(window(table, first, t), history=hist)
    positions = first[:, None] - start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    logits, kv, hidden = target.trunk(h, positions, jnp.ones(h.shape[:2], jnp.int32), ple, set_index(kv, first),
                                      return_hidden=True)
    return Verified(logits, kv, hidden, h)


class NgramDrafter:
    """N-gram Embedding based drafting (the paper's open direction): the target's NE output alone,
    through its trained draft head (``model.draft_head: ngram``), proposes each next token; one NE
    lookup and one small head per draft token, no transformer block and no KV cache.

    ``cache_embeddings`` (the paper's second optimization): the NE outputs computed while drafting (the
    last committed token and the first K-1 drafts) are handed to verification, which then looks up only
    the last draft: one lookup per token instead of two."""

    name = "ngram"
    head = "ngram"  # the target's draft head it needs (model.draft_head)

    def __init__(self, cache_embeddings: bool = True):
        self.cache_embeddings = cache_embeddings
        self.name = "ngram" if cache_embeddings else "ngram_nocache"

    def models(self) -> tuple:
        return ()

    def init(self, models, tokens, seg, max_len, k, prompt):
        return ()

    def verified(self, dstate, ver, first):
        return dstate

    def propose(self, models, dstate, table, length, start, k, key, sampling):
        target = models[0]
        keys = jax.random.split(key, k)
        drafts, qs, embs, heads = [], [], [], []
        for i in range(k):
            e = ngram_embeddings(target, table, start, length - 1 + i, 1)  # [B, 1, D]
            logits = target.draft_head(e)[:, 0]
            tok, q = _pick(logits, keys[i], sampling)
            table = write(table, length + i, tok[:, None])
            drafts.append(tok)
            qs.append(q)
            embs.append(e)
            heads.append(logits)
        q = None if sampling is None else jnp.stack(qs, axis=1)
        emb = jnp.concatenate(embs, axis=1) if self.cache_embeddings else None
        return Proposal(jnp.stack(drafts, axis=1), q, dstate, k, emb, jnp.stack(heads, axis=1))


class MTPState(NamedTuple):
    """The MTP drafter's state between rounds."""

    kv: Any  # KVCache of the head's attention, per-row index
    hidden: jax.Array  # [B, K+1, D]: the target's last hidden states of positions first + 0..K (last verification)
    embeddings: jax.Array  # [B, K+1, D]: the target's input embeddings of those positions
    first: jax.Array  # int32 [B]


class MTPDrafter:
    """The target's MTP (NEXTN) draft head (``model.draft_head: mtp``) drafts K tokens autoregressively.

    Head position t reads (h_t, e_{t+1}) and predicts token t+2. Each round, with L committed tokens:
    1. the head runs over the positions of the last verification (``first = L_prev - 1`` .. ``+K``) with the
       target's hidden states from that pass, so its KV cache holds, for every committed position, what
       training computes (true hidden states, not its own drafts'); the output at position L-2 (the
       last one with a committed hidden state) predicts draft 1. The positions after it are stale and
       rewritten below: rejection is a length update (the cache's per-row write index), nothing else.
    2. drafts 2..K: each step feeds the head's own output as the next position's h, with e of the draft
       just made, one position at a time.
    Its e_{t+1} are the target's input embeddings (its N-gram Embedding, the one lookup path): the ones
    of accepted drafts come from the last verification; only the newly committed token (L-1) and the
    drafts 1..K-1 are looked up. ``cache_embeddings`` (the NE-embedding cache): those K embeddings go to
    verification, which then looks up only the last draft, one lookup per token."""

    name = "mtp"
    head = "mtp"  # the target's draft head it needs (model.draft_head)

    def __init__(self, cache_embeddings: bool = True):
        self.cache_embeddings = cache_embeddings
        self.name = "mtp" if cache_embeddings else "mtp_nocache"

    def models(self) -> tuple:
        return ()

    def init(self, models, tokens, seg, max_len, k, prompt):
        target = models[0]
        head, (emb, hidden) = target.draft_head, prompt
        b, p = tokens.shape
        kv = head.attn.empty_cache(b, max_len, jnp.dtype(target.config.dtype))
        if p > 1:  # positions 0..P-2: (h_t, e_{t+1}) from the prefill, padding marked by seg
            positions = default_positions(tokens.shape, seg)
            _, kv = head(hidden[:, :-1], emb[:, 1:], positions[:, :-1], seg[:, :-1], cache=kv)
        kv = kv._replace(index=jnp.full((b,), p - 1, jnp.int32))
        buf = jnp.zeros((b, k + 1, hidden.shape[-1]), hidden.dtype)  # [B, K+1, D]
        # position P-1 (first) has a committed hidden state; its e_P is looked up by the first propose
        return MTPState(kv, buf.at[:, 0].set(hidden[:, -1]), jnp.zeros_like(buf), jnp.full((b,), p - 1, jnp.int32))

    def verified(self, dstate, ver, first):
        return dstate._replace(hidden=ver.hidden, embeddings=ver.embeddings, first=first)

    def propose(self, models, dstate, table, length, start, k, key, sampling):
        target = models[0]
        head = target.draft_head
        keys = jax.random.split(key, k)
        b, w = dstate.hidden.shape[:2]  # w = K + 1
        j = jnp.arange(w, dtype=jnp.int32)[None, :]  # [1, K+1]
        a = length - 2 - dstate.first  # [B]: index of position L-2 in the window (drafts accepted last round)
        fresh = ngram_embeddings(target, table, start, length - 1, 1)  # [B, 1, D]: the token just committed
        e_next = jnp.concatenate([dstate.embeddings[:, 1:], fresh], axis=1)  # e of positions first + 1 + j
        e_next = jnp.where((j == a[:, None])[..., None], fresh, e_next)
        ones = jnp.ones((b, w), jnp.int32)
        x, kv = head(dstate.hidden, e_next, dstate.first[:, None] - start[:, None] + j, ones,
                     cache=dstate.kv._replace(index=dstate.first))
        x = jnp.take_along_axis(x, a[:, None, None], axis=1)  # [B, 1, D]: the head at position L-2
        drafts, qs, embs = [], [], [fresh]
        for i in range(k):  # K is small and static: unrolled
            if i > 0:  # the head at position L-2+i: its own output as h, e of draft i-1
                e = ngram_embeddings(target, table, start, length - 1 + i, 1)
                embs.append(e)
                pos = (length - 2 + i - start)[:, None]
                x, kv = head(x, e, pos, ones[:, :1], cache=kv._replace(index=length - 2 + i))
            tok, q = _pick(target.mtp_logits(x)[:, 0], keys[i], sampling)
            table = write(table, length + i, tok[:, None])
            drafts.append(tok)
            qs.append(q)
        q = None if sampling is None else jnp.stack(qs, axis=1)
        emb = jnp.concatenate(embs, axis=1) if self.cache_embeddings else None  # positions L-1 .. L+K-2
        return Proposal(jnp.stack(drafts, axis=1), q, dstate._replace(kv=kv), k, emb)


def early_reject_limit(target: Model, table, start, length, drafts, q_logits, threshold: float,
                       head_logits: jax.Array | None = None):
    """Early rejection with the N-gram Embedding: score each draft token under the target's N-gram
    draft head (softmax probability given the committed tokens and the drafts before it) and truncate
    the draft before the first one scoring below ``threshold``. Returns the usable draft count [B]
    and, for sampling, the draft logits restricted to the tokens that pass ([B, K, V]; None stays
    None): drawing from that restricted q keeps rejection sampling exact. ``head_logits``: the head's
    logits when the drafter computed them already (the N-gram drafter)."""
    k = drafts.shape[1]
    if head_logits is None:
        head_logits = ngram_head_logits(target, table, start, length - 1, k)
    probs = jax.nn.softmax(head_logits, axis=-1)  # [B, K, V]
    keep = probs >= threshold
    ok = jnp.take_along_axis(keep, drafts[..., None], axis=-1)[..., 0]  # [B, K]
    limit = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    if q_logits is not None:
        q_logits = jnp.where(keep, q_logits, -jnp.inf)
    return limit, q_logits


# ----------------------------------------------------------------------------------------------
# Acceptance


def accept_greedy(logits: jax.Array, drafts: jax.Array, limit: jax.Array):
    """logits [B, K+1, V], drafts [B, K], limit [B] (usable drafts) -> accepted count [B], next token [B]."""
    target = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, K+1]
    k = drafts.shape[1]
    ok = (drafts == target[:, :k]) & (jnp.arange(k)[None, :] < limit[:, None])
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)
    return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]


def accept_sampling(logits, drafts, q_logits, limit, key, sampling):
    """Speculative rejection sampling. p from the target logits [B, K+1, V]; q from the draft logits
    [B, K, V] (filtered), or one-hot on the drafts when None. Returns accepted count [B], next token [B]."""
    b, k = drafts.shape
    p = jax.nn.softmax(filter_logits(logits, *sampling), axis=-1)  # [B, K+1, V]
    if q_logits is None:
        q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)
    else:
        q = jax.nn.softmax(q_logits, axis=-1)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]  # [B, K]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    k_u, k_s = jax.random.split(key)
    u = jax.random.uniform(k_u, (b, k))
    ok = (u * q_d < p_d) & (jnp.arange(k)[None, :] < limit[:, None])  # u < p/q, without dividing
    a = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)  # [B]
    q_pad = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)  # [B, K+1, V]: q = 0 past the drafts
    # a truncated draft (a == limit < K) is not a rejection: its next token comes from p alone
    q_at = jnp.where((a < limit)[:, None], jnp.take_along_axis(q_pad, a[:, None, None], axis=1)[:, 0], 0.0)
    p_at = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]  # [B, V]
    resid = jnp.maximum(p_at - q_at, 0.0)
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_at)
    nxt = jax.random.categorical(k_s, jnp.log(resid), axis=-1).astype(jnp.int32)
    return a, nxt


# ----------------------------------------------------------------------------------------------
# The loop


def _decode(load, tokens, seg, key, *, drafter, k: int, max_new: int, s_max: int, sampling, eos_id,
            stop_at_eos: bool, reject_below: float | None = None):
    """The whole speculative decode as one traced program. tokens/seg [B, P] (left-padded).

    ``load()`` -> (target, draft models): merged afresh in every traced scope, so a module's writes to
    its own state (e.g. MoE routing statistics) stay inside the trace that makes them and are dropped."""
    target, dmodels = load()
    b, p = tokens.shape
    logits0, st, prompt = prefill(target, tokens, seg, s_max, return_hidden=True)
    key, sub = jax.random.split(key)
    if sampling is None:
        first = jnp.argmax(logits0, -1).astype(jnp.int32)
    else:
        first = jax.random.categorical(sub, filter_logits(logits0, *sampling), axis=-1).astype(jnp.int32)
    table = jnp.zeros((b, s_max), jnp.int32).at[:, :p].set(tokens).at[:, p].set(first)
    start = jnp.argmax(seg != 0, axis=1).astype(jnp.int32)
    length = jnp.full((b,), p + 1, jnp.int32)
    done = (max_new <= 1) | ((first == eos_id) if (stop_at_eos and eos_id is not None) else jnp.zeros((b,), bool))
    state = SpecState(table, length, start, done, per_row_index(st.kv, length - 1),
                      drafter.init((target, *dmodels), tokens, seg, s_max, k, prompt), key,
                      jnp.zeros((len(STAT_NAMES),), jnp.int32))

    def body(s: SpecState) -> SpecState:
        target, dmodels = load()
        key, k_draft, k_acc = jax.random.split(s.key, 3)
        prop = drafter.propose((target, *dmodels), s.draft, s.table, s.length, s.start, k, k_draft, sampling)
        drafts, q, emb = prop.drafts, prop.q, prop.embeddings
        table = write(s.table, s.length, drafts)
        if reject_below is None:
            limit = jnp.full((b,), k, jnp.int32)
            ver = verify(target, table, s.start, s.length, k + 1, s.kv, emb)  # logits [B, K+1, V]
        else:  # verify only as many positions as the longest surviving draft needs
            limit, q = early_reject_limit(target, table, s.start, s.length, drafts, q, reject_below,
                                          prop.head_logits)
            width = jnp.max(jnp.where(s.done, 0, limit)) + 1

            def verify_width(t):
                def run(table, kv):  # a branch is its own trace: merge the target afresh inside it
                    v = verify(load()[0], table, s.start, s.length, t, kv, emb)
                    pad = lambda x: jnp.pad(x, ((0, 0), (0, k + 1 - t), (0, 0)))  # noqa: E731
                    return Verified(pad(v.logits), v.kv, pad(v.hidden), pad(v.embeddings))
                return run

            ver = jax.lax.switch(width - 1, [verify_width(t) for t in range(1, k + 2)], table, s.kv)
        logits, kv = ver.logits, ver.kv
        if sampling is None:
            a, nxt = accept_greedy(logits, drafts, limit)
        else:
            a, nxt = accept_sampling(logits, drafts, q, limit, k_acc, sampling)
        a = jnp.where(s.done, 0, a)
        table = jnp.where(s.done[:, None], s.table, write(table, s.length + a, nxt[:, None]))
        new_len = jnp.where(s.done, s.length, s.length + a + 1)
        # stop: an EOS among the tokens committed now (inside the budget), or the budget reached
        pos = jnp.arange(s_max, dtype=jnp.int32)[None, :]
        fresh = (pos >= s.length[:, None]) & (pos < new_len[:, None]) & (pos < p + max_new)
        hit = jnp.any(fresh & (table == eos_id), axis=1) if (stop_at_eos and eos_id is not None) else False
        done = s.done | hit | (new_len >= p + max_new)
        live = (~s.done).astype(jnp.int32)
        stats = s.stats + jnp.stack([jnp.any(~s.done).astype(jnp.int32), prop.calls * jnp.any(~s.done),
                                     jnp.sum(live * k), jnp.sum(live * limit), jnp.sum(a)])
        dstate = drafter.verified(prop.state, ver, s.length - 1)
        return SpecState(table, new_len, s.start, done, set_index(kv, new_len - 1), dstate, key, stats)

    state = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, state)
    return state.table, state.length, state.stats


_DEFAULT_DRAFTER = PromptLookup()  # one instance: the compiled-program cache keys on the drafter


def check_request(prompt_lengths: Sequence[int], max_new_tokens: int, num_draft: int,
                  max_len: int | None = None) -> int:
    """Refuse a request that cannot run, before any compilation; returns the tokens to generate.

    ``max_len``: positions of the decoding state (token table and KV caches); None sizes it to the
    request. A verification pass writes K + 1 positions after the committed ones, so a row needs
    ``prompt + new + K + 2`` positions; with a fixed ``max_len`` generation stops at the context limit."""
    from ngram_jax.errors import UsageError

    if num_draft < 1:
        raise UsageError(f"--num-draft {num_draft} must be >= 1 (draft tokens per verification)")
    if max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {max_new_tokens} must be >= 1")
    longest = max(prompt_lengths)
    if max_len is None:
        return max_new_tokens
    if longest + 2 > max_len:
        raise UsageError(f"the prompt has {longest} tokens, longer than the cache allows (--max-len {max_len} "
                         f"holds prompts of up to {max_len - 2}); shorten the prompt or raise --max-len")
    room = max_len - longest - 2
    if num_draft > room - 1:
        raise UsageError(f"--num-draft {num_draft} is larger than the remaining context ({room - 1} positions "
                         f"after a {longest}-token prompt with --max-len {max_len}); lower --num-draft")
    return min(max_new_tokens, room - num_draft)


def speculative_generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                         drafter=None, num_draft: int = 4, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True,
                         early_reject: float | None = None,
                         max_len: int | None = None, compiled: dict | None = None
                         ) -> tuple[list[list[int]], dict[str, int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens with speculative decoding.

    Returns the new tokens of each prompt (cut after the first EOS when ``stop_at_eos``) and the stats
    (:data:`STAT_NAMES`: ``verify_steps``, ``draft_calls``, ``proposed``, ``verified``, ``accepted``).
    ``early_reject``: probability threshold under the N-gram draft head (needs ``model.draft_head``).
    ``compiled``: a dict reused across calls to keep the compiled program. ``num_draft=0`` is plain
    decoding (one token per target pass) in the same jitted loop: the baseline of benchmarks/speculative.py."""
    if num_draft > 0:
        max_new_tokens = check_request([len(p) for p in prompts], max_new_tokens, num_draft, max_len)
    drafter = drafter if drafter is not None and num_draft > 0 else _DEFAULT_DRAFTER
    tokens, seg = left_pad(prompts)
    s_max = max_len if max_len is not None else tokens.shape[1] + max_new_tokens + num_draft + 2
    sampling = None if temperature <= 0 else (float(temperature), int(top_k), float(top_p))
    eos = model.config.eos_id
    if early_reject is not None and num_draft > 0 and model.config.draft_head != "ngram":
        from ngram_jax.errors import UsageError

        raise UsageError("early rejection scores drafts with the N-gram draft head: the target has none "
                         "(train it with model.draft_head=ngram)")
    need = getattr(drafter, "head", None)
    if need is not None and model.config.draft_head != need:
        from ngram_jax.errors import UsageError

        raise UsageError(f"the {drafter.name} drafter needs the target's {need} draft head, and the target has "
                         f"model.draft_head={model.config.draft_head}; train it with model.draft_head={need}")
    reject = early_reject if num_draft > 0 else None
    sig = (drafter.name, id(drafter), num_draft, max_new_tokens, s_max, sampling, stop_at_eos, reject, tokens.shape)
    cache = compiled if compiled is not None else {}
    if sig not in cache:
        graphdef, params = nnx.split(nnx.List([model, *drafter.models()]))  # parameters are inputs only

        def fn(st, tok, sg, key):
            def load():
                ms = nnx.merge(graphdef, jax.tree.map(lambda x: x, st))  # fresh Variables in this trace
                return ms[0], tuple(ms[i] for i in range(1, len(ms)))

            return _decode(load, tok, sg, key, drafter=drafter, k=num_draft, max_new=max_new_tokens, s_max=s_max,
                           sampling=sampling, eos_id=eos, stop_at_eos=stop_at_eos, reject_below=reject)

        jitted = jax.jit(fn)
        cache[sig] = lambda *a: jitted(params, *a)
    table, length, stats = cache[sig](jnp.asarray(tokens), jnp.asarray(seg), jax.random.key(seed))
    table, length = np.asarray(table), np.asarray(length)
    p = tokens.shape[1]
    outs = []
    for i in range(len(prompts)):
        new = table[i, p : min(int(length[i]), p + max_new_tokens)].tolist()
        if stop_at_eos and eos is not None and eos in new:
            new = new[: new.index(eos) + 1]
        outs.append(new)
    return outs, dict(zip(STAT_NAMES, (int(x) for x in np.asarray(stats)), strict=True))


def make_drafter(name: str, target: Model, draft: Model | None = None):
    """The drafter ``--draft name`` selects (``model`` needs the draft model)."""
    if name == "prompt_lookup":
        return PromptLookup()
    if name in ("ngram", "mtp"):
        if target.config.draft_head != name:
            raise ValueError(f"--draft {name} needs a target trained with model.draft_head={name}")
        return NgramDrafter() if name == "ngram" else MTPDrafter()
    if name == "model":
        if draft is None:
            raise ValueError("--draft model needs a draft model (--draft-checkpoint)")
        return ModelDrafter(draft)
    raise ValueError(f"unknown drafter {name!r}; choose one of {', '.join(DRAFTERS)}")


def format_stats(st: dict[str, int], new_tokens: int, seconds: float, drafter: str, k: int) -> str:
    """One line: drafter, acceptance rate (accepted / verified drafts), mean accepted drafts per
    verification, tokens/s, and the raw counts."""
    rate = st["accepted"] / max(st["verified"], 1)
    per = st["accepted"] / max(st["verify_steps"], 1)
    return (f"drafter={drafter} K={k} acceptance={rate:.3f} accepted_per_verification={per:.2f} "
            f"tokens_per_s={new_tokens / seconds:.1f} verify_steps={st['verify_steps']} "
            f"draft_calls={st['draft_calls']} proposed={st['proposed']} verified={st['verified']} "
            f"accepted={st['accepted']}")
