"""Typed, frozen configuration tree: YAML files with ``base:`` inheritance and CLI overrides.

    cfg = load_config("configs/models/tiny_ne.yaml", overrides=["model.ngram.max_n=4"])

Every key is checked against the dataclasses below: an unknown key, a wrong type or an
inconsistent value raises :class:`ConfigError` naming the key and what would be valid. Choices the
paper advises against (a table ratio at a simple fraction of V here; NE above half of the parameters
in ``ngram_jax.budget.check_config``) warn with :class:`ConfigWarning` and the numbers. This module
is the bottom of the import graph: it imports nothing from the package.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


class ConfigWarning(UserWarning):
    """A configuration that works but goes against the paper's findings."""


# ----------------------------------------------------------------------------------------------
# The tree.


@dataclass(frozen=True)
class EmbeddingConfig:
    """The input embedding's treatment, whichever embedding it is (the plain token table or NE): a plain or
    MoE model and an NE model with the same section are treated alike (docs/STUDY_GUIDE.md, "Both arms
    alike").

    Init rule, one for every embedding table (docs/TRAINING.md, "Initialisation"): the embedding's OUTPUT
    starts with per-coordinate standard deviation ``init_std`` before amplification. A token table is drawn
    at ``init_std``; NE's projected mean of 1 + T terms (``/(1 + T)``) would shrink that by sqrt(1 + T),
    so its tables are drawn at ``init_std * sqrt(1 + T)`` (projections at 1/sqrt(d_e) keep a row's scale).
    The same rule gives the per-layer embeddings ``model.ple.init_std``."""

    # Embedding Amplification (paper section 3), applied to the input embedding before the first block:
    # none | sqrt_d (times sqrt(d_model)) | layernorm (a LayerNorm with its own scale and bias)
    amplification: Literal["none", "sqrt_d", "layernorm"] = "none"
    init_std: float = 0.02  # the output's std at init (GPT-2's embedding scale), see the class docstring


@dataclass(frozen=True)
class NgramConfig:
    """N-gram Embedding on the input (the paper, section 3); its amplification and init are ``model.embedding``."""

    enabled: bool = False
    max_n: int = 3  # N: orders 2..N
    splits: int = 2  # K: hash functions (sub-tables) per order
    ratio: float = 8.37  # r: sub-table size ~ r * V; avoid integers and simple fractions
    row_multiple: int = 1  # pad the flattened table to a multiple of this (>= the row shards of a mesh)
    # the fused hashed gather: auto (pallas_tpu on TPU, xla elsewhere) | reference | xla | pallas_tpu
    kernel: Literal["auto", "reference", "xla", "pallas_tpu"] = "auto"


@dataclass(frozen=True)
class PLEConfig:
    """Per-layer embeddings gating each dense FFN (the paper, section 5)."""

    kind: Literal["none", "ple", "plne"] = "none"
    max_n: int = 3  # PLNE only
    splits: int = 2  # PLNE only
    ratio: float = 2.37  # PLNE only
    row_multiple: int = 1  # PLNE only
    kernel: Literal["auto", "reference", "xla", "pallas_tpu"] = "auto"  # PLNE only, as model.ngram.kernel
    # the output's std at init (the rule of model.embedding): 1.0, the scale of the SwiGLU up-projection
    # W_u x it replaces (lecun-normal W_u on an RMS-normalised x)
    init_std: float = 1.0


@dataclass(frozen=True)
class AttentionConfig:
    kind: Literal["mla", "gqa"] = "mla"
    # the attention core of training and prefill: auto (splash on TPU for sequences >= 1024 that 128 divides,
    # xla elsewhere) | xla (causal attention in query blocks, layers/attention.py) | splash (JAX's TPU splash
    # attention kernel; in the Pallas interpreter off TPU)
    kernel: Literal["auto", "xla", "splash"] = "auto"
    num_heads: int = 4
    # GQA
    num_kv_heads: int = 4
    head_dim: int = 32
    # MLA (LongCat-Flash); q_lora_rank 0 means a full-rank query projection
    q_lora_rank: int = 64
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    yarn_factor: float = 1.0  # > 1 enables YaRN context extension
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0  # cos/sin scale mscale(f, this) / mscale(f, mscale_all_dim)
    yarn_mscale_all_dim: float = 0.0  # softmax scale times yarn_mscale(factor, this)^2 (DeepSeek/LongCat)


@dataclass(frozen=True)
class MoEConfig:
    """Routed experts of the shortcut branch; ``num_experts: 0`` builds a dense-only model."""

    num_experts: int = 0
    num_zero_experts: int = 0
    top_k: int = 2
    expert_dim: int = 128
    # the experts' weights at init: normal (std 0.02, as the router) | lecun (as the dense FFN: lecun-normal,
    # std 1/sqrt(fan_in), so an expert starts at the dense FFN's scale)
    expert_init: Literal["normal", "lecun"] = "normal"
    routed_scaling_factor: float = 1.0
    # The routed weights of the selected experts (p: the router's softmax over all E + Z experts):
    # normalize_topk false: w_i = p_i * scale, a routed mass sum_i w_i of about scale * top_k / (E + Z) at a
    # uniform router, shrinking as E grows; true: w_i = p_i / sum_selected(p) * scale (DeepSeek-V3, Mixtral),
    # a routed mass of exactly routed_scaling_factor at any E.
    normalize_topk: bool = False
    # scale: fixed (routed_scaling_factor) | num_experts (routed_scaling_factor * (E + Z) / top_k, so that an
    # unnormalised routed mass starts at routed_scaling_factor whatever E)
    routed_scale: Literal["fixed", "num_experts"] = "fixed"
    dispatch: Literal["dropless", "capacity", "dense"] = "dropless"
    capacity_factor: float = 1.25  # capacity dispatch: slots per expert = factor * tokens * top_k / E
    # the grouped matmul of dropless (and expert-parallel) dispatch (layers/grouped_matmul.py):
    # auto (megablox on TPU, tiled elsewhere) | megablox (JAX's Pallas TPU gmm/tgmm kernels) | ragged_dot
    # (jax.lax.ragged_dot: dense in the number of experts on XLA:CPU, and on TPU its weight gradient costs
    # about experts/2 times the matmul, docs/TPU.md) | tiled (groups padded to grouped_matmul_tile rows,
    # one batched matmul over tiles)
    grouped_matmul: Literal["auto", "megablox", "ragged_dot", "tiled"] = "auto"
    grouped_matmul_tile: int = 64  # rows per tile of the tiled grouped matmul (docs/BENCHMARKS.md)
    # dropless with the tiled grouped matmul: run every expert on every token instead when that is no more
    # rows (N * E) than the tiled layout's bound, as in decoding and verification passes of a few tokens
    # (the same outputs; layers/moe.py, docs/BENCHMARKS.md); false: always the tiled layout
    few_tokens_dense: bool = True
    # what the selection bias is added to for the top-k choice: probs (LongCat-Flash: p + b, so a bias step
    # weighs more against the probabilities, whose mean is 1 / (E + Z), the more experts there are) | logits
    # (x W_r + b: a step of b multiplies an expert's odds by exp(b), the same at any number of experts)
    bias_on: Literal["probs", "logits"] = "probs"
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step for the selection bias
    # units of bias_update_rate: absolute (the bias moves by the rate) | mean_probability (by rate / (E + Z):
    # the rate in units of the mean router probability 1 / (E + Z), which the bias is added to, so that the
    # bias moves alike relative to the probabilities at any number of experts)
    bias_update_units: Literal["absolute", "mean_probability"] = "absolute"
    bias_update_rule: Literal["sign", "proportional"] = "sign"
    # K_e: expected real (non-zero) experts per token that the bias update steers toward; the zero
    # experts absorb the other (top_k - K_e) / top_k of the routed slots (layers/moe.py).
    # null: top_k (zero experts are pushed out); must be top_k without zero experts.
    real_experts_per_token: float | None = None
    load_balance_loss_weight: float = 0.0  # Switch-style auxiliary loss (0: off)
    router_z_loss_weight: float = 0.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    num_blocks: int = 2  # ScMoE blocks: 2 attention + 2 dense FFN (+ 1 MoE) each
    ffn_dim: int = 256
    eos_id: int | None = 1  # resets the n-gram history (1: <|endoftext|> of a BPE trained here); null: no resets
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    # Compute dtype of the blocks (matmuls, attention, experts, the residual stream). bfloat16 with
    # param_dtype float32 is mixed precision with float32 master weights: parameters, optimizer state,
    # the router (float32 at HIGHEST precision), norm statistics, logits, softmax and loss, and the
    # integer n-gram hashing stay float32 (int32); weights are cast to bfloat16 where they are used.
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # Rematerialisation of every ScMoE block in the backward pass (model.py, nnx.remat per block):
    # none (keep what autodiff keeps) | block (keep only each block's input, recompute the block) |
    # dots (keep the outputs of the weight matmuls, recompute attention, experts and elementwise ops) |
    # names (keep the activations named in remat_names, see REMAT_NAMES, recompute the rest).
    remat: Literal["none", "block", "dots", "names"] = "none"
    remat_names: tuple[str, ...] = ()  # model.remat=names only
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    ngram: NgramConfig = field(default_factory=NgramConfig)
    ple: PLEConfig = field(default_factory=PLEConfig)
    # Speculative-decoding draft head trained with the model (ngram_jax/speculative.py). ngram: the
    # N-gram Embedding output alone (no transformer blocks) through a small head (RMSNorm, residual
    # SwiGLU of width draft_ffn_dim, RMSNorm, linear to the vocabulary) predicts the next token. Its input is
    # the NE output under stop_gradient: no gradient of the head reaches the target (only the global-norm
    # gradient clipping is shared). Needs model.ngram.enabled.
    # mtp: a one-block MTP (NEXTN, DeepSeek-V3 style) head predicts token t+2 from the target's last hidden
    # state at t and the input embedding of token t+1 (the target's own embedding: its N-gram Embedding
    # with NE), through a projection, one decoder block (attention as model.attention, dense SwiGLU of
    # width draft_ffn_dim, its own KV cache when drafting), its own RMSNorm and the target's output head. Trained
    # jointly (its loss reaches the target, as in DeepSeek-V3) or on a frozen target (train.freeze_target).
    draft_head: Literal["none", "ngram", "mtp"] = "none"
    # Width of the draft head's SwiGLU (either head); 0: model.ffn_dim. Every draft step reads the head's
    # weights: a narrower head reads fewer and may accept less (docs/BENCHMARKS.md, the narrower head).
    draft_head_ffn_dim: int = 0

    @property
    def draft_ffn_dim(self) -> int:
        """The draft head's SwiGLU width: ``draft_head_ffn_dim``, or ``ffn_dim`` when that is 0."""
        return self.draft_head_ffn_dim or self.ffn_dim


# The activations a ScMoE block tags with jax.ad_checkpoint.checkpoint_name (model.py, layers/attention.py),
# which model.remat=names can keep for the backward pass (model.remat_names).
REMAT_NAMES: dict[str, str] = {
    "attn_in": "RMSNorm(h), the input of each attention sublayer [B, S, D]",
    "qkv": "the attention queries, keys and values after RoPE [B, S, H, Dq] / [B, S, Hk, Dv]",
    "attn_ctx": "the attention output before the output projection [B, S, H, Dv]",
    "attn_out": "the attention sublayer output after the output projection [B, S, D]",
    "ffn_in": "RMSNorm(h), the input of each dense FFN (and of the MoE shortcut) [B, S, D]",
    "ffn_hidden": "the dense FFN hidden state SiLU(gate x) * up x (or * e^l with PLE) [B, S, F]",
    "moe_out": "the MoE shortcut output [B, S, D]",
}

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axes, in this order of preference (axes the mesh lacks are dropped)
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", ("data", "fsdp", "expert")),  # activations' batch dimension
    ("vocab_rows", ("data", "fsdp", "expert", "tensor")),  # rows of token tables (masked local lookup)
    ("table_embed", ()),  # columns of token tables: kept whole so that a lookup stays on its shard
    ("ngram_rows", ("data", "fsdp", "expert", "tensor")),  # rows of the flattened N-gram table
    ("ngram_dim", ()),
    ("ngram_tables", ()),
    ("ple_embed", ()),  # columns of per-layer embedding tables
    ("vocab", ("tensor",)),  # the LM head's output dimension
    ("embed", ("fsdp",)),  # the model dimension of dense weights (FSDP)
    ("norm", ()),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("q_lora", ("fsdp",)),  # input dim of the LoRA up-projections (q_b, kv_b)
    ("kv_lora", ("fsdp",)),
    ("q_lora_up", ()),  # output dim of the LoRA down-projections (q_a, kv_a): embed already takes fsdp
    ("kv_lora_up", ()),
    ("router", ()),
    ("expert", ("expert",)),
    ("expert_mlp", ("tensor",)),
    ("layers", ()),
)


@dataclass(frozen=True)
class AxisSizes:
    """Devices per mesh axis; one axis may be -1 (all the devices left)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1


@dataclass(frozen=True)
class MeshConfig:
    ici: AxisSizes = field(default_factory=AxisSizes)  # within a slice / host
    dcn: AxisSizes = field(default_factory=lambda: AxisSizes(data=1))  # across slices (multi-slice)
    rules: tuple[tuple[str, tuple[str, ...]], ...] = DEFAULT_RULES  # YAML: a mapping name -> [axes]


@dataclass(frozen=True)
class DataConfig:
    path: str = "data/shakespeare"  # a directory written by python -m ngram_jax.data.prepare
    bundled: bool = True  # prepare the bundled Shakespeare corpus into `path` when it is missing
    seq_len: int = 256
    batch_size: int = 16  # global, in sequences
    seed: int = 0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    # Resuming a run with another train.steps is refused (the cosine schedule decays over train.steps).
    # extend: true allows it: the remaining steps follow the schedule of the new train.steps (warmup
    # unchanged; the cosine is recomputed over the new total, so the learning rate moves to the new
    # curve's value at the resume step: up when extending a run, down when shortening it).
    extend: bool = False
    lr: float = 3e-3
    warmup_steps: int = 100
    # the learning rate after the linear warmup: cosine (decays to lr * min_lr_ratio at train.steps) | constant
    # (lr from the end of warmup on, so that the loss at any step is the loss a shorter run of the same
    # schedule would end with: what a loss-vs-tokens curve, train.eval_at_tokens, compares)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    ngram_lr_multiplier: float = 1.0  # learning rate of the N-gram tables relative to lr
    ngram_weight_decay: float = 0.0  # the N-gram (and token) tables get no weight decay by default
    # N-gram tables: dense (optax AdamW on the full table gradient, the control) | rowwise_adagrad |
    # lazy_adam (sparse: only the rows a batch read are updated; see ngram_jax/train/optimizer.py)
    table_optimizer: Literal["dense", "rowwise_adagrad", "lazy_adam"] = "dense"
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    # a held-out loss curve: also evaluate (and checkpoint) at the first step whose training tokens (steps x
    # data.batch_size x data.seq_len) reach each of these counts, e.g. [250000, 500000, 1000000]; metrics.jsonl
    # records each as eval_loss with its step. Needs train.schedule=constant (comparable points).
    eval_at_tokens: tuple[int, ...] = ()
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    peak_flops_per_device: float = 0.0  # for MFU; 0: looked up from the device kind when known
    progress: bool = True
    # the output head and its cross-entropy run over the sequence in this many pieces, forward and backward
    # (logits of [B, seq_len/loss_chunks, V] at a time, recomputed in the backward pass; 1: all at once).
    # It changes the speed and memory of a step, not its result. 8 ran the study model's step fastest on CPU.
    loss_chunks: int = 8
    draft_head_weight: float = 1.0  # weight of the draft head's loss (model.draft_head; mtp: next-next token)
    # true: train only the draft head's parameters (model.draft_head); the target's parameters and its MoE
    # selection bias stay bit-identical (e.g. an MTP head added to a trained target).
    freeze_target: bool = False
    # a run directory: a new run (no checkpoint of its own yet) starts from the model parameters and MoE
    # selection biases of that run's latest checkpoint wherever both have them (same shapes); what that run
    # lacks, e.g. an MTP head added to a trained target, keeps its initialization (a draft head of another
    # kind is not copied). null: none.
    init_from: str | None = None


@dataclass(frozen=True)
class Config:
    name: str = "ngram_jax"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Loading.


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Load a YAML config (following ``base:`` links), apply ``a.b.c=value`` overrides, validate."""
    data = _read_yaml_tree(Path(path), seen=())
    for item in overrides:
        _set_dotted(data, *parse_override(item))
    return from_dict(migrate(data, warn=True))


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b.c=value"`` -> ``("a.b.c", value)`` with the value read as YAML (``4``, ``true``, ``[1, 2]``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value, e.g. model.ngram.max_n=4")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def from_dict(data: Mapping[str, Any]) -> Config:
    """Build and validate a :class:`Config` from plain data (e.g. a parsed YAML or JSON file, or a checkpoint's
    saved config: keys that moved are read where they are now, see :func:`migrate`)."""
    cfg = _build(Config, migrate(data), "")
    validate(cfg)
    return cfg


MOVED_TO_EMBEDDING = ("amplification", "init_std")  # model.ngram.X -> model.embedding.X


def migrate(data: Mapping[str, Any], *, warn: bool = False) -> dict[str, Any]:
    """Plain config data with the keys that moved read where they are now, as the same model.

    ``model.ngram.amplification`` and ``model.ngram.init_std`` (they applied to NE only) are
    ``model.embedding.amplification`` and ``model.embedding.init_std`` (they apply to every input embedding).
    With NE enabled the amplification moves as it is, and the old table std s becomes the output std
    ``s / sqrt(1 + T)`` it gave (the init rule of :class:`EmbeddingConfig`), so an old config builds the same
    model; without NE both had no effect and are dropped. A config that sets an old key and its new one to
    different values is a :class:`ConfigError`. ``warn``: a :class:`ConfigWarning` per moved key (for files a
    user edits; a checkpoint's saved config migrates silently)."""
    data = dict(data)
    model = data.get("model")
    ngram = model.get("ngram") if isinstance(model, Mapping) else None
    if not isinstance(ngram, Mapping) or not set(MOVED_TO_EMBEDDING) & set(ngram):
        return data
    model, ngram = dict(model), dict(ngram)
    moved = {k: ngram.pop(k) for k in MOVED_TO_EMBEDDING if k in ngram}
    embedding = model.get("embedding") if model.get("embedding") is not None else {}
    if not isinstance(embedding, Mapping):
        raise ConfigError(f"model.embedding: expected a mapping of EmbeddingConfig fields, got {embedding!r}")
    embedding = dict(embedding)
    enabled = ngram.get("enabled", NgramConfig.enabled) is True
    for key, value in moved.items():
        if enabled and key == "init_std":
            t = ngram.get("splits", NgramConfig.splits) * (ngram.get("max_n", NgramConfig.max_n) - 1)
            try:
                value = float(value) / (1 + t) ** 0.5
            except (TypeError, ValueError):
                raise ConfigError(f"model.ngram.init_std (now model.embedding.init_std): expected a number, got "
                                  f"{value!r}") from None
        if not enabled:
            if warn:
                warnings.warn(f"model.ngram.{key} had no effect without model.ngram.enabled and is ignored; it is "
                              f"model.embedding.{key} now, for every input embedding", ConfigWarning, stacklevel=3)
            continue
        if key in embedding and embedding[key] != value:
            raise ConfigError(f"model.ngram.{key} moved to model.embedding.{key}, and this config sets both "
                              f"({moved[key]!r} and {embedding[key]!r}): keep only model.embedding.{key}")
        embedding[key] = value
        if warn:
            warnings.warn(f"model.ngram.{key} is model.embedding.{key} now (it applies to every input embedding); "
                          f"read as model.embedding.{key}={value!r}", ConfigWarning, stacklevel=3)
    model["ngram"] = ngram
    if embedding:
        model["embedding"] = embedding
    data["model"] = model
    return data


def to_dict(cfg) -> dict[str, Any]:
    """The config as plain data (round-trips through :func:`from_dict`)."""
    return dataclasses.asdict(cfg)


def replace(cfg, **dotted: Any):
    """``replace(cfg, **{"model.ngram.max_n": 4})``: a validated copy with dotted keys changed."""
    data = to_dict(cfg)
    for key, value in dotted.items():
        _set_dotted(data, key, value)
    return from_dict(data)


def load_yaml(path: str | os.PathLike, what: str = "config file") -> Any:
    """The YAML document in file ``path``; a file that is not UTF-8 text (binary, damaged) or not valid YAML
    (e.g. cut short) is a ConfigError naming ``what``, the file and where it fails."""
    data = Path(path).read_bytes()
    try:
        return yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what} {path} is not a YAML text file: byte {err.start} is not UTF-8 text (a binary "
                          "or damaged file?)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{what} {path} is not valid YAML: {problem}{where}") from None


def _read_yaml_tree(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"'base:' cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml_tree(path.parent / base, seen + (path,)))
    return _deep_merge(merged, data)


def _deep_merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{p}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _build(cls, data: Any, prefix: str):
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + '.' if prefix else ''}{unknown[0]}; valid keys of {where}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(hints[name], value, key)
    return cls(**kwargs)


def _coerce(tp, value: Any, key: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] + (" (or null)" if type(None) in args else ""))
    if tp == tuple[tuple[str, tuple[str, ...]], ...]:  # logical axis rules
        return _coerce_rules(value, key)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (elem, *_rest) = typing.get_args(tp)
        return tuple(_coerce(elem, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"config field {key} has an unsupported type {tp}")  # a bug in this file


def _coerce_rules(value: Any, key: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``{logical: [mesh axes]}`` (or a list of pairs) overriding :data:`DEFAULT_RULES` by name; a single
    axis may be a string, ``null`` or ``[]`` replicates."""
    pairs = value.items() if isinstance(value, Mapping) else value
    out = dict(DEFAULT_RULES)
    try:
        for name, axes in pairs:
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            for a in axes:
                if a not in MESH_AXES:
                    raise ConfigError(f"{key}.{name}: unknown mesh axis {a!r}; mesh axes are {', '.join(MESH_AXES)}")
            out[str(name)] = axes
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{key}: expected a mapping logical_name -> [mesh axes], got {value!r}") from None
    return tuple(out.items())


# ----------------------------------------------------------------------------------------------
# Validation.


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _divisors_hint(n: int, limit: int = 8) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs[:limit])) + (", ..." if len(divs) > limit else "")


def _check_ngram_shape(prefix: str, width_key: str, width: int, max_n: int, splits: int,
                       ratio: float) -> None:
    _require(max_n >= 2, f"{prefix}.max_n: N must be >= 2 (orders 2..N), got {max_n}")
    _require(splits >= 1, f"{prefix}.splits: K must be >= 1, got {splits}")
    _require(ratio > 0, f"{prefix}.ratio: the table-size ratio must be > 0, got {ratio}")
    t = splits * (max_n - 1)
    _require(
        width % t == 0,
        f"{prefix}: {width_key}={width} must be divisible by K*(N-1) = {splits}*({max_n}-1) = {t}; "
        f"valid K*(N-1) for this width: {_divisors_hint(width)}",
    )


def validate(cfg: Config) -> None:
    """Check cross-field consistency; warn on choices the paper's findings advise against.

    This module imports nothing from the package: the checks that need the table layout or the
    parameter budget (table sizes within int32 row ids, the N-gram share of the parameters) are
    ``ngram_jax.budget.check_config``, which training and the planning tool run."""
    m = cfg.model
    _require(m.vocab_size >= 2, f"model.vocab_size must be >= 2, got {m.vocab_size}")
    _require(m.vocab_size <= 1 << 20, f"model.vocab_size must be <= 2^20 (exact 32-bit hashing), got {m.vocab_size}")
    for key in ("d_model", "num_blocks", "ffn_dim"):
        _require(getattr(m, key) >= 1, f"model.{key} must be >= 1, got {getattr(m, key)}")
    if m.eos_id is not None:
        _require(0 <= m.eos_id < m.vocab_size,
                 f"model.eos_id={m.eos_id} must be in [0, vocab_size={m.vocab_size}) or null")
    _require(m.norm_eps > 0, f"model.norm_eps must be > 0, got {m.norm_eps}")
    _require(m.embedding.init_std > 0 and m.ple.init_std > 0,
             f"model.embedding.init_std and model.ple.init_std must be > 0 (the std of the embedding's output at "
             f"init), got {m.embedding.init_std} and {m.ple.init_std}")

    if m.remat == "names":
        _require(len(m.remat_names) > 0,
                 "model.remat=names keeps the activations named in model.remat_names, which is empty; set e.g. "
                 f"model.remat_names=[attn_out,ffn_in] (names: {', '.join(REMAT_NAMES)}) or model.remat=block")
    else:
        _require(not m.remat_names,
                 f"model.remat_names={list(m.remat_names)} is only read with model.remat=names (got "
                 f"model.remat={m.remat}); set model.remat=names or model.remat_names=[]")
    for name in m.remat_names:
        _require(name in REMAT_NAMES,
                 f"model.remat_names: unknown checkpoint name {name!r}; valid names: {', '.join(REMAT_NAMES)}")

    a = m.attention
    _require(a.num_heads >= 1, f"model.attention.num_heads must be >= 1, got {a.num_heads}")
    if a.kind == "gqa":
        _require(a.num_kv_heads >= 1 and a.num_heads % a.num_kv_heads == 0,
                 f"model.attention.num_kv_heads={a.num_kv_heads} must divide num_heads={a.num_heads}")
        _require(a.head_dim >= 1 and a.head_dim % 2 == 0,
                 f"model.attention.head_dim must be a positive even number (RoPE), got {a.head_dim}")
    else:
        _require(a.q_lora_rank >= 0, f"model.attention.q_lora_rank must be >= 0, got {a.q_lora_rank}")
        _require(a.kv_lora_rank >= 1, f"model.attention.kv_lora_rank must be >= 1, got {a.kv_lora_rank}")
        _require(a.qk_rope_head_dim >= 2 and a.qk_rope_head_dim % 2 == 0,
                 f"model.attention.qk_rope_head_dim must be a positive even number, got {a.qk_rope_head_dim}")
        _require(a.qk_nope_head_dim >= 0 and a.v_head_dim >= 1,
                 "model.attention.qk_nope_head_dim must be >= 0 and v_head_dim >= 1")

    e = m.moe
    _require(e.num_experts >= 0 and e.num_zero_experts >= 0,
             "model.moe.num_experts and num_zero_experts must be >= 0")
    if e.num_experts > 0:
        _require(1 <= e.top_k <= e.num_experts + e.num_zero_experts,
                 f"model.moe.top_k={e.top_k} must be in [1, num_experts + num_zero_experts = "
                 f"{e.num_experts + e.num_zero_experts}]")
        _require(e.expert_dim >= 1, f"model.moe.expert_dim must be >= 1, got {e.expert_dim}")
        _require(e.grouped_matmul_tile >= 1,
                 f"model.moe.grouped_matmul_tile must be >= 1 (rows per tile of the tiled grouped matmul; "
                 f"64 is the measured default), got {e.grouped_matmul_tile}")
        ke = e.real_experts_per_token
        if ke is not None:
            _require(0 < ke <= e.top_k,
                     f"model.moe.real_experts_per_token={ke} must be in (0, top_k={e.top_k}] (or null: top_k)")
            _require(e.num_zero_experts > 0 or ke == e.top_k,
                     f"model.moe.real_experts_per_token={ke} must equal top_k={e.top_k} without zero experts "
                     "(set model.moe.num_zero_experts > 0, or null)")
        _require(e.bias_update_rate >= 0, f"model.moe.bias_update_rate must be >= 0, got {e.bias_update_rate}")
        _require(not (e.normalize_topk and e.routed_scale == "num_experts"),
                 "model.moe.routed_scale=num_experts scales an unnormalised routed mass up by (E + Z) / top_k; with "
                 "model.moe.normalize_topk=true the mass is already routed_scaling_factor: set one of them")
    else:
        _require(e.num_zero_experts == 0, "model.moe.num_zero_experts needs num_experts > 0")

    n, p = m.ngram, m.ple
    _require(n.row_multiple >= 1 and p.row_multiple >= 1,
             "model.ngram.row_multiple and model.ple.row_multiple must be >= 1")
    if n.enabled:
        _check_ngram_shape("model.ngram", "model.d_model", m.d_model, n.max_n, n.splits, n.ratio)
        _warn_simple_ratio("model.ngram.ratio", n.ratio, m.vocab_size)
    if p.kind == "plne":
        _check_ngram_shape("model.ple", "model.ffn_dim", m.ffn_dim, p.max_n, p.splits, p.ratio)
        _warn_simple_ratio("model.ple.ratio", p.ratio, m.vocab_size)

    _require(m.draft_head_ffn_dim >= 0, f"model.draft_head_ffn_dim must be >= 0 (0: model.ffn_dim), got "
             f"{m.draft_head_ffn_dim}")
    if m.draft_head == "ngram":
        _require(n.enabled, "model.draft_head=ngram drafts from the N-gram Embedding: set model.ngram.enabled=true")
    d, t = cfg.data, cfg.train
    _require(t.draft_head_weight >= 0, f"train.draft_head_weight must be >= 0, got {t.draft_head_weight}")
    if t.freeze_target:
        _require(m.draft_head != "none", "train.freeze_target=true trains only the draft head, and the model has "
                 "none: set model.draft_head=mtp (or ngram), or train.freeze_target=false")
        _require(t.draft_head_weight > 0, "train.freeze_target=true trains only the draft head's loss: set "
                 f"train.draft_head_weight > 0 (got {t.draft_head_weight})")
    _require(d.seq_len >= 2 and d.batch_size >= 1, "data.seq_len must be >= 2 and data.batch_size >= 1")
    _require(1 <= t.loss_chunks <= d.seq_len,
             f"train.loss_chunks must be between 1 and data.seq_len={d.seq_len}, got {t.loss_chunks}")
    _require(t.steps >= 1 and t.lr > 0 and 0 <= t.min_lr_ratio <= 1 and t.warmup_steps >= 0,
             "train.steps >= 1, train.lr > 0, 0 <= train.min_lr_ratio <= 1, train.warmup_steps >= 0")
    for key in ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "eval_batches"):
        _require(getattr(t, key) >= 1, f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.eval_at_tokens:
        points, last = t.eval_at_tokens, t.steps * d.batch_size * d.seq_len
        _require(all(p >= 1 for p in points) and all(a < b for a, b in zip(points, points[1:], strict=False)),
                 f"train.eval_at_tokens must be positive and increasing, got {list(points)}")
        _require(points[-1] <= last,
                 f"train.eval_at_tokens: {points[-1]:,} tokens is beyond the run's end (train.steps x data.batch_size "
                 f"x data.seq_len = {t.steps} x {d.batch_size} x {d.seq_len} = {last:,} tokens); raise train.steps to "
                 f"{-(-points[-1] // (d.batch_size * d.seq_len))} or drop the point")
        steps = [eval_step_for_tokens(p, d.batch_size, d.seq_len) for p in points]
        _require(len(set(steps)) == len(steps),
                 f"train.eval_at_tokens: {list(points)} fall on the steps {steps} (a step trains "
                 f"{d.batch_size * d.seq_len:,} tokens), some twice; space the points at least one step apart")
        _require(t.schedule == "constant",
                 f"train.eval_at_tokens asks for a loss-vs-tokens curve, whose points are comparable only under "
                 f"train.schedule=constant: the {t.schedule} schedule decays over train.steps={t.steps}, so its loss "
                 "at an intermediate step is not the loss of a shorter run; set train.schedule=constant")
    for key, sizes in (("mesh.ici", cfg.mesh.ici), ("mesh.dcn", cfg.mesh.dcn)):
        values = [getattr(sizes, a) for a in MESH_AXES]
        _require(all(v == -1 or v >= 1 for v in values) and values.count(-1) <= 1,
                 f"{key}: axis sizes must be >= 1, with at most one -1 (fill), got "
                 f"{dict(zip(MESH_AXES, values, strict=True))}")



def eval_step_for_tokens(tokens: int, batch_size: int, seq_len: int) -> int:
    """The first training step whose tokens (step x batch_size x seq_len) reach ``tokens``."""
    return -(-tokens // (batch_size * seq_len))


def nearest_simple_fraction(ratio: float, max_denominator: int = 4) -> Fraction:
    return Fraction(str(ratio)).limit_denominator(max_denominator)


def _warn_simple_ratio(key: str, ratio: float, vocab: int, tolerance: float = 0.01) -> None:
    """Paper 3.2.2: table sizes near integer or simple-fraction multiples of V collide more."""
    frac = nearest_simple_fraction(ratio)
    if abs(float(frac) - ratio) < tolerance:
        warnings.warn(
            f"{key}={ratio} is within {tolerance} of {frac} (a simple fraction): sub-tables of about "
            f"{float(frac)}*V = {int(float(frac) * vocab):,} rows collide more (paper section 3.2.2); "
            f"prefer a ratio such as {float(frac) + 0.37:g}, and measure with python -m ngram_jax.tools.collisions",
            ConfigWarning,
            stacklevel=4,
        )
