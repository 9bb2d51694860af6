"""Parameter accounting in closed form (no arrays, no devices).

The counts follow the layer shapes of the paper (sections 3 and 5) and LongCat-Flash:
- input embedding: base table ``V*D`` (+ NE sub-tables ``sum(M)*d_e`` and projections ``T*d_e*D``),
  + LayerNorm ``2*D`` with ``model.embedding.amplification: layernorm`` (any model);
- each ScMoE block: 2 attention sublayers, 2 dense FFNs (SwiGLU ``3*D*F``; with PLE/PLNE the
  up-projection is replaced by the per-layer lookup, ``2*D*F``), 4 RMSNorms, and when
  ``num_experts > 0`` one router ``D*(E+Z)`` and E SwiGLU experts ``3*D*F_e``;
- per-layer embeddings: PLE ``V*L*F``; PLNE per layer ``V*F + sum(M)*d_e + T*d_e*F``;
- final RMSNorm ``D`` and an LM head ``V*D`` unless tied.

Activated parameters per token count every dense weight, the LM head, the table rows a token
reads, and ``top_k`` experts when all are real (``activated_max``) or as few real experts as the
zero experts allow (``activated_min``).

The paper counts the transformer's parameters (its activated budgets exclude the vocabulary matrices):
``transformer_total`` is the total without the token table, its amplification LayerNorm and the LM head
(the N-gram tables and projections stay: they are the sparse parameters NE adds, as experts are MoE's), and
``transformer_activated`` the activated count (max) without the table rows a token reads (token, N-gram and
per-layer rows: lookups, not weights it multiplies by), that LayerNorm and the LM head (the N-gram
projections stay: dense weights every token multiplies by).
:func:`ratios` gives total/activated both ways.
"""

from __future__ import annotations

import warnings

import numpy as np

from ngram_jax.config import AttentionConfig, Config, ConfigError, ConfigWarning, ModelConfig
from ngram_jax.ngram.hashing import make_layout, num_tables


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


def ngram_table_params(vocab: int, width: int, max_n: int, splits: int, ratio: float,
                       row_multiple: int = 1) -> tuple[int, int]:
    """(sub-table parameters incl. padding rows, projection parameters) of one N-gram Embedding."""
    t = num_tables(max_n, splits)
    d_e = width // t
    return make_layout(vocab, max_n, splits, ratio, row_multiple).padded_rows * d_e, t * d_e * width


def check_config(cfg: Config | ModelConfig):
    """The config checks that need the table layout and the parameter budget (``config.validate`` does
    the rest and imports nothing): every N-gram table addressable by int32 row ids (a
    :class:`ConfigError` naming the key), and a :class:`ConfigWarning` when the N-gram tables hold more
    than half of all parameters (the paper finds NE helps only up to about 50%). Returns ``cfg``.

    Training (``ngram_jax.train.loop.train``) and ``python -m ngram_jax.tools.plan`` run it:
    ``cfg = check_config(load_config(path, overrides))``."""
    m = cfg.model if isinstance(cfg, Config) else cfg
    tables = [("model.ngram", m.ngram)] if m.ngram.enabled else []
    if m.ple.kind == "plne":
        tables.append(("model.ple", m.ple))
    for prefix, n in tables:
        try:
            make_layout(m.vocab_size, n.max_n, n.splits, n.ratio, n.row_multiple)
        except ValueError as err:
            raise ConfigError(f"{prefix}: {err}") from None
    if tables:
        b = closed_form_budget(m)
        share = b["ngram"] / b["total"]
        if share > 0.5:
            warnings.warn(
                f"N-gram embeddings hold {share:.1%} of all parameters ({b['ngram']:,} of {b['total']:,}); "
                "the paper finds NE helps only up to about 50% of the budget (lower model.ngram.ratio)",
                ConfigWarning,
                stacklevel=2,
            )
    return cfg


def closed_form_budget(m: ModelConfig) -> dict[str, int]:
    d, v, f, nb = m.d_model, m.vocab_size, m.ffn_dim, m.num_blocks
    n_ffn = 2 * nb  # dense FFN layers, each with its own per-layer embedding
    counts = dict.fromkeys(("embedding", "ngram", "ple", "dense", "lm_head", "experts", "router", "draft"), 0)
    counts["embedding"] = v * d
    fd = m.draft_ffn_dim
    if m.draft_head == "ngram":  # RMSNorm, SwiGLU D x draft_ffn_dim, RMSNorm, linear D x V
        counts["draft"] = 2 * d + 3 * d * fd + d * v
    if m.draft_head == "mtp":  # 2 input norms, projection 2D x D, attention, 3 norms, SwiGLU D x draft_ffn_dim
        counts["draft"] = 5 * d + 2 * d * d + attention_params(m.attention, d) + 3 * d * fd
    if m.ngram.enabled:
        counts["ngram"] += sum(ngram_table_params(v, d, m.ngram.max_n, m.ngram.splits, m.ngram.ratio,
                                                  m.ngram.row_multiple))
    if m.embedding.amplification == "layernorm":
        counts["embedding"] += 2 * d
    if m.ple.kind != "none":
        counts["ple"] = v * n_ffn * f
    if m.ple.kind == "plne":
        counts["ngram"] += n_ffn * sum(ngram_table_params(v, f, m.ple.max_n, m.ple.splits, m.ple.ratio,
                                                          m.ple.row_multiple))
    ffn_one = (2 if m.ple.kind != "none" else 3) * d * f
    counts["dense"] = nb * (2 * attention_params(m.attention, d) + 2 * ffn_one + 4 * d) + d
    counts["lm_head"] = 0 if m.tie_embeddings else v * d
    if m.moe.num_experts > 0:
        counts["experts"] = nb * m.moe.num_experts * 3 * d * m.moe.expert_dim
        counts["router"] = nb * d * (m.moe.num_experts + m.moe.num_zero_experts)
    return _with_activated(m, counts)


def _with_activated(m: ModelConfig, counts: dict[str, int]) -> dict[str, int]:
    """Add ``total``, ``activated_min`` and ``activated_max`` to per-category counts.

    Activated: every parameter but the experts, the speculative draft head and the table rows a token
    does not read; the N-gram projections, the rows it reads (+ the amplification LayerNorm), the LM head
    (V*D even when tied), and top_k experts (all real: max; as many zero experts as allowed: min).
    """
    d, f, e = m.d_model, m.ffn_dim, m.moe
    counts["total"] = sum(counts.values())
    tables = counts["embedding"] + counts["ple"] + counts["ngram"]
    amp = 2 * d if m.embedding.amplification == "layernorm" else 0  # the amplification LayerNorm
    rows_read = d + amp
    proj = 0
    if m.ngram.enabled:
        t = num_tables(m.ngram.max_n, m.ngram.splits)
        rows_read += t * (d // t)
        proj += t * (d // t) * d
    n_ffn = 2 * m.num_blocks
    if m.ple.kind == "ple":
        rows_read += n_ffn * f
    elif m.ple.kind == "plne":
        t = num_tables(m.ple.max_n, m.ple.splits)
        rows_read += n_ffn * (f + t * (f // t))
        proj += n_ffn * t * (f // t) * f
    head = counts["lm_head"] or m.vocab_size * d
    base = (counts["total"] - counts["experts"] - tables + proj + rows_read - counts["lm_head"] + head
            - counts["draft"])  # the draft head is not part of the target's forward pass
    expert_one = 3 * d * e.expert_dim
    k_max = min(e.top_k, e.num_experts) if e.num_experts else 0
    k_min = max(0, e.top_k - e.num_zero_experts) if e.num_experts else 0
    counts["activated_min"] = base + m.num_blocks * k_min * expert_one
    counts["activated_max"] = base + m.num_blocks * k_max * expert_one
    counts["transformer_total"] = counts["total"] - m.vocab_size * d - amp - counts["lm_head"]
    counts["transformer_activated"] = counts["activated_max"] - rows_read - head
    return counts


def ratios(b: dict[str, int]) -> dict[str, float]:
    """Total over activated parameters of a budget (:func:`closed_form_budget`): ``total_over_activated`` as
    counted here (embedding and LM head included) and ``transformer_ratio``, the paper's counting (both
    without the token table and the LM head, see the module docstring)."""
    return {"total_over_activated": b["total"] / b["activated_max"],
            "transformer_ratio": b["transformer_total"] / b["transformer_activated"]}


# ----------------------------------------------------------------------------------------------
# From the model's abstract shapes (nothing is allocated).


def _category(names: tuple[str, ...], var, hashed: frozenset[tuple[str, ...]]) -> str:
    """Budget category of one parameter, by type: N-gram tables and the projections of a hashed-tables
    module are ``ngram``; other tables are ``embedding`` (input) or ``ple`` (per-layer)."""
    from ngram_jax.ngram.lookup import NgramTable, Table

    if isinstance(var, NgramTable) or (names[:-1] in hashed and not isinstance(var, Table)):
        return "ngram"  # the hashed tables and their projections
    if names[0] in ("embed", "ple"):
        return "embedding" if names[0] == "embed" else "ple"
    if names[0] == "draft_head":
        return "draft"
    if names[0] == "lm_head":
        return "lm_head"
    if "moe" in names:
        return "router" if names[-1] == "router" else "experts"
    return "dense"


def parameter_budget(config) -> dict[str, int]:
    """Parameter counts by category, from ``nnx.eval_shape`` of the real model (no allocation).

    Keys: total, embedding, ngram, ple, dense, lm_head, experts, router, activated_min,
    activated_max (see the module docstring for what counts as activated).
    """
    from flax import nnx

    from ngram_jax.config import Config
    from ngram_jax.model import build_model

    m = config.model if isinstance(config, Config) else config
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(m, nnx.Rngs(0)))
    from ngram_jax.ngram.lookup import hashed_tables

    hashed = frozenset(tuple(k.split("/")) for k, _ in hashed_tables(abstract))
    counts = dict.fromkeys(("embedding", "ngram", "ple", "dense", "lm_head", "experts", "router", "draft"),
                           0)
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        counts[_category(tuple(map(str, path)), var, hashed)] += int(np.prod(var.shape))
    return _with_activated(m, counts)


def moe_baseline(config):
    """The parameter-equivalent MoE baseline of an NE (or PLNE) model.

    The N-gram parameters are spent on more experts instead: ``ngram.enabled: false`` (PLNE becomes
    plain PLE), ``num_experts`` grows by the NE budget divided by the cost of one expert across all
    blocks (its SwiGLU weights plus its router column), rounded to the nearest; same top_k, so the
    same activated expert parameters.
    """
    from ngram_jax.config import Config, ConfigError, replace

    m = config.model if isinstance(config, Config) else config
    if m.moe.num_experts == 0:
        raise ConfigError("moe_baseline needs an MoE model (model.moe.num_experts > 0) to add experts to")
    if not (m.ngram.enabled or m.ple.kind == "plne"):
        raise ConfigError("moe_baseline needs N-gram parameters to reallocate (model.ngram.enabled or ple.kind=plne)")
    b = closed_form_budget(m)
    changes = {"model.ngram.enabled": False}
    if m.ple.kind == "plne":
        changes["model.ple.kind"] = "ple"
    plain = replace(config, **changes)
    plain_m = plain.model if isinstance(plain, Config) else plain
    freed = b["total"] - closed_form_budget(plain_m)["total"]
    per_expert = m.num_blocks * (3 * m.d_model * m.moe.expert_dim + m.d_model)
    extra = round(freed / per_expert)
    return replace(plain, **{"model.moe.num_experts": m.moe.num_experts + extra})
