"""Prefill + incremental decoding with a KV cache and an N-gram cache (SPEC.md section 6).

The N-gram cache keeps, per sequence, the history of the next token: ``x~_{t-1}, x~_{t-2}, ...``
(the last N-1 tokens of its segment, zeros after an EOS). The model takes it as ``history`` and
computes the new token's n-gram ids from it in O(N) instead of a pass over the prefix. Incremental
logits equal a full forward pass over the same tokens.

    python -m ngram_jax.generate --checkpoint runs/train_tiny --prompt "ROMEO:" --max-new-tokens 60
"""

from __future__ import annotations

import argparse
import sys
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


def prefill(model: Model, tokens: jax.Array, segment_ids: jax.Array, max_len: int) -> tuple[jax.Array, DecodeState]:
    """Run the (left-padded) prompts; returns the last position's logits [B, V] and the decode state."""
    hashing.check_token_ids(tokens, model.config.vocab_size)
    positions = default_positions(tokens.shape, segment_ids)
    kv = init_kv(model, tokens.shape[0], max_len)
    logits, kv = model(tokens, segment_ids=segment_ids, positions=positions, cache=kv)
    history = prefill_history(tokens, segment_ids, model.config.eos_id, max(model.history_length(), 1))
    return logits[:, -1], DecodeState(kv, history, positions[:, -1] + 1)


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


def frozen(fn, model: Model, static_argnums: tuple[int, ...] = ()):
    """``fn(model, *args)`` jitted over a fixed model, for inference: the parameters are inputs only.

    ``nnx.jit`` returns every variable of the model as an output (it cannot know which ones the call
    changed), and XLA copies each one per call: for decoding that is a full copy of the N-gram tables
    per generated token. Here the model state is split once and the call's mutations (e.g. routing
    statistics) are dropped, so nothing is copied.
    """
    graphdef, state = nnx.split(model)

    def call(st, *args):
        return fn(nnx.merge(graphdef, st), *args)

    jitted = jax.jit(call, static_argnums=tuple(i + 1 for i in static_argnums))
    return lambda *args: jitted(state, *args)


def generate(model: Model, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """Continue each prompt by up to ``max_new_tokens`` tokens (stops a row at EOS when asked)."""
    tokens, seg = left_pad(prompts)
    prefill_fn = frozen(prefill, model, static_argnums=(2,))
    step_fn = frozen(decode_step, model)
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


DRAFT_CHOICES = ("prompt_lookup", "model", "ngram")


def check_draft_config(target_cfg, draft_cfg, where: str) -> None:
    """A draft checkpoint must share the target's vocabulary and tokenizer (CheckpointError otherwise)."""
    from ngram_jax.errors import CheckpointError

    if draft_cfg.model.vocab_size != target_cfg.model.vocab_size or draft_cfg.model.eos_id != target_cfg.model.eos_id:
        raise CheckpointError(f"--draft-checkpoint {where}: vocabulary {draft_cfg.model.vocab_size} (eos "
                              f"{draft_cfg.model.eos_id}) differs from the target's {target_cfg.model.vocab_size} "
                              f"(eos {target_cfg.model.eos_id}); train the draft with the target's tokenizer")
    from ngram_jax.data.prepare import read_metadata

    def token_hash(cfg):
        try:
            return read_metadata(cfg.data.path).get("tokenizer_hash")
        except FileNotFoundError:
            return None

    a, b = token_hash(target_cfg), token_hash(draft_cfg)
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"--draft-checkpoint {where}: trained with another tokenizer (hash {b}, data "
                              f"{draft_cfg.data.path}) than the target (hash {a}, data {target_cfg.data.path}); "
                              "train the draft on data prepared with the target's tokenizer")


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory (or its checkpoints directory)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run's training data)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    spec = ap.add_argument_group("speculative decoding (greedy output equals plain greedy decoding)")
    spec.add_argument("--draft", choices=DRAFT_CHOICES, help="drafter: prompt_lookup (training-free), model "
                      "(a smaller checkpoint with the same tokenizer, --draft-checkpoint) or ngram (the target's "
                      "N-gram Embedding through its draft head, model.draft_head=ngram)")
    spec.add_argument("--draft-checkpoint", help="run directory of the draft model (--draft model)")
    spec.add_argument("--num-draft", type=int, default=4, help="K, draft tokens per verification pass")
    spec.add_argument("--early-reject", type=float, default=None, metavar="THRESHOLD",
                      help="drop draft tokens whose probability under the target's N-gram draft head is below "
                      "THRESHOLD (truncating the draft) before verification")
    spec.add_argument("--max-len", type=int, default=None,
                      help="positions of the decoding state (KV cache, token table); default: what the request needs")
    spec.add_argument("--stats", action="store_true", help="print acceptance rate, accepted tokens per verification "
                      "and tokens/s (with the drafter's calls and proposed / accepted tokens)")
    args = ap.parse_args(argv)
    if args.draft is None and (args.draft_checkpoint or args.stats or args.max_len is not None
                               or args.early_reject is not None):
        ap.error("--draft-checkpoint, --early-reject, --max-len and --stats need --draft")
    if args.early_reject is not None and not 0 < args.early_reject < 1:
        ap.error(f"--early-reject {args.early_reject} must be in (0, 1) (a probability threshold)")
    if args.draft == "model" and not args.draft_checkpoint:
        ap.error("--draft model needs --draft-checkpoint RUN (a smaller run trained with the same tokenizer)")
    if args.draft_checkpoint and args.draft != "model":
        ap.error(f"--draft-checkpoint is only used with --draft model, not --draft {args.draft}")
    if args.draft is not None and args.num_draft < 1:
        ap.error(f"--num-draft {args.num_draft} must be >= 1 (draft tokens per verification)")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        ap.error(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k < 0:
        ap.error(f"--top-k {args.top_k} must be >= 0 (0: no top-k filter)")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p {args.top_p} must be in (0, 1]")
    if not args.prompt:
        ap.error("--prompt is empty: give at least one character to continue")
    from pathlib import Path

    from ngram_jax.checkpoint import find_checkpoints, restore_model
    from ngram_jax.data.prepare import check_tokenizer
    from ngram_jax.data.tokenizer import load_tokenizer

    find_checkpoints(args.checkpoint)  # a missing run directory fails before JAX starts restoring
    if args.draft_checkpoint:
        find_checkpoints(args.draft_checkpoint)
    if args.tokenizer is not None:
        tok = load_tokenizer(args.tokenizer)
    if args.draft is not None:  # every check before any weights are read or anything compiles
        from ngram_jax.checkpoint import read_config

        cfg = read_config(args.checkpoint, args.step)
        if (args.draft == "ngram" or args.early_reject is not None) and cfg.model.draft_head != "ngram":
            from ngram_jax.errors import UsageError

            what = "--draft ngram" if args.draft == "ngram" else "--early-reject"
            raise UsageError(f"{what} needs the target's N-gram draft head, and {args.checkpoint} was trained "
                             f"with model.draft_head={cfg.model.draft_head}; train it with model.draft_head=ngram")
        if args.draft_checkpoint:
            check_draft_config(cfg, read_config(args.draft_checkpoint), args.draft_checkpoint)
        if args.tokenizer is None:
            tok = load_tokenizer(Path(cfg.data.path) / "tokenizer.json")
        from ngram_jax.speculative import check_request

        max_new = check_request([len(tok.encode(args.prompt, add_special_tokens=False).ids)], args.max_new_tokens,
                                args.num_draft, args.max_len)
    model, cfg = restore_model(args.checkpoint, args.step)
    if args.tokenizer is None:
        tok = load_tokenizer(Path(cfg.data.path) / "tokenizer.json")
    elif (Path(cfg.data.path) / "metadata.json").is_file():
        check_tokenizer(tok, cfg.data.path, what=f"--tokenizer {args.tokenizer}")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        from ngram_jax.errors import DataError

        raise DataError(f"--tokenizer {args.tokenizer}: {tok.get_vocab_size()} tokens, more than the model's "
                        f"vocabulary (model.vocab_size={cfg.model.vocab_size}); use the run's tokenizer")
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    if args.draft is not None:
        import time

        from ngram_jax import speculative as spec_mod

        draft_model = restore_model(args.draft_checkpoint)[0] if args.draft_checkpoint else None
        drafter = spec_mod.make_drafter(args.draft, model, draft_model)
        kw = dict(drafter=drafter, num_draft=args.num_draft, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, max_len=args.max_len, early_reject=args.early_reject,
                  compiled={})
        spec_mod.speculative_generate(model, [ids], max_new, **kw)  # compiles (not timed)
        t0 = time.perf_counter()
        (new,), st = spec_mod.speculative_generate(model, [ids], max_new, **kw)
        seconds = time.perf_counter() - t0
        print(args.prompt + tok.decode(new))
        if args.stats:
            print(spec_mod.format_stats(st, len(new), seconds, args.draft, args.num_draft))
        return 0
    (new,) = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    from ngram_jax import cli

    sys.exit(cli.run(main))
