"""The decoder family: shortcut-connected MoE blocks under a plain | NE | PLE | PLNE input.

One ScMoE block (transformers' ``LongcatFlashDecoderLayer``):
    h1  = h  + Attn_0(RMSNorm(h))
    x   = RMSNorm(h1)
    s   = MoE(x)                      # shortcut branch, same input as the first dense FFN
    h2  = h1 + FFN_0(x)
    h3  = h2 + Attn_1(RMSNorm(h2))
    out = h3 + FFN_1(RMSNorm(h3)) + s
With ``moe.num_experts: 0`` the shortcut branch is absent (a dense model). With PLE/PLNE every
dense FFN is ``W_d(SiLU(W_a x) * e^l)`` with its per-layer embedding slice.

    model = build_model(config, nnx.Rngs(0))
    logits = model(tokens, segment_ids=None, positions=None)   # [B, S, V] float32

Config reaches modules one way: every module a config section describes (token or N-gram embedding,
PLE/PLNE, MLA/GQA attention, MoE) is built from the :class:`ModelConfig` by its
``Cls.from_config(m, *, rngs)``, which reads its section and the model-wide values (vocabulary, width,
EOS, dtypes). Constructors take plain values (or the module's own section) for direct use; building
blocks (Linear, RMSNorm, SwiGLU) take plain values only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ngram_jax.config import Config, ModelConfig
from ngram_jax.layers.attention import build_attention
from ngram_jax.layers.linear import Linear, RMSNorm, amplification_norm, amplify
from ngram_jax.layers.moe import MoE
from ngram_jax.ngram import hashing
from ngram_jax.ngram.embedding import NgramEmbedding
from ngram_jax.ngram.lookup import Table, hashed_tables, token_lookup
from ngram_jax.ngram.ple import PerLayerEmbedding, PerLayerNgramEmbedding, PLEFeedForward
from ngram_jax.sharding import logical_axes


class TokenEmbedding(nnx.Module):
    """Plain embedding table [V, D] (std ``init_std``: the init rule of ``model.embedding``), then the
    same Embedding Amplification as NE (``model.embedding.amplification``)."""

    def __init__(self, vocab_size: int, d_model: int, *, amplification: str = "none", init_std: float = 0.02,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.normal(init_std)
        self.embedding = Table(init(rngs.params(), (vocab_size, d_model), param_dtype),
                               **logical_axes(("vocab_rows", "table_embed")))
        self.norm = amplification_norm(amplification, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.vocab_size, self.dtype, self.amplification = vocab_size, dtype, amplification

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> TokenEmbedding:
        return cls(m.vocab_size, m.d_model, amplification=m.embedding.amplification, init_std=m.embedding.init_std,
                   dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __call__(self, tokens, *, segment_ids=None, history=None):
        del segment_ids, history
        hashing.check_token_ids(tokens, self.vocab_size)
        return self.amplify(token_lookup(self.embedding[...], tokens).astype(self.dtype))

    def amplify(self, e: jax.Array) -> jax.Array:
        """Embedding Amplification (paper section 3) of the looked-up rows e [B, S, D]."""
        return amplify(e, self.amplification, self.norm)


class SwiGLU(nnx.Module):
    """``down( SiLU(gate x) * up x )``."""

    def __init__(self, d_model: int, width: int, *, names=("embed", "mlp"), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = Linear(d_model, width, names, **kw)
        self.up = Linear(d_model, width, names, **kw)
        self.down = Linear(width, d_model, names[::-1], **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = checkpoint_name(jax.nn.silu(self.gate(x)) * self.up(x), "ffn_hidden")  # [B, S, F]
        return self.down(hidden)


class Block(nnx.Module):
    def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        norm = lambda: RMSNorm(m.d_model, eps=m.norm_eps, name="norm", dtype=dt, param_dtype=pdt)  # noqa: E731
        self.attn_norm = nnx.List([norm(), norm()])
        self.ffn_norm = nnx.List([norm(), norm()])
        self.attn = nnx.List([build_attention(m, rngs=rngs) for _ in range(2)])
        if m.ple.kind == "none":
            self.ffn = nnx.List([SwiGLU(m.d_model, m.ffn_dim, **kw) for _ in range(2)])
        else:
            self.ffn = nnx.List([PLEFeedForward(m.d_model, m.ffn_dim, **kw) for _ in range(2)])
        self.moe = MoE.from_config(m, rngs=rngs) if m.moe.num_experts > 0 else None

    def _ffn(self, i: int, x: jax.Array, ple: jax.Array | None) -> jax.Array:
        return self.ffn[i](x) if ple is None else self.ffn[i](x, ple[:, :, i])

    def __call__(self, h, positions, segment_ids, ple=None, caches=None):
        """h [B, S, D]; ple [B, S, 2, F] (this block's two per-layer slices) or None.

        With ``caches`` (one KVCache per attention sublayer) returns ``(h, caches)``."""
        new = []

        def attend(i, h):
            x = checkpoint_name(self.attn_norm[i](h), "attn_in")  # [B, S, D]
            if caches is None:
                return checkpoint_name(self.attn[i](x, positions, segment_ids), "attn_out")
            out, cache = self.attn[i](x, positions, segment_ids, cache=caches[i])
            new.append(cache)
            return out

        h = h + attend(0, h)
        x = checkpoint_name(self.ffn_norm[0](h), "ffn_in")  # [B, S, D]
        mask = None if segment_ids is None else segment_ids != 0  # padding counts in no expert load
        shortcut = checkpoint_name(self.moe(x, token_mask=mask), "moe_out") if self.moe is not None else None
        h = h + self._ffn(0, x, ple)
        h = h + attend(1, h)
        h = h + self._ffn(1, checkpoint_name(self.ffn_norm[1](h), "ffn_in"), ple)
        h = h if shortcut is None else h + shortcut
        return h if caches is None else (h, tuple(new))


class NgramDraftHead(nnx.Module):
    """Speculative-decoding drafter on the N-gram Embedding alone (``model.draft_head: ngram``):
    NE output e_t [B, S, D] -> next-token logits [B, S, V] through RMSNorm, a residual SwiGLU (width
    ``draft_ffn_dim``), RMSNorm and a linear map; no transformer block, no KV cache."""

    def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.norm = RMSNorm(m.d_model, eps=m.norm_eps, name="norm", dtype=dt, param_dtype=pdt)
        self.mlp = SwiGLU(m.d_model, m.draft_ffn_dim, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.out_norm = RMSNorm(m.d_model, eps=m.norm_eps, name="norm", dtype=dt, param_dtype=pdt)
        self.out = Linear(m.d_model, m.vocab_size, ("embed", "vocab"), dtype=dt, param_dtype=pdt,
                          out_dtype=jnp.float32, rngs=rngs)

    def __call__(self, e: jax.Array) -> jax.Array:
        h = e + self.mlp(self.norm(e))
        return self.out(self.out_norm(h))  # float32 logits


class MTPHead(nnx.Module):
    """MTP (NEXTN, DeepSeek-V3 style) draft head (``model.draft_head: mtp``): position t combines the
    target's last hidden state h_t (before its final norm) with the input embedding e_{t+1} of token t+1
    (the target's own embedding, its N-gram Embedding with NE) and predicts token t+2:

        x = W_p [RMSNorm(h_t); RMSNorm(e_{t+1})]                  [B, S, 2D] -> [B, S, D]
        x = x + Attn(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))     one decoder block, its own KV cache
        logits = target output head(RMSNorm(x))                   (Model.mtp_logits)

    Drafting K tokens feeds its own output x back as the next step's h (as MTP heads draft several steps).
    """

    def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        norm = lambda: RMSNorm(m.d_model, eps=m.norm_eps, name="norm", dtype=dt, param_dtype=pdt)  # noqa: E731
        self.hidden_norm, self.embed_norm = norm(), norm()
        self.proj = Linear(2 * m.d_model, m.d_model, (None, "embed"), **kw)
        self.attn_norm, self.ffn_norm, self.out_norm = norm(), norm(), norm()
        self.attn = build_attention(m, rngs=rngs)
        self.ffn = SwiGLU(m.d_model, m.draft_ffn_dim, **kw)

    def __call__(self, hidden: jax.Array, emb: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None, cache=None):
        """hidden, emb [B, S, D] (h_t and e_{t+1} at position t), positions [B, S] -> x [B, S, D] (the
        block's output, before ``out_norm``); with ``cache`` (a KVCache) -> ``(x, cache)``."""
        x = self.proj(jnp.concatenate([self.hidden_norm(hidden), self.embed_norm(emb)], axis=-1))
        if cache is None:
            x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        else:
            a, cache = self.attn(self.attn_norm(x), positions, segment_ids, cache=cache)
            x = x + a
        x = x + self.ffn(self.ffn_norm(x))
        return x if cache is None else (x, cache)


class Model(nnx.Module):
    def __init__(self, m: ModelConfig, *, rngs: nnx.Rngs):
        self.config = m
        dt, pdt = jnp.dtype(m.dtype), jnp.dtype(m.param_dtype)
        self.embed = (NgramEmbedding if m.ngram.enabled else TokenEmbedding).from_config(m, rngs=rngs)
        ple_cls = {"none": None, "ple": PerLayerEmbedding, "plne": PerLayerNgramEmbedding}[m.ple.kind]
        self.ple = ple_cls.from_config(m, rngs=rngs) if ple_cls is not None else None
        self.blocks = nnx.List([Block(m, rngs=rngs) for _ in range(m.num_blocks)])
        self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps, name="norm", dtype=dt, param_dtype=pdt)
        self.lm_head = None if m.tie_embeddings else Linear(m.d_model, m.vocab_size, ("embed", "vocab"), dtype=dt,
                                                            param_dtype=pdt, out_dtype=jnp.float32, rngs=rngs)
        heads = {"none": None, "ngram": NgramDraftHead, "mtp": MTPHead}
        self.draft_head = heads[m.draft_head](m, rngs=rngs) if heads[m.draft_head] is not None else None

    def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: list | None = None, history: jax.Array | None = None,
                 return_hidden: bool = False):
        """tokens int [B, S] -> logits float32 [B, S, V].

        The model computes the n-gram ids of its tokens itself, from what defines their history:
        ``segment_ids`` [B, S] marks packed documents (attention and n-gram history stay inside one,
        and an EOS resets the history); in decoding, ``history`` [B, S, H] (the N-gram cache: the H
        tokens before each position, zeros outside its segment, H >= N-1) replaces it.
        ``positions`` [B, S] default to the offset inside each document. With ``cache`` (see
        :mod:`ngram_jax.generate`) attention reads and extends the KV cache, where ``segment_ids == 0``
        marks padding, and the call returns ``(logits, cache)``. ``return_hidden``: see :meth:`trunk`.
        """
        tokens = jnp.asarray(tokens) if not isinstance(tokens, jax.core.Tracer) else tokens
        hashing.check_token_ids(tokens, self.config.vocab_size)
        if positions is None:
            positions = default_positions(tokens.shape, segment_ids)
        h, ple = self.inputs(tokens, segment_ids=segment_ids, history=history)
        return self.trunk(h, positions, segment_ids, ple, cache, return_hidden)

    def inputs(self, tokens: jax.Array, segment_ids: jax.Array | None = None, history: jax.Array | None = None):
        """The trunk's inputs: the input embedding [B, S, D] and the per-layer embeddings [B, S, L, F] (None
        without PLE/PLNE)."""
        h = self.embed(tokens, segment_ids=segment_ids, history=history)  # [B, S, D]
        ple = None
        if self.ple is not None:
            ple = self.ple(tokens, segment_ids=segment_ids, history=history)  # [B, S, L, F]
        return h, ple

    def draft_logits(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
                     history: jax.Array | None = None) -> jax.Array:
        """The N-gram draft head's next-token logits [B, S, V] from the NE output alone (stop_gradient:
        no gradient of the head reaches the target)."""
        e = self.embed(tokens, segment_ids=segment_ids, history=history)  # [B, S, D]
        return self.draft_head(jax.lax.stop_gradient(e))

    def history_length(self) -> int:
        """Tokens of history the n-gram lookups need (max N - 1; 0 without N-gram tables)."""
        return max([m.layout.max_n - 1 for _, m in hashed_tables(self)] + [0])

    def trunk(self, h: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
              ple: jax.Array | None = None, cache: list | None = None, return_hidden: bool = False):
        """Everything after the input embedding: h [B, S, D] -> logits [B, S, V] (and the cache).
        ``return_hidden``: the last block's output [B, S, D] (before the final norm: the MTP head's input)
        is appended, ``(logits, hidden)`` or ``(logits, cache, hidden)``."""
        if cache is None:
            h = self.hidden(h, positions, segment_ids, ple)
            logits = self.output(self.final_norm(h))
            return (logits, h) if return_hidden else logits
        h, new_cache = self.hidden(h, positions, segment_ids, ple, cache)
        logits = self.output(self.final_norm(h))
        return (logits, new_cache, h) if return_hidden else (logits, new_cache)

    def hidden(self, h: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
               ple: jax.Array | None = None, cache: list | None = None):
        """The blocks: input embedding h [B, S, D] -> the last block's output [B, S, D] (before the final
        norm), or ``(output, cache)`` with ``cache``. Training applies the head itself
        (``train.loss.linear_cross_entropy`` on ``final_norm(output)`` and :meth:`head_weight`)."""
        new_cache = []
        policy = remat_policy(self.config)
        for i, block in enumerate(self.blocks):
            slices = None if ple is None else ple[:, :, 2 * i : 2 * i + 2]
            if cache is None and policy is not None:  # training: recompute the block in the backward pass
                h = nnx.remat(lambda blk, *args: blk(*args), policy=policy)(block, h, positions, segment_ids, slices)
            elif cache is None:
                h = block(h, positions, segment_ids, slices)
            else:
                h, c = block(h, positions, segment_ids, slices, caches=cache[i])
                new_cache.append(c)
        return h if cache is None else (h, new_cache)

    def output(self, h: jax.Array) -> jax.Array:
        """The output head (lm_head, or the tied token table): normalised h [B, S, D] -> logits [B, S, V],
        float32 from compute-dtype operands."""
        w = self.head_weight()
        return jnp.matmul(h.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def head_weight(self) -> jax.Array:
        """The output head's weight [D, V] in the compute dtype (lm_head's kernel, or the tied token table
        transposed): :meth:`output` and the training loss both apply it."""
        dt = jnp.dtype(self.config.dtype)
        if self.lm_head is not None:
            return self.lm_head.kernel[...].astype(dt)
        return self.embed.embedding[...].astype(dt).T

    def mtp_logits(self, x: jax.Array) -> jax.Array:
        """The MTP head's logits [B, S, V] from its block output x [B, S, D]: its own norm, the target's
        output head."""
        return self.output(self.draft_head.out_norm(x))

    def mtp_training_logits(self, hidden: jax.Array, emb: jax.Array, positions: jax.Array,
                            segment_ids: jax.Array | None = None) -> jax.Array:
        """Training: the MTP head over a whole sequence from the target's pass (hidden [B, S, D] from
        :meth:`trunk`, input embeddings emb [B, S, D] from :meth:`inputs`: no second lookup). Position t
        pairs h_t with e_{t+1}; logits [B, S-1, V] for the tokens at t+2."""
        return self.output(self.mtp_training_features(hidden, emb, positions, segment_ids))

    def mtp_training_features(self, hidden: jax.Array, emb: jax.Array, positions: jax.Array,
                              segment_ids: jax.Array | None = None) -> jax.Array:
        """The normalised MTP block output [B, S-1, D] that :meth:`mtp_training_logits` applies the head to."""
        seg = None if segment_ids is None else segment_ids[:, :-1]
        return self.draft_head.out_norm(self.draft_head(hidden[:, :-1], emb[:, 1:], positions[:, :-1], seg))

    def aux_loss(self) -> jax.Array:
        """Sum of the MoE auxiliary losses recorded by the last forward pass (0 without MoE)."""
        return sum((b.moe.aux_loss[...] for b in self.blocks if b.moe is not None), jnp.zeros((), jnp.float32))


def remat_policy(m: ModelConfig):
    """The ``jax.checkpoint`` policy of ``model.remat`` (``None`` for ``none``: no rematerialisation).

    ``block`` saves nothing inside a block (its input is kept as the checkpoint's argument), ``dots``
    saves the outputs of matmuls without batch dimensions (the weight projections; attention scores,
    expert ``ragged_dot`` and elementwise work are recomputed), ``names`` saves the activations tagged
    with the names in ``model.remat_names`` (:data:`ngram_jax.config.REMAT_NAMES`)."""
    if m.remat == "none":
        return None
    if m.remat == "block":
        return jax.checkpoint_policies.nothing_saveable
    if m.remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.save_only_these_names(*m.remat_names)


def default_positions(shape: tuple[int, int], segment_ids: jax.Array | None) -> jax.Array:
    """0, 1, 2, ... restarting at every document start. int32 [B, S]."""
    b, s = shape
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
        return pos
    start = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    return pos - jax.lax.cummax(jnp.where(start, pos, 0), axis=1)


def build_model(config: Config | ModelConfig, rngs: nnx.Rngs) -> Model:
    """Build the model a config describes (a full :class:`Config` or its ``model`` section)."""
    return Model(config.model if isinstance(config, Config) else config, rngs=rngs)
