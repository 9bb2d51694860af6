"""N-gram Embedding (NE) (the paper, section 3; docs/API.md).

    e_t = ( E0[x_t] + sum_idx E_idx[h_idx(t)] @ W_idx ) / (1 + T),   then amplification

The T = K*(N-1) sub-tables live in ONE flattened :class:`~ngram_jax.ngram.lookup.NgramTable`
``[sum(M_idx), d_e]`` (row offsets are static prefix sums) and the projections in one stacked
parameter ``[T, d_e, D]``; the lookup itself is :class:`~ngram_jax.ngram.lookup.HashedTables`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ngram_jax.config import ModelConfig
from ngram_jax.layers.linear import AMPLIFICATIONS, amplification_norm, amplify
from ngram_jax.ngram.lookup import HashedTables

__all__ = ["AMPLIFICATIONS", "NgramEmbedding"]


class NgramEmbedding(HashedTables):
    """Token embedding plus hashed n-gram embeddings of orders 2..N with K hashes each.

    ``init_std`` is the std of the output at init, before amplification (``HashedTables``)."""

    def __init__(self, vocab_size: int, d_model: int, *, max_n: int, splits: int, ratio: float,
                 eos_id: int | None, amplification: str = "none", init_std: float = 0.02,
                 row_multiple: int = 1, kernel: str = "auto", dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        norm = amplification_norm(amplification, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        super().__init__(vocab_size, d_model, max_n=max_n, splits=splits, ratio=ratio, eos_id=eos_id,
                         init_std=init_std, row_multiple=row_multiple,
                         kernel=kernel, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.d_model, self.amplification, self.norm = d_model, amplification, norm

    @classmethod
    def from_config(cls, m: ModelConfig, *, rngs: nnx.Rngs) -> NgramEmbedding:
        n = m.ngram
        return cls(m.vocab_size, m.d_model, max_n=n.max_n, splits=n.splits, ratio=n.ratio, eos_id=m.eos_id,
                   amplification=m.embedding.amplification, init_std=m.embedding.init_std,
                   row_multiple=n.row_multiple, kernel=n.kernel, dtype=jnp.dtype(m.dtype),
                   param_dtype=jnp.dtype(m.param_dtype), rngs=rngs)

    def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
                 history: jax.Array | None = None) -> jax.Array:
        """tokens int [B, S] -> embeddings [B, S, D]. ``history`` [B, S, N-1]: see ``row_ids``."""
        return self.amplify(self.lookup(tokens, segment_ids=segment_ids, history=history))

    def amplify(self, e: jax.Array) -> jax.Array:
        """Embedding Amplification (paper section 3) of the projected mean e [B, S, D]."""
        return amplify(e, self.amplification, self.norm)
