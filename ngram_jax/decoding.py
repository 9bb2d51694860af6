"""Prefill + incremental decoding with a KV cache and an N-gram cache (paper section 6; docs/DECODING.md); the command
line is :mod:`ngram_jax.generate`, speculative decoding :mod:`ngram_jax.speculative`.

The N-gram cache keeps, per sequence, the history of the next token: ``x~_{t-1}, x~_{t-2}, ...``
(the last N-1 tokens of its segment, zeros after an EOS). The model takes it as ``history`` and
computes the new token's n-gram ids from it in O(N) instead of a pass over the prefix. Incremental
logits equal a full forward pass over the same tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngram_jax.model import Model, default_positions
from ngram_jax.ngram import hashing


class DecodeState(NamedTuple):
    kv: list  # per block: (KVCache, KVCache)
    history: jax.Array  # int32 [B, H]: n-gram history of the next token (H = max N - 1)
    positions: jax.Array  # int32 [B]: position of the next token


def prefill_history(tokens: jax.Array, segment_ids: jax.Array, eos_id: int | None, length: int) -> jax.Array:
    """History of the token that follows ``tokens`` [B, P] (same segment as the last one). [B, length]."""
    ext = jnp.concatenate([tokens, jnp.zeros_like(tokens[:, :1])], axis=1)
    seg = jnp.concatenate([segment_ids, segment_ids[:, -1:]], axis=1)
    return hashing.history(ext, length + 1, eos_id, seg)[:, -1]


def advance_history(history: jax.Array, token: jax.Array, eos_id: int | None) -> jax.Array:
    """Push ``token`` [B] onto the history; after an EOS the next token starts with zero history."""
    pushed = jnp.concatenate([token[:, None], history[:, :-1]], axis=1)
    if eos_id is None:
        return pushed
    return jnp.where((token == eos_id)[:, None], 0, pushed)


def left_pad(prompts: Sequence[Sequence[int]], pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tokens and segment ids [B, P]: prompts right-aligned, padding (segment 0) on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad, np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        seg[i, width - len(p):] = 1
    return tokens, seg


def init_kv(model: Model, batch: int, max_len: int) -> list:
    dtype = jnp.dtype(model.config.dtype)
    return [tuple(a.empty_cache(batch, max_len, dtype) for a in block.attn) for block in model.blocks]


def prefill(model: Model, tokens: jax.Array, segment_ids: jax.Array, max_len: int, return_hidden: bool = False):
    """Run the (left-padded) prompts; returns the last position's logits [B, V] and the decode state.

    ``return_hidden``: a third element ``(emb, hidden)``, the input embeddings and the last block's
    outputs of every prompt position, [B, P, D] each (what an MTP draft head reads)."""
    hashing.check_token_ids(tokens, model.config.vocab_size)
    positions = default_positions(tokens.shape, segment_ids)
    kv = init_kv(model, tokens.shape[0], max_len)
    emb, ple = model.inputs(tokens, segment_ids=segment_ids)
    logits, kv, hidden = model.trunk(emb, positions, segment_ids, ple, kv, return_hidden=True)
    history = prefill_history(tokens, segment_ids, model.config.eos_id, max(model.history_length(), 1))
    state = DecodeState(kv, history, positions[:, -1] + 1)
    return (logits[:, -1], state, (emb, hidden)) if return_hidden else (logits[:, -1], state)


def decode_step(model: Model, token: jax.Array, state: DecodeState) -> tuple[jax.Array, DecodeState]:
    """Feed one token per sequence [B]; returns its logits [B, V] and the advanced state."""
    logits, kv = model(token[:, None], segment_ids=jnp.ones_like(token)[:, None], positions=state.positions[:, None],
                       cache=state.kv, history=state.history[:, None])
    history = advance_history(state.history, token, model.config.eos_id)
    return logits[:, 0], DecodeState(kv, history, state.positions + 1)


def reorder(state: DecodeState, indices: jax.Array) -> DecodeState:
    """Select / reorder sequences (beam search, dropping finished rows): KV and N-gram caches move together."""
    take = lambda x: x[indices] if x.ndim >= 1 else x  # noqa: E731 (the shared write index stays)
    return DecodeState(jax.tree.map(take, state.kv), state.history[indices], state.positions[indices])


def filter_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Temperature, then top-k, then nucleus (top-p) filtering: logits [..., V] with -inf where cut.

    Requires ``temperature > 0``. The distribution :func:`sample` draws from is ``softmax`` of this."""
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        keep_sorted = jnp.cumsum(probs, axis=-1) - probs < top_p  # always keeps the most likely token
        rank = jnp.argsort(order, axis=-1)  # inverse permutation
        logits = jnp.where(jnp.take_along_axis(keep_sorted, rank, axis=-1), logits, -jnp.inf)
    return logits


def sample(logits: jax.Array, key: jax.Array, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
    """Greedy when ``temperature == 0``; otherwise temperature, top-k and nucleus (top-p) sampling. [B]."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p), axis=-1).astype(jnp.int32)


def frozen(fn, model: Model, static_argnums: tuple[int, ...] = (), donate_argnums: tuple[int, ...] = ()):
    """``fn(model, *args)`` jitted over a fixed model, for inference: the parameters are inputs only.
    ``donate_argnums`` (positions in ``args``) are donated: pass the decode state, which the caller
    replaces by the returned one, and the KV cache is updated in place instead of held twice.

    ``nnx.jit`` returns every variable of the model as an output (it cannot know which ones the call
    changed), and XLA copies each one per call: for decoding that is a full copy of the N-gram tables
    per generated token. Here the model state is split once and the call's mutations (e.g. routing
    statistics) are dropped, so nothing is copied.
    """
    graphdef, state = nnx.split(model)

    def call(st, *args):
        return fn(nnx.merge(graphdef, st), *args)

    jitted = jax.jit(call, static_argnums=tuple(i + 1 for i in static_argnums),
                     donate_argnums=tuple(i + 1 for i in donate_argnums))
    return lambda *args: jitted(state, *args)


def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (stops a row at EOS when asked)."""
    tokens, seg = left_pad(prompts)
    prefill_fn = frozen(prefill, model, static_argnums=(2,))
    step_fn = frozen(decode_step, model, donate_argnums=(1,))  # the state: one KV cache, updated in place
    sample_fn = jax.jit(sample, static_argnums=(2, 3, 4))
    logits, state = prefill_fn(jnp.asarray(tokens), jnp.asarray(seg), tokens.shape[1] + max_new_tokens)
    key = jax.random.key(seed)
    out = [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    eos = model.config.eos_id
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        nxt = sample_fn(logits, sub, temperature, top_k, top_p)
        for i, t in enumerate(np.asarray(nxt)):
            if not done[i]:
                out[i].append(int(t))
                done[i] = stop_at_eos and eos is not None and int(t) == eos
        if done.all():
            break
        logits, state = step_fn(nxt, state)
    return out
