"""Attention: LongCat-Flash MLA and a plain GQA variant, causal and packed-segment aware.

MLA (as transformers' ``LongcatFlashMLA``):
    q      = q_b( RMSNorm(q_a x) )                  -> [B, S, H, nope + rope], times sqrt(D / q_lora_rank)
    c, kr  = split( kv_a x )                         latent [B, S, kv_lora_rank], shared rope key [B, S, rope]
    c      = RMSNorm(c) * sqrt(D / kv_lora_rank)
    k_nope, v = split( kv_b c )                      [B, S, H, nope], [B, S, H, v]
    rope (interleaved pairs) on q's rope part and kr; k = [k_nope, kr]; softmax scale (nope+rope)^-1/2
Both use :func:`causal_attention`: causal, never across documents, in query blocks that skip most of the
scores above the diagonal.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ngram_jax.backend import target_backend
from ngram_jax.config import AttentionConfig, ModelConfig
from ngram_jax.layers.linear import Linear, RMSNorm
from ngram_jax.layers.rope import apply_rope, inv_frequencies, yarn_attention_factor, yarn_mscale

# Causal attention in query blocks: block j of the queries scores only the keys up to its own end, so the
# scores above the diagonal that every full-width formulation computes and masks are mostly never formed.
# With n blocks the score and value matmuls do (n + 1) / 2n of the full work (n = 4: 62.5%). Blocks of
# fewer than MIN_QUERY_BLOCK queries saved nothing more on XLA:CPU (8x128 and 8x256 tokens): per-op overhead.
MAX_QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 64


def query_blocks(seq: int) -> int:
    """How many query blocks :func:`causal_attention` cuts a sequence of ``seq`` into (a divisor of it)."""
    n = 1
    while n * 2 <= MAX_QUERY_BLOCKS and seq % (n * 2) == 0 and seq // (n * 2) >= MIN_QUERY_BLOCK:
        n *= 2
    return n


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Softmax attention where ``mask`` allows: q [B, t, H, Dq], k [B, S, Hk, Dq], v [B, S, Hk, Dv],
    mask bool [B, t, S] (every query row allows at least one key) -> [B, t, H, Dv] in q's dtype.

    Query heads are grouped over the key heads (GQA: H = G * Hk). Scores and softmax in float32, the
    probabilities in v's dtype (as ``jax.nn.dot_product_attention``); V keeps its own head size."""
    b, t, h, dq = q.shape
    hk = k.shape[2]
    qg = q.reshape(b, t, hk, h // hk, dq)  # [B, t, Hk, G, Dq]
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)  # [B, Hk, G, t, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, scale: float,
                     blocks: int | None = None) -> jax.Array:
    """Causal attention that never crosses documents: q [B, S, H, Dq], k [B, S, Hk, Dq], v [B, S, Hk, Dv],
    segment_ids int [B, S] or None (one document per row) -> [B, S, H, Dv].

    The queries are cut into ``blocks`` (default :func:`query_blocks`) pieces; piece j attends to the
    keys of pieces 0..j only."""
    b, s = q.shape[:2]
    n = query_blocks(s) if blocks is None else blocks
    if s % n:
        raise ValueError(f"{n} query blocks do not divide a sequence of {s}")
    c = s // n
    pos = jnp.arange(s)
    outs = []
    for j in range(n):
        lo, hi = j * c, (j + 1) * c
        mask = pos[lo:hi, None] >= pos[None, :hi]  # [c, hi]
        if segment_ids is None:
            mask = jnp.broadcast_to(mask, (b, c, hi))
        else:
            mask = mask & (segment_ids[:, lo:hi, None] == segment_ids[:, None, :hi])  # [B, c, hi]
        outs.append(masked_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask, scale))
    return outs[0] if n == 1 else jnp.concatenate(outs, axis=1)


class KVCache(NamedTuple):
    """Keys and values of one attention sublayer for incremental decoding."""

    k: jax.Array  # [B, S_max, Hk, Dq]
    v: jax.Array  # [B, S_max, Hk, Dv]
    valid: jax.Array  # bool [B, S_max]: slots holding a real (non-padding) token
    index: jax.Array  # int32 [] (shared) or [B] (per row): slot of the next token written


def empty_cache(batch: int, max_len: int, heads: int, qk_dim: int, v_dim: int, dtype) -> KVCache:
    return KVCache(jnp.zeros((batch, max_len, heads, qk_dim), dtype), jnp.zeros((batch, max_len, heads, v_dim), dtype),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def _attend_cached(q, k, v, new_valid, cache: KVCache, scale: float) -> tuple[jax.Array, KVCache]:
    """Write the new keys/values at ``cache.index`` and attend over every valid earlier slot.

    q [B, t, H, Dq], k [B, t, Hk, Dq], v [B, t, Hk, Dv], new_valid bool [B, t] (False: padding).
    A per-row index [B] (speculative decoding, where rows commit different numbers of tokens) writes
    each row at its own slot; slots at or after a row's index are never read before being rewritten,
    so moving the index back is the whole rollback.
    """
    i = cache.index
    if i.ndim == 0:
        k_all = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), (0, i, 0, 0))
        v_all = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), (0, i, 0, 0))
        valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, i))
    else:
        row = jax.vmap(lambda c, x, j: jax.lax.dynamic_update_slice(c, x, (j,) + (0,) * (c.ndim - 1)))
        k_all = row(cache.k, k.astype(cache.k.dtype), i)
        v_all = row(cache.v, v.astype(cache.v.dtype), i)
        valid = row(cache.valid, new_valid, i)
    t, s_max = q.shape[1], cache.k.shape[1]
    q_slot = jnp.reshape(i, (-1, 1, 1)) + jnp.arange(t)[None, :, None]  # [1 or B, t, 1]
    k_slot = jnp.arange(s_max)[None, None, :]  # [1, 1, S]
    mask = (valid[:, None, :] & (k_slot <= q_slot)) | (k_slot == q_slot)  # [B, t, S]; padding sees itself
    out = masked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask, scale)
    return out, KVCache(k_all, v_all, valid, i + t)


def rope_frequencies(cfg: AttentionConfig, dim: int):
    """Inverse RoPE frequencies [dim // 2] (a cached numpy constant, not module state)."""
    return inv_frequencies(dim, cfg.rope_theta, cfg.yarn_factor, cfg.yarn_original_max_position,
                           cfg.yarn_beta_fast, cfg.yarn_beta_slow)


SPLASH_MIN_SEQ = 1024  # kernel auto: splash attention for sequences at least this long (a multiple of 128)


def attention_kernel(name: str, seq: int) -> str:
    """What ``model.attention.kernel`` means for a sequence of ``seq``: ``auto`` is ``splash`` when compiling
    for TPU (``ngram_jax.backend.target_backend``) a sequence of >= SPLASH_MIN_SEQ tokens that 128 divides,
    ``xla`` (:func:`causal_attention`) otherwise."""
    if name == "auto":
        return "splash" if target_backend() == "tpu" and seq >= SPLASH_MIN_SEQ and seq % 128 == 0 else "xla"
    return name


def splash_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None,
                            scale: float) -> jax.Array:
    """:func:`causal_attention` by JAX's TPU splash attention kernel (``jax.experimental.pallas.ops.tpu.
    splash_attention``: flash attention with a block-sparse causal mask, its own backward kernels; nothing of
    size S x S is kept). q [B, S, H, Dq], k [B, S, Hk, Dq], v [B, S, Hk, Dv] (Dq and Dv may differ: MLA's 192
    and 128), segment_ids [B, S] -> [B, S, H, Dv]. On a mesh it runs per device inside ``shard_map`` (batch
    over the batch axes, heads over the head axes); off TPU in the Pallas interpreter."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
    from jax.sharding import PartitionSpec as P

    from ngram_jax.sharding import current_mesh, live_axes

    b, s, h, _ = q.shape
    if s % 128:
        raise ValueError(f"splash attention needs a sequence length divisible by 128, got {s}; set "
                         "model.attention.kernel=xla")
    if k.shape[2] != h:  # GQA: every query head its own key and value head
        k, v = (jnp.repeat(t, h // k.shape[2], axis=2) for t in (k, v))
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    interpret = target_backend() != "tpu"

    def local(q, k, v, seg):  # [b, S, h, D] on one device
        n = min(512, s)
        sizes = splash.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n, block_kv_dkv=n,
                                  block_kv_dkv_compute=n, block_q_dq=n, block_kv_dq=n)
        kernel = splash.make_splash_mha(masks.MultiHeadMask([masks.CausalMask((s, s))] * q.shape[2]),
                                        block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)

        def one(q, k, v, sg):  # the kernel takes [H, S, D] of one sequence
            out = kernel((q * scale).astype(k.dtype).swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1),
                         segment_ids=splash.SegmentIds(sg, sg))
            return out.swapaxes(0, 1)

        return jax.vmap(one)(q, k, v, seg)

    mesh = current_mesh()
    if mesh is None:
        return local(q, k, v, seg).astype(q.dtype)
    bx, hx = live_axes(mesh, "batch") or None, live_axes(mesh, "heads") or None
    spec = P(bx, None, hx, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(bx, None)), out_specs=spec,
                         check_vma=False)(q, k, v, seg).astype(q.dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, scale: float,
            kernel: str = "auto") -> jax.Array:
    """Causal attention (``model.attention.kernel``, :func:`attention_kernel`), with q, k, v tagged ``qkv`` and
    the output ``attn_ctx`` for ``model.remat=names``."""
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    if attention_kernel(kernel, q.shape[1]) == "splash":
        return checkpoint_name(splash_causal_attention(q, k, v, segment_ids, scale), "attn_ctx")
    return checkpoint_name(causal_attention(q, k, v, segment_ids, scale), "attn_ctx")


class MLA(nnx.Module):
    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs):
        return cls(m.attention, m.d_model, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __init__(self, cfg: AttentionConfig, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        h, nope, rope, dv = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if cfg.q_lora_rank > 0:
            self.q_a = Linear(d_model, cfg.q_lora_rank, ("embed", "q_lora_up"), **kw)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=1e-6, name="norm", dtype=dtype, param_dtype=param_dtype)
            self.q_b = Linear(cfg.q_lora_rank, h * (nope + rope), ("q_lora", "heads"), **kw)
            self.q_scale = math.sqrt(d_model / cfg.q_lora_rank)
        else:
            self.q_a = self.q_a_norm = None
            self.q_b = Linear(d_model, h * (nope + rope), ("embed", "heads"), **kw)
            self.q_scale = 1.0
        self.kv_a = Linear(d_model, cfg.kv_lora_rank + rope, ("embed", "kv_lora_up"), **kw)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, eps=1e-6, name="norm", dtype=dtype, param_dtype=param_dtype)
        self.kv_b = Linear(cfg.kv_lora_rank, h * (nope + dv), ("kv_lora", "heads"), **kw)
        self.o = Linear(h * dv, d_model, ("heads", "embed"), **kw)
        self.kv_scale = math.sqrt(d_model / cfg.kv_lora_rank)
        self.rope_dim = rope
        self.rope_scale = yarn_attention_factor(cfg.yarn_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
        self.softmax_scale = (nope + rope) ** -0.5 * yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None):
        """x [B, S, D], positions int [B, S] -> [B, S, D]; with a ``cache`` -> (out, cache), where
        ``segment_ids`` == 0 marks padding."""
        b, s, _ = x.shape
        q, k, v = self._qkv(x, positions)
        if cache is not None:
            valid = jnp.ones((b, s), bool) if segment_ids is None else segment_ids != 0
            out, cache = _attend_cached(q, k, v, valid, cache, self.softmax_scale)
            return self.o(out.reshape(b, s, -1)), cache
        out = _attend(q, k, v, segment_ids, self.softmax_scale, self.cfg.kernel)
        return self.o(out.reshape(b, s, -1))

    def _qkv(self, x: jax.Array, positions: jax.Array):
        """q [B, S, H, nope+rope], k [B, S, H, nope+rope], v [B, S, H, v]."""
        c = self.cfg
        b, s, _ = x.shape
        h, nope, rope = c.num_heads, c.qk_nope_head_dim, c.qk_rope_head_dim
        q_in = self.q_a_norm(self.q_a(x)) if self.q_a is not None else x
        q = (self.q_b(q_in) * self.q_scale).reshape(b, s, h, nope + rope)  # [B, S, H, nope+rope]
        kv = self.kv_a(x)  # [B, S, kv_lora + rope]
        latent = self.kv_a_norm(kv[..., : c.kv_lora_rank]) * self.kv_scale  # [B, S, kv_lora]
        rot = lambda t: apply_rope(t, positions, rope_frequencies(c, self.rope_dim), self.rope_scale)  # noqa: E731
        k_rope = rot(kv[..., None, c.kv_lora_rank :])  # [B, S, 1, rope]
        kv_b = self.kv_b(latent).reshape(b, s, h, nope + c.v_head_dim)
        k_nope, v = kv_b[..., :nope], kv_b[..., nope:]
        q = jnp.concatenate([q[..., :nope], rot(q[..., nope:])], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, s, h, rope))], axis=-1)
        return q, k, v

    def empty_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        c = self.cfg
        return empty_cache(batch, max_len, c.num_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim, dtype)


class GQA(nnx.Module):
    """Grouped-query attention with rotary embeddings (interleaved pairs) on the full head."""

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs):
        return cls(m.attention, m.d_model, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __init__(self, cfg: AttentionConfig, d_model: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.cfg = cfg
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = Linear(d_model, h * hd, ("embed", "heads"), **kw)
        self.k = Linear(d_model, kvh * hd, ("embed", "kv_heads"), **kw)
        self.v = Linear(d_model, kvh * hd, ("embed", "kv_heads"), **kw)
        self.o = Linear(h * hd, d_model, ("heads", "embed"), **kw)
        self.rope_dim = hd
        self.rope_scale = yarn_attention_factor(cfg.yarn_factor, cfg.yarn_mscale, cfg.yarn_mscale_all_dim)
        self.softmax_scale = hd**-0.5 * yarn_mscale(cfg.yarn_factor, cfg.yarn_mscale_all_dim) ** 2

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None = None,
                 cache: KVCache | None = None):
        c = self.cfg
        b, s, _ = x.shape
        rot = lambda t: apply_rope(t, positions, rope_frequencies(c, self.rope_dim), self.rope_scale)  # noqa: E731
        q = rot(self.q(x).reshape(b, s, c.num_heads, c.head_dim))
        k = rot(self.k(x).reshape(b, s, c.num_kv_heads, c.head_dim))
        v = self.v(x).reshape(b, s, c.num_kv_heads, c.head_dim)
        if cache is not None:
            valid = jnp.ones((b, s), bool) if segment_ids is None else segment_ids != 0
            out, cache = _attend_cached(q, k, v, valid, cache, self.softmax_scale)
            return self.o(out.reshape(b, s, -1)), cache
        out = _attend(q, k, v, segment_ids, self.softmax_scale, c.kernel)
        return self.o(out.reshape(b, s, c.num_heads * c.head_dim))

    def empty_cache(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        c = self.cfg
        return empty_cache(batch, max_len, c.num_kv_heads, c.head_dim, c.head_dim, dtype)


def build_attention(m: ModelConfig, *, rngs: nnx.Rngs) -> MLA | GQA:
    """The attention sublayer ``model.attention.kind`` describes."""
    return (MLA if m.attention.kind == "mla" else GQA).from_config(m, rngs=rngs)
