"""Parameter accounting in closed form (no arrays, no devices).

The counts follow the layer shapes of SPEC.md sections 1-3:
- input embedding: base table ``V*D`` (+ NE sub-tables ``sum(M)*d_e`` and projections ``T*d_e*D``,
  + LayerNorm ``2*D`` with ``amplification: layernorm``);
- each ScMoE block: 2 attention sublayers, 2 dense FFNs (SwiGLU ``3*D*F``; with PLE/PLNE the
  up-projection is replaced by the per-layer lookup, ``2*D*F``), 4 RMSNorms, and when
  ``num_experts > 0`` one router ``D*(E+Z)`` and E SwiGLU experts ``3*D*F_e``;
- per-layer embeddings: PLE ``V*L*F``; PLNE per layer ``V*F + sum(M)*d_e + T*d_e*F``;
- final RMSNorm ``D`` and an LM head ``V*D`` unless tied.

Activated parameters per token count every dense weight, the LM head, the table rows a token
reads, and ``top_k`` experts when all are real (``activated_max``) or as few real experts as the
zero experts allow (``activated_min``).
"""

from __future__ import annotations

from ngram_jax.config import AttentionConfig, ModelConfig
from ngram_jax.ngram.hashing import num_tables, table_sizes


def attention_params(a: AttentionConfig, d: int) -> int:
    if a.kind == "gqa":
        h, kv, hd = a.num_heads, a.num_kv_heads, a.head_dim
        return d * h * hd + 2 * d * kv * hd + h * hd * d
    h = a.num_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank > 0:
        q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * h * qk  # q_a, q_a_norm, q_b
    else:
        q = d * h * qk
    kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # kv_a (+ rope key), kv_a_norm
    kv += a.kv_lora_rank * h * (a.qk_nope_head_dim + a.v_head_dim)  # kv_b
    return q + kv + h * a.v_head_dim * d  # + o_proj


def ngram_table_params(vocab: int, width: int, max_n: int, splits: int, ratio: float) -> tuple[int, int]:
    """(sub-table parameters, projection parameters) of one N-gram Embedding of output ``width``."""
    t = num_tables(max_n, splits)
    d_e = width // t
    return sum(table_sizes(vocab, max_n, splits, ratio)) * d_e, t * d_e * width


def closed_form_budget(m: ModelConfig) -> dict[str, int]:
    d, v, f, nb = m.d_model, m.vocab_size, m.ffn_dim, m.num_blocks
    n_ffn = 2 * nb  # dense FFN layers, each with its own per-layer embedding

    embedding = v * d
    ngram = 0
    ngram_rows_read = 0  # parameters a token reads from embedding tables
    if m.ngram.enabled:
        tables, proj = ngram_table_params(v, d, m.ngram.max_n, m.ngram.splits, m.ngram.ratio)
        ngram += tables + proj
        t = num_tables(m.ngram.max_n, m.ngram.splits)
        ngram_rows_read += t * (d // t)
        if m.ngram.amplification == "layernorm":
            embedding += 2 * d

    ple = 0
    ple_rows_read = 0
    if m.ple.kind == "ple":
        ple = v * n_ffn * f
        ple_rows_read = n_ffn * f
    elif m.ple.kind == "plne":
        tables, proj = ngram_table_params(v, f, m.ple.max_n, m.ple.splits, m.ple.ratio)
        t = num_tables(m.ple.max_n, m.ple.splits)
        ple = n_ffn * v * f
        ngram += n_ffn * (tables + proj)
        ple_rows_read = n_ffn * (f + t * (f // t))

    ffn_one = (2 if m.ple.kind != "none" else 3) * d * f
    dense = nb * (2 * attention_params(m.attention, d) + 2 * ffn_one + 4 * d) + d
    lm_head = 0 if m.tie_embeddings else v * d

    e = m.moe
    experts = router = 0
    expert_one = 3 * d * e.expert_dim
    if e.num_experts > 0:
        experts = nb * e.num_experts * expert_one
        router = nb * d * (e.num_experts + e.num_zero_experts)

    total = embedding + ngram + ple + dense + lm_head + experts + router
    ngram_proj = 0
    if m.ngram.enabled:
        ngram_proj = ngram_table_params(v, d, m.ngram.max_n, m.ngram.splits, m.ngram.ratio)[1]
    if m.ple.kind == "plne":
        ngram_proj += n_ffn * ngram_table_params(v, f, m.ple.max_n, m.ple.splits, m.ple.ratio)[1]
    head = lm_head if lm_head else v * d  # a tied head still multiplies by V*D weights
    base = dense + router + head + ngram_proj + d + ngram_rows_read + ple_rows_read
    k_real_max = min(e.top_k, e.num_experts) if e.num_experts > 0 else 0
    k_real_min = max(0, e.top_k - e.num_zero_experts) if e.num_experts > 0 else 0
    return {
        "total": total,
        "embedding": embedding,
        "ngram": ngram,
        "ple": ple,
        "dense": dense,
        "lm_head": lm_head,
        "experts": experts,
        "router": router,
        "activated_min": base + nb * k_real_min * expert_one,
        "activated_max": base + nb * k_real_max * expert_one,
    }
