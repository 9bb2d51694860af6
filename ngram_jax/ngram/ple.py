"""Per-Layer Embeddings (PLE) and Per-Layer N-gram Embeddings (PLNE) (the paper, section 5).

Each dense FFN layer l owns an embedding ``e^l(x_t)`` of width F that replaces the up-projection
branch of its SwiGLU:  ``FFN^l(x) = W_d^l( SiLU(W_a^l x) * e^l_t )``.

All layers' tables sit side by side in one parameter (``[V, L*F]`` for the token part,
``[sum(M), L*d_e]`` for the n-gram part), so ONE gather per table serves every layer; the layer
loop only slices ``[B, S, L, F]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ngram_jax.config import ModelConfig
from ngram_jax.ngram import hashing
from ngram_jax.ngram.lookup import HashedTables, Table, token_lookup
from ngram_jax.sharding import logical_axes


def ffn_layers(m: ModelConfig) -> int:
    """Dense FFN layers that own a per-layer embedding: 2 per ScMoE block."""
    return 2 * m.num_blocks


class PerLayerEmbedding(nnx.Module):
    """Plain per-layer token embeddings: tokens [B, S] -> [B, S, L, F]."""

    def __init__(self, vocab_size: int, num_layers: int, width: int, *, init_std: float = 1.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.vocab_size, self.num_layers, self.width, self.dtype = vocab_size, num_layers, width, dtype
        init = nnx.initializers.normal(init_std)
        self.embedding = Table(init(rngs.params(), (vocab_size, num_layers * width), param_dtype),
                               **logical_axes(("vocab_rows", "ple_embed")))  # [V, L*F]

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> PerLayerEmbedding:
        return cls(m.vocab_size, ffn_layers(m), m.ffn_dim, init_std=m.ple.init_std,
                   dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 history: jax.Array | None = None) -> jax.Array:
        del segment_ids, history  # same call signature as PerLayerNgramEmbedding
        hashing.check_token_ids(tokens, self.vocab_size)
        e = token_lookup(self.embedding[...], tokens).astype(self.dtype)  # [B, S, L*F]
        return e.reshape(*tokens.shape, self.num_layers, self.width)


class PerLayerNgramEmbedding(HashedTables):
    """Per-layer N-gram Embeddings: layer-specific tables and projections, one gather for all layers."""

    def __init__(self, vocab_size: int, num_layers: int, width: int, *, max_n: int, splits: int,
                 ratio: float, eos_id: int | None, init_std: float = 1.0, row_multiple: int = 1,
                 kernel: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(vocab_size, width, layers=num_layers, max_n=max_n, splits=splits, ratio=ratio,
                         eos_id=eos_id, init_std=init_std, row_multiple=row_multiple, kernel=kernel,
                         kernel_key="model.ple.kernel", embed_names=("vocab_rows", "ple_embed"),
                         proj_names=("layers", "ngram_tables", "ngram_dim", "mlp"), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.num_layers = num_layers

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> PerLayerNgramEmbedding:
        p = m.ple
        return cls(m.vocab_size, ffn_layers(m), m.ffn_dim, max_n=p.max_n, splits=p.splits, ratio=p.ratio,
                   eos_id=m.eos_id, init_std=p.init_std, row_multiple=p.row_multiple, kernel=p.kernel,
                   dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 history: jax.Array | None = None) -> jax.Array:
        """tokens [B, S] -> per-layer embeddings [B, S, L, F]."""
        return self.lookup(tokens, segment_ids=segment_ids, history=history)


class PLEFeedForward(nnx.Module):
    """``W_d( SiLU(W_a x) * e )``: a SwiGLU whose up-projection is the per-layer embedding e."""

    def __init__(self, d_model: int, width: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.dtype = dtype
        init = nnx.initializers.lecun_normal()
        self.w_a = nnx.Param(init(rngs.params(), (d_model, width), param_dtype),
                             **logical_axes(("embed", "mlp")))  # [D, F]
        self.w_d = nnx.Param(init(rngs.params(), (width, d_model), param_dtype),
                             **logical_axes(("mlp", "embed")))  # [F, D]

    def __call__(self, x: jax.Array, e: jax.Array) -> jax.Array:
        """x [B, S, D], e [B, S, F] (one layer's slice) -> [B, S, D]."""
        x = x.astype(self.dtype)
        gate = jax.nn.silu(x @ self.w_a[...].astype(self.dtype))
        hidden = checkpoint_name(gate * e.astype(self.dtype), "ffn_hidden")  # [B, S, F]
        return hidden @ self.w_d[...].astype(self.dtype)
