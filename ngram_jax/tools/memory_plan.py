"""The per-device memory estimate of a training step on a mesh, from abstract shapes (no devices, nothing
allocated): parameters split by the config's logical axis rules (``mesh.rules``) exactly as training splits
them; the optimizer state (AdamW's two float32 moments, or one float32 per row for
``train.table_optimizer=rowwise_adagrad``) sharded like its parameters; the model's other variables and the
batch; the float32 gradients and the activations the backward pass keeps (:func:`activation_plan`, for
``model.dtype`` and ``model.remat``), assuming a memory-minimising schedule. The CLI is
``python -m ngram_jax.tools.plan``; ``ngram_jax.tools.aot`` prints this estimate beside libtpu's figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from flax import nnx

from ngram_jax.config import Config
from ngram_jax.layers.attention import query_blocks
from ngram_jax.model import build_model
from ngram_jax.ngram.lookup import NgramTable, Table


@dataclass(frozen=True)
class ParamPlan:
    path: str
    shape: tuple[int, ...]
    dtype_bytes: int
    shards: int  # devices the parameter is split over
    problem: str = ""  # a dimension the mesh cannot split
    table: str = ""  # "ngram" (a hashed N-gram table), "token" (another embedding table) or ""

    @property
    def bytes_per_device(self) -> int:
        return math.ceil(math.prod(self.shape) / self.shards) * self.dtype_bytes


def plan_params(cfg: Config, mesh: dict[str, int], which=nnx.Param) -> list[ParamPlan]:
    """Every model variable of type ``which`` (default: the parameters) with its per-device size."""
    rules = {name: axes for name, axes in cfg.mesh.rules}
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, which)):
        names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
        shards, used, problem = 1, set(), ""
        for dim, logical in enumerate(names):
            axes = [a for a in rules.get(logical, ()) if mesh[a] > 1 and a not in used]
            n = math.prod(mesh[a] for a in axes)
            if n > 1 and var.shape[dim] % n:
                problem = f"dim {dim} ({logical}) = {var.shape[dim]} not divisible by {n}"
                continue
            used.update(axes)
            shards *= n
        table = "ngram" if isinstance(var, NgramTable) else "token" if isinstance(var, Table) else ""
        out.append(ParamPlan("/".join(map(str, path)), tuple(var.shape), np.dtype(var.dtype).itemsize, shards,
                             problem, table))
    return out


def optimizer_bytes(cfg: Config, plans: list[ParamPlan]) -> int:
    """AdamW's float32 mu and nu per parameter; ``rowwise_adagrad`` keeps one float32 per N-gram table row."""
    total = 0
    for p in plans:
        local = math.ceil(math.prod(p.shape) / p.shards)
        if p.table == "ngram" and cfg.train.table_optimizer == "rowwise_adagrad":
            total += math.ceil(p.shape[0] / p.shards) * 4
        else:
            total += local * 4 * 2
    return total


def step_plan(cfg: Config, mesh: dict[str, int], batch: int, seq: int, backend: str = "tpu") -> dict[str, float]:
    """Bytes per device of one jitted training step, by term (see the module docstring):
    ``params``, ``optimizer``, ``state`` (other model variables), ``batch`` (5 int32/float32 arrays
    [B, S]: inputs, targets, segment ids, positions, loss mask), ``arguments`` (their sum), ``gradients``
    (float32, sharded like the parameters; those of the input tables are formed last, after the
    activations are freed), the :func:`activation_plan` terms, ``temporaries`` and ``total``."""
    plans = plan_params(cfg, mesh)
    state = plan_params(cfg, mesh, nnx.Not(nnx.Param))
    rules = dict(cfg.mesh.rules)
    tokens = batch * seq / math.prod(mesh[a] for a in rules.get("batch", ()))
    out = {"params": sum(p.bytes_per_device for p in plans), "optimizer": optimizer_bytes(cfg, plans),
           "state": sum(p.bytes_per_device for p in state), "batch": 5 * 4 * tokens}
    out["arguments"] = out["params"] + out["optimizer"] + out["state"] + out["batch"]
    grads = {True: 0, False: 0}
    for p in plans:
        grads[p.table != ""] += math.ceil(math.prod(p.shape) / p.shards) * 4
    act = activation_plan(cfg, mesh, batch, seq, backend)
    out["gradients"] = grads[False] + grads[True]
    out.update(act)
    # while the activations are live only the dense gradients are; the tables' come after
    out["temporaries"] = max(grads[False] + sum(act.values()), grads[False] + grads[True] + act["embed"])
    out["total"] = out["arguments"] + out["temporaries"]
    return out


# ----------------------------------------------------------------------------------------------
# Activations: what the backward pass keeps, per token and per device (elements; see activation_plan)


def _attention_terms(m, tensor: int, seq: int) -> dict[str, float]:
    """Elements per token one attention sublayer keeps for its backward pass (heads split over ``tensor``)."""
    a = m.attention
    if a.kind == "mla":
        qk, dv = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        lora = 2 * a.q_lora_rank + (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank  # q_a (+ norm), kv_a, latent
        qkv = a.num_heads * (2 * qk + dv) / tensor  # q, k and v
        ctx, heads = a.num_heads * dv / tensor, a.num_heads / tensor
    else:
        lora = 0
        qkv = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim / tensor
        ctx, heads = a.num_heads * a.head_dim / tensor, a.num_heads / tensor
    n = query_blocks(seq)  # query block j keeps its probabilities against keys 0..j: (n + 1) / 2n of S per query
    return {"attn_in": m.d_model, "lora": lora, "qkv": qkv, "probs": heads * seq * (n + 1) / (2 * n), "attn_ctx": ctx,
            "attn_out": m.d_model}


def _ffn_terms(m, tensor: int) -> dict[str, float]:
    """One dense FFN: its input, the two pre-activations (gate, up or the per-layer embedding) and the hidden."""
    return {"ffn_in": m.d_model, "pre": 2 * m.ffn_dim / tensor, "ffn_hidden": m.ffn_dim / tensor}


def _moe_terms(m, expert_shards: int, backend: str) -> dict[str, float]:
    """The MoE shortcut per token: router logits and probabilities (float32, counted as elements of 4 bytes
    via ``router``), then per routed row the gathered input and the expert SwiGLU. On TPU/GPU the grouped
    matmul's cost follows its rows (gate, up, hidden of width F_e, output D); XLA:CPU lowers ``ragged_dot``
    densely, every row against every local expert: [rows, E_loc * F_e] for gate and up, [rows, E_loc * D]
    for down. Rows per token: ``top_k`` (one per assignment); with experts split over ``expert_shards``
    devices (expert parallelism, ``layers.moe.combine_expert_parallel``) every device sends and receives
    fixed buffers of ``capacity`` rows per peer: ``top_k`` per token and peer when dropless (any assignment
    could go to one device), ``capacity_factor * top_k / E_shards`` with capacity dispatch; each row of those
    buffers is sent, received, run through the experts and sent back (4D + 3F_e)."""
    e = m.moe
    if not e.num_experts:
        return {}
    e_loc = e.num_experts / expert_shards
    if expert_shards > 1:
        per_peer = e.top_k if e.dispatch != "capacity" else e.capacity_factor * e.top_k / expert_shards
        rows = expert_shards * per_peer
        return {"router": 2 * (e.num_experts + e.num_zero_experts),
                "experts": rows * (4 * m.d_model + 3 * e.expert_dim), "moe_out": m.d_model}
    if backend == "cpu":
        per_assignment = m.d_model + e_loc * (2 * e.expert_dim + m.d_model)
    else:
        per_assignment = m.d_model + 3 * e.expert_dim + m.d_model
    return {"router": 2 * (e.num_experts + e.num_zero_experts), "experts": e.top_k * per_assignment,
            "moe_out": m.d_model}


def activation_plan(cfg: Config, mesh: dict[str, int], batch: int, seq: int, backend: str = "tpu"
                    ) -> dict[str, float]:
    """Bytes per device of what one training step keeps for (and needs during) its backward pass.

    ``tokens`` = batch * seq / batch shards; ``c`` = bytes of ``model.dtype``. Terms (bytes):

    - ``block``: what one ScMoE block keeps without rematerialisation, per token: for each of its 2
      attention sublayers the normalised input (D), the MLA LoRA activations (q_a and its norm, kv_a, the
      latent), q, k, v, the softmax probabilities (H * S * (n + 1) / 2n per token with n query blocks,
      ``layers.attention.query_blocks``: the backward of softmax and of probabilities @ V both read the
      softmax output, nothing else of the scores), the context before the output projection and the
      sublayer output (D); for each of its 2 dense FFNs the input (D), the two pre-activations and the
      hidden (3F); the MoE terms of :func:`_moe_terms`; the residual stream after each of the 4 sublayers
      (4D). Elements times c.
    - ``kept``: what every block keeps between its forward and its backward pass under ``model.remat``:
      ``none``: ``block``; ``block``: the block input (D); ``dots``: the block input and the outputs of
      the weight matmuls (LoRA, q/k/v and output projections, FFN gate/up/down, router logits);
      ``names``: the block input and the named activations (``config.REMAT_NAMES``) of
      ``model.remat_names``. Times ``model.num_blocks``.
    - ``recompute``: with rematerialisation, the backward of the last block recomputes the activations it
      did not keep (``block - kept``) and holds the cotangent of its largest sublayer (attention or MoE)
      next to them.
    - ``head``: the float32 softmax and logit gradient of one of the ``train.loss_chunks`` pieces of the
      sequence, tokens / loss_chunks * V / vocab shards * 4 * 2 (``train.loss.linear_cross_entropy`` forms
      each piece's input and weight gradients in the forward pass, while every block's activations are alive).
    - ``embed``: the input embedding output (D) and, with NE, the gathered rows and the combined mean (2D).
    """
    m = cfg.model
    rules = dict(cfg.mesh.rules)
    shards = lambda logical: math.prod(mesh[a] for a in rules.get(logical, ()))  # noqa: E731
    tokens = batch * seq / shards("batch")
    tensor = shards("heads")
    c = np.dtype(m.dtype).itemsize
    attn, ffn = _attention_terms(m, tensor, seq), _ffn_terms(m, tensor)
    moe = _moe_terms(m, shards("expert"), backend)
    f32 = {"probs", "router"}  # softmax statistics stay float32 whatever the compute dtype
    nbytes = lambda terms: sum(v * (4 if k in f32 else c) for k, v in terms.items())  # noqa: E731
    block = 2 * nbytes(attn) + 2 * nbytes(ffn) + nbytes(moe) + 4 * m.d_model * c
    if m.remat == "none":
        kept = block
    elif m.remat == "block":
        kept = m.d_model * c
    elif m.remat == "dots":
        a = m.attention
        if a.kind == "mla":
            proj = (a.q_lora_rank + a.num_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) / tensor
                    + a.kv_lora_rank + a.qk_rope_head_dim + a.num_heads * (a.qk_nope_head_dim + a.v_head_dim) / tensor)
        else:
            proj = (a.num_heads + 2 * a.num_kv_heads) * a.head_dim / tensor
        dots = 2 * (proj + m.d_model) + 2 * (2 * m.ffn_dim / tensor + m.d_model)
        kept = (m.d_model + dots) * c + 4 * moe.get("router", 0) / 2
    else:
        named = {"attn_in": 2 * attn["attn_in"], "qkv": 2 * attn["qkv"], "attn_ctx": 2 * attn["attn_ctx"],
                 "attn_out": 2 * attn["attn_out"], "ffn_in": 2 * ffn["ffn_in"], "ffn_hidden": 2 * ffn["ffn_hidden"],
                 "moe_out": moe.get("moe_out", 0)}
        kept = (m.d_model + sum(named[n] for n in m.remat_names)) * c
    recompute = 0.0 if m.remat == "none" else block - kept + max(nbytes(attn), nbytes(moe))
    head = m.vocab_size / shards("vocab") * 4 * 2 / cfg.train.loss_chunks
    embed = (3 if m.ngram.enabled else 1) * m.d_model * c
    return {"blocks": tokens * m.num_blocks * kept, "recompute": tokens * recompute, "head": tokens * head,
            "embed": tokens * embed}


def activation_bytes(cfg: Config, mesh: dict[str, int], batch: int, seq: int, backend: str = "tpu") -> int:
    """The total of :func:`activation_plan`."""
    return int(sum(activation_plan(cfg, mesh, batch, seq, backend).values()))
