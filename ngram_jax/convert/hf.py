"""Import and export of Hugging Face LongCat-Flash / LongCat-Flash-Lite checkpoints.

A checkpoint directory holds ``config.json`` and ``*.safetensors`` with transformers' names:
``model.embed_tokens``, ``model.layers.{l}.self_attn.{0,1}.{q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj}``, ``mlps.{0,1}.{gate,up,down}_proj``,
``input_layernorm.{0,1}``, ``post_attention_layernorm.{0,1}``, ``mlp.router.classifier`` (rows: real
then zero experts), ``mlp.router.e_score_correction_bias``, ``mlp.experts.{e}.{gate,up,down}_proj``,
``model.norm``, ``lm_head``; and for LongCat-Flash-Lite the N-gram Embedding
``model.ngram_embeddings.embedders.{i}`` ([M_i, d_e]) and ``post_projs.{i}`` ([D, d_e]) with the
config keys ``ngram_vocab_size_ratio``, ``emb_neighbor_num`` (N) and ``emb_split_num`` (K).
torch ``nn.Linear`` stores ``[out, in]``; our kernels are ``[in, out]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ngram_jax.config import Config, ConfigError, ModelConfig, from_dict, to_dict
from ngram_jax.errors import CheckpointError
from ngram_jax.layers.moe import RoutingStats, routed_scale
from ngram_jax.model import Model, build_model
from ngram_jax.ngram.lookup import hashed_tables

# ----------------------------------------------------------------------------------------------
# Configs


def config_from_hf(hf: dict, row_multiple: int = 1) -> Config:
    """A :class:`Config` from a transformers ``config.json`` dict (N-gram table padded to ``row_multiple``)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000000.0))
    eos = hf.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    attention = dict(kind="mla", num_heads=hf["num_attention_heads"], q_lora_rank=hf["q_lora_rank"],
                     kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
                     qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"], rope_theta=float(theta))
    if rope.get("rope_type", rope.get("type")) == "yarn":
        attention.update(
            yarn_factor=float(rope["factor"]),
            yarn_original_max_position=int(rope["original_max_position_embeddings"]),
            yarn_beta_fast=float(rope.get("beta_fast") or 32), yarn_beta_slow=float(rope.get("beta_slow") or 1),
            yarn_mscale=float(rope.get("mscale") or 0.0), yarn_mscale_all_dim=float(rope.get("mscale_all_dim") or 0.0))
    experts = hf.get("n_routed_experts", 0) or 0
    model = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_blocks=hf["num_layers"],
        ffn_dim=hf["ffn_hidden_size"], eos_id=eos, tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)), attention=attention,
        moe=dict(num_experts=experts, num_zero_experts=(hf.get("zero_expert_num") or 0) if experts else 0,
                 top_k=hf.get("moe_topk", 1), expert_dim=hf.get("expert_ffn_hidden_size", 1),
                 routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0))),
    )
    if hf.get("ngram_vocab_size_ratio") is not None:
        model["ngram"] = dict(enabled=True, max_n=hf["emb_neighbor_num"], splits=hf["emb_split_num"],
                              ratio=float(hf["ngram_vocab_size_ratio"]), row_multiple=row_multiple)
        model["embedding"] = dict(amplification="none")  # the released format has none
    return from_dict({"name": hf.get("_name_or_path") or "hf_import", "model": model})


def config_to_hf(m: ModelConfig) -> dict:
    a = m.attention
    if a.kind != "mla" or a.q_lora_rank == 0:
        raise ConfigError("HF LongCat-Flash export needs MLA with q_lora_rank > 0 (model.attention)")
    if m.ple.kind != "none":
        raise ConfigError("HF LongCat-Flash has no per-layer embeddings: model.ple.kind must be none to export")
    if m.moe.num_experts and (m.moe.normalize_topk or m.moe.bias_on != "probs"):
        raise ConfigError("HF LongCat-Flash routes with unnormalised softmax weights and its selection bias on the "
                          "probabilities: model.moe.normalize_topk must be false and model.moe.bias_on probs to export")
    if m.embedding.amplification != "none":
        raise ConfigError("the released LongCat-Flash(-Lite) format has no embedding amplification: "
                          "model.embedding.amplification must be none to export")
    hf = {
        "architectures": ["LongcatFlashNgramForCausalLM" if m.ngram.enabled else "LongcatFlashForCausalLM"],
        "model_type": "longcat_flash", "vocab_size": m.vocab_size, "hidden_size": m.d_model,
        "num_layers": m.num_blocks, "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_heads,
        "ffn_hidden_size": m.ffn_dim, "q_lora_rank": a.q_lora_rank, "kv_lora_rank": a.kv_lora_rank,
        "qk_nope_head_dim": a.qk_nope_head_dim, "qk_rope_head_dim": a.qk_rope_head_dim,
        "head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "eos_token_id": m.eos_id, "hidden_act": "silu",
        "n_routed_experts": m.moe.num_experts, "zero_expert_num": m.moe.num_zero_experts,
        "moe_topk": m.moe.top_k, "expert_ffn_hidden_size": m.moe.expert_dim,
        "routed_scaling_factor": routed_scale(m.moe) if m.moe.num_experts else m.moe.routed_scaling_factor,
        "torch_dtype": "float32",
        "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
    }
    if a.yarn_factor > 1:
        hf["rope_parameters"] = {
            "rope_type": "yarn", "rope_theta": a.rope_theta, "factor": a.yarn_factor,
            "original_max_position_embeddings": a.yarn_original_max_position, "beta_fast": a.yarn_beta_fast,
            "beta_slow": a.yarn_beta_slow, "mscale": a.yarn_mscale, "mscale_all_dim": a.yarn_mscale_all_dim}
    if m.ngram.enabled:
        hf.update(ngram_vocab_size_ratio=m.ngram.ratio, emb_neighbor_num=m.ngram.max_n, emb_split_num=m.ngram.splits)
    return hf


# ----------------------------------------------------------------------------------------------
# Names: (our state path, HF tensor name, transpose) for every tensor


def _linear(ours: tuple, theirs: str) -> list[tuple[tuple, str, bool]]:
    return [((*ours, "kernel"), f"{theirs}.weight", True)]


def tensor_map(m: ModelConfig) -> list[tuple[tuple, str, bool]]:
    """One-to-one tensors. The N-gram tables and the experts are split per table/expert separately."""
    out = [(("embed", "embedding"), "model.embed_tokens.weight", False),
           (("final_norm", "scale"), "model.norm.weight", False)]
    if not m.tie_embeddings:
        out += _linear(("lm_head",), "lm_head")
    for layer in range(m.num_blocks):
        p = f"model.layers.{layer}"
        for j in range(2):
            out.append((("blocks", layer, "attn_norm", j, "scale"), f"{p}.input_layernorm.{j}.weight", False))
            out.append((("blocks", layer, "ffn_norm", j, "scale"), f"{p}.post_attention_layernorm.{j}.weight", False))
            a = ("blocks", layer, "attn", j)
            for ours, theirs in (("q_a", "q_a_proj"), ("q_b", "q_b_proj"), ("kv_a", "kv_a_proj_with_mqa"),
                                 ("kv_b", "kv_b_proj"), ("o", "o_proj")):
                out += _linear((*a, ours), f"{p}.self_attn.{j}.{theirs}")
            out.append(((*a, "q_a_norm", "scale"), f"{p}.self_attn.{j}.q_a_layernorm.weight", False))
            out.append(((*a, "kv_a_norm", "scale"), f"{p}.self_attn.{j}.kv_a_layernorm.weight", False))
            for name in ("gate", "up", "down"):
                out += _linear(("blocks", layer, "ffn", j, name), f"{p}.mlps.{j}.{name}_proj")
        if m.moe.num_experts:
            out.append((("blocks", layer, "moe", "router"), f"{p}.mlp.router.classifier.weight", True))
            out.append((("blocks", layer, "moe", "bias"), f"{p}.mlp.router.e_score_correction_bias", False))
    return out


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    tensors = {}
    for f in files:
        with safe_open(f, framework="flax") as st:
            for k in st.keys():
                tensors[k] = np.asarray(st.get_tensor(k).astype(jnp.float32))
    return tensors


def _set(tree: dict, path: tuple, value) -> None:
    node = tree
    for p in path[:-1]:
        node = node[p]
    if tuple(node[path[-1]].shape) != tuple(value.shape):
        raise CheckpointError(f"shape mismatch at {'/'.join(map(str, path))}: checkpoint {tuple(value.shape)}, "
                              f"model {tuple(node[path[-1]].shape)}: its config.json does not describe its tensors")
    node[path[-1]] = value


def _ignorable(name: str, num_experts: int) -> bool:
    """Tensors with no meaning here: the multi-token-prediction head, and the gate/up weights that
    transformers before 5.25 allocated for zero experts (identity experts never read them)."""
    if name.startswith("model.mtp."):
        return True
    parts = name.split(".")
    return "experts" in parts and parts[parts.index("experts") + 1].isdigit() and \
        int(parts[parts.index("experts") + 1]) >= num_experts


def load_hf_checkpoint(path: str | Path, dtype=jnp.float32, row_multiple: int = 1) -> tuple[Model, Config]:
    """Read a HF LongCat-Flash(-Lite) directory into our :class:`Model` (float32 compute by default).

    ``row_multiple`` pads the flattened N-gram table with zero rows (never read) so that a mesh of that
    many row shards can split it (see ``model.ngram.row_multiple``).
    """
    path = Path(path)
    with open(path / "config.json") as f:
        hf = json.load(f)
    cfg = config_from_hf(hf, row_multiple)
    name = jnp.dtype(dtype).name
    cfg = from_dict({**to_dict(cfg), "model": {**to_dict(cfg)["model"], "dtype": name, "param_dtype": name}})
    m = cfg.model
    tensors = _read_safetensors(path)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(m, nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    used = set()

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{path}: tensor {name} missing from the checkpoint (a partial download?)")
        used.add(name)
        return tensors[name]

    for ours, theirs, transpose in tensor_map(m):
        t = take(theirs)
        _set(pure, ours, t.T if transpose else t)
    if m.ngram.enabled:
        lay = abstract.embed.layout
        table = np.concatenate([take(f"model.ngram_embeddings.embedders.{i}.weight") for i in range(lay.num_tables)])
        _set(pure, ("embed", "ngram_table"), np.pad(table, ((0, lay.padded_rows - table.shape[0]), (0, 0))))
        _set(pure, ("embed", "ngram_proj"), np.stack(
            [take(f"model.ngram_embeddings.post_projs.{i}.weight").T for i in range(lay.num_tables)]))
    for layer in range(m.num_blocks):
        if not m.moe.num_experts:
            continue
        p = f"model.layers.{layer}.mlp.experts"
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            _set(pure, ("blocks", layer, "moe", ours),
                 np.stack([take(f"{p}.{e}.{theirs}.weight").T for e in range(m.moe.num_experts)]))
    for lookup_path, _ in hashed_tables(abstract):  # no table row has been read by training yet
        node = pure
        for key in lookup_path.split("/"):
            node = node[key]
        node["row_usage"] = np.zeros(node["row_usage"].shape, np.uint8)
    for path_, var in nnx.to_flat_state(nnx.state(abstract, RoutingStats)):  # routing statistics start empty
        _set(pure, tuple(path_), np.zeros(var.value.shape, var.value.dtype))
    leftover = sorted(k for k in set(tensors) - used if not _ignorable(k, m.moe.num_experts))
    if leftover:
        raise CheckpointError(f"{path}: {len(leftover)} tensor(s) the model has no place for, e.g. {leftover[:3]}")
    pdt = jnp.dtype(m.param_dtype)

    def to_array(abstract_leaf, value):
        return jnp.asarray(value, dtype=abstract_leaf.dtype if abstract_leaf.dtype != jnp.float32 else pdt)

    pure = jax.tree.map(to_array, nnx.to_pure_dict(state), pure)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state), cfg


def hf_tensors(model: Model) -> dict[str, np.ndarray]:
    """Our model's weights under transformers' names and layouts (float32 numpy)."""
    m = model.config
    pure = nnx.to_pure_dict(nnx.state(model))

    def get(path):
        node = pure
        for p in path:
            node = node[p]
        return np.asarray(node, np.float32)

    out = {}
    for ours, theirs, transpose in tensor_map(m):
        t = get(ours)
        out[theirs] = np.ascontiguousarray(t.T if transpose else t)
    if m.ngram.enabled:
        lay = model.embed.layout
        table, proj = get(("embed", "ngram_table")), get(("embed", "ngram_proj"))
        for i, (off, size) in enumerate(zip(lay.row_offsets, lay.table_sizes, strict=True)):
            out[f"model.ngram_embeddings.embedders.{i}.weight"] = np.ascontiguousarray(table[off : off + size])
            out[f"model.ngram_embeddings.post_projs.{i}.weight"] = np.ascontiguousarray(proj[i].T)
    for layer in range(m.num_blocks):
        if not m.moe.num_experts:
            continue
        p = f"model.layers.{layer}.mlp.experts"
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            w = get(("blocks", layer, "moe", ours))
            for e in range(m.moe.num_experts):
                out[f"{p}.{e}.{theirs}.weight"] = np.ascontiguousarray(w[e].T)
    return out


def save_hf_checkpoint(model: Model, config: Config | ModelConfig, path: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (float32) that :func:`load_hf_checkpoint` and
    transformers read."""
    m = config.model if isinstance(config, Config) else config
    hf = config_to_hf(m)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "model.safetensors.tmp"
    save_file(hf_tensors(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    return path
