"""N-gram Embedding (NE), SPEC.md section 1.

    e_t = ( E0[x_t] + sum_idx E_idx[h_idx(t)] @ W_idx ) / (1 + T),   then amplification

The T = K*(N-1) sub-tables live in ONE flattened parameter ``[sum(M_idx), d_e]`` (row offsets are
static prefix sums) and the projections in one stacked parameter ``[T, d_e, D]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from ngram_jax.config import ModelConfig
from ngram_jax.ngram import hashing
from ngram_jax.ngram.hashing import NgramLayout
from ngram_jax.sharding import lookup_rows

AMPLIFICATIONS = ("none", "sqrt_d", "layernorm")


def row_width(width: int, layout: NgramLayout) -> int:
    """d_e = width // T, with a clear error when T does not divide the width."""
    t = layout.num_tables
    if width % t:
        raise ValueError(
            f"embedding width {width} is not divisible by K*(N-1) = {layout.splits}*({layout.max_n}-1) = {t}"
        )
    return width // t


def fuse(base: jax.Array, rows: jax.Array, proj: jax.Array) -> jax.Array:
    """Mean fusion. base [..., D], rows [..., T, d_e], proj [T, d_e, D] -> [..., D]."""
    t = proj.shape[0]
    projected = jnp.einsum("...te,ted->...d", rows, proj)
    return (base + projected) / (1 + t)


class NgramEmbedding(nnx.Module):
    """Token embedding plus hashed n-gram embeddings of orders 2..N with K hashes each."""

    def __init__(self, vocab_size: int, d_model: int, *, max_n: int, splits: int, ratio: float,
                 eos_id: int | None, amplification: str = "none", init_std: float = 0.02,
                 row_multiple: int = 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if amplification not in AMPLIFICATIONS:
            raise ValueError(f"amplification must be one of {AMPLIFICATIONS}, got {amplification!r}")
        self.layout = hashing.make_layout(vocab_size, max_n, splits, ratio, row_multiple)
        self.vocab_size, self.d_model, self.eos_id = vocab_size, d_model, eos_id
        self.amplification, self.dtype = amplification, dtype
        t = self.layout.num_tables
        d_e = row_width(d_model, self.layout)
        normal = nnx.initializers.normal(init_std)
        self.embedding = nnx.Param(normal(rngs.params(), (vocab_size, d_model), param_dtype),
                                   out_sharding=("vocab_rows", "table_embed"))  # [V, D]
        self.ngram_table = nnx.Param(normal(rngs.params(), (self.layout.padded_rows, d_e), param_dtype),
                                     out_sharding=("ngram_rows", "ngram_dim"))  # [sum M, d_e]
        proj_init = nnx.initializers.normal(1.0 / math.sqrt(d_e))  # keeps a projected row at init_std
        self.ngram_proj = nnx.Param(proj_init(rngs.params(), (t, d_e, d_model), param_dtype),
                                    out_sharding=("ngram_tables", "ngram_dim", "embed"))  # [T, d_e, D]
        self.norm = (nnx.LayerNorm(d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                     if amplification == "layernorm" else None)

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> NgramEmbedding:
        n = m.ngram
        return cls(m.vocab_size, m.d_model, max_n=n.max_n, splits=n.splits, ratio=n.ratio, eos_id=m.eos_id,
                   amplification=n.amplification, init_std=n.init_std, row_multiple=n.row_multiple,
                   dtype=jnp.dtype(m.dtype),
                   param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def ngram_ids(self, tokens: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """Per-sub-table ids. tokens [B, S] -> int32 [B, S, T]."""
        lay = self.layout
        return hashing.ngram_ids(tokens, vocab_size=lay.vocab_size, table_sizes=lay.table_sizes,
                                 max_n=lay.max_n, splits=lay.splits, eos_id=self.eos_id,
                                 segment_ids=segment_ids)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 ngram_ids: jax.Array | None = None) -> jax.Array:
        """tokens int [B, S] (and optional precomputed ids [B, S, T]) -> embeddings [B, S, D]."""
        hashing.check_token_ids(tokens, self.vocab_size)
        if ngram_ids is None:
            ngram_ids = self.ngram_ids(tokens, segment_ids)
        rows = hashing.flat_row_ids(ngram_ids, self.layout.row_offsets)  # [B, S, T]
        base = lookup_rows(self.embedding[...].astype(self.dtype), tokens, "vocab_rows")  # [B, S, D]
        gathered = lookup_rows(self.ngram_table[...].astype(self.dtype), rows)  # [B, S, T, d_e]
        e = fuse(base, gathered, self.ngram_proj[...].astype(self.dtype))
        return amplify(e, self.amplification, self.norm)


def amplify(e: jax.Array, mode: str, norm: nnx.LayerNorm | None) -> jax.Array:
    """Embedding Amplification (paper section 3): none | sqrt_d (times sqrt(D)) | layernorm."""
    if mode == "sqrt_d":
        return e * jnp.asarray(math.sqrt(e.shape[-1]), e.dtype)
    if mode == "layernorm":
        return norm(e)
    return e

