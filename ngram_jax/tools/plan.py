"""Per-device memory plan of a training step on a mesh, from abstract shapes (no devices, nothing allocated).

    python -m ngram_jax.tools.plan configs/models/longcat_flash_lite.yaml --mesh data=64,fsdp=4,expert=8 \\
        --batch 1024 --seq 4096
    python -m ngram_jax.tools.plan configs/models/tiny_ne.yaml --mesh data=1 --batch 8 --seq 128 --backend cpu \\
        --measure    # also compile the real step here and print XLA's memory analysis next to the plan

Parameters are split by the config's logical axis rules (``mesh.rules``) exactly as training would
split them; the optimizer state is AdamW's two float32 moments (one float32 per row for
``train.table_optimizer=rowwise_adagrad``), sharded like their parameters; the step's arguments add
the model's other variables (selection bias, routing statistics, N-gram row usage) and the batch.
Temporaries are the float32 gradients and the activations of :func:`activation_plan` (what the backward
pass keeps, for ``model.dtype`` and ``model.remat``). The prediction assumes a memory-minimising schedule
(TPU, GPU); XLA:CPU's default concurrency-optimised scheduler trades memory for parallelism, so
``--measure`` compiles with ``--xla_cpu_enable_concurrency_optimized_scheduler=false`` (docs/TRAINING.md, Memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from ngram_jax.budget import check_config
from ngram_jax.config import Config, ConfigError, load_config
from ngram_jax.layers.attention import query_blocks
from ngram_jax.model import build_model
from ngram_jax.ngram.lookup import NgramTable, Table
from ngram_jax.sharding import parse_mesh_spec


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


def measure_step(cfg: Config, batch: int, seq: int) -> dict[str, int]:
    """XLA's compiled memory analysis of the real training step (``ngram_jax.train.loop.train_step``, state
    donated as the loop runs it) on one device of this machine: ``arguments``, ``outputs``, ``aliased``,
    ``temporaries`` and ``total`` (arguments + temporaries) in bytes. Nothing is run. Compare with the plan
    under :data:`MEMORY_SCHEDULER_FLAG` in ``XLA_FLAGS`` (set before JAX starts its backend; the CLI's
    ``--measure`` does it)."""
    import jax.numpy as jnp

    from ngram_jax.train.loop import train_step
    from ngram_jax.train.state import build_train_state

    with nnx.use_eager_sharding(False):
        model, opt = nnx.eval_shape(lambda: build_train_state(cfg))
    graph, state = nnx.split((model, opt))

    def step(state, batch):
        m, o = nnx.merge(graph, state)
        out = train_step(m, o, batch, cfg.train.draft_head_weight, cfg.train.loss_chunks)
        return nnx.state((m, o)), out

    i32 = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    data = {"inputs": i32, "targets": i32, "segment_ids": i32, "positions": i32,
            "loss_mask": jax.ShapeDtypeStruct((batch, seq), jnp.float32)}
    mem = jax.jit(step, donate_argnums=0).lower(state, data).compile().memory_analysis()
    return {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "total": mem.argument_size_in_bytes + mem.temp_size_in_bytes}


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


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.tools.plan", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--mesh", required=True, help="axis sizes, e.g. data=64,fsdp=4,expert=8")
    ap.add_argument("--batch", type=int, default=None, help="global batch (sequences); default: one per batch shard")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--top", type=int, default=8, help="largest parameters to list")
    ap.add_argument("--backend", choices=("tpu", "gpu", "cpu"), default="tpu",
                    help="how ragged_dot (dropless MoE) is lowered: grouped on tpu/gpu, dense on cpu")
    ap.add_argument("--measure", action="store_true",
                    help="also compile the training step on this machine's first device (one device: use a "
                         "mesh of 1) and print XLA's memory analysis next to the plan")
    ap.add_argument("--topology", help="a TPU topology, e.g. v5p:4x4x8: compile the step for it with libtpu "
                    "(python -m ngram_jax.tools.aot) and report the compiler's memory in place of the estimate")
    ap.add_argument("--json", action="store_true", help="print the plan (and the measurement) as one JSON object")
    args = ap.parse_args(argv)
    cfg = check_config(load_config(args.config, args.overrides))
    mesh = parse_mesh_spec(args.mesh)
    plans = plan_params(cfg, mesh)
    n_dev = math.prod(mesh.values())
    batch = args.batch or math.prod(mesh[a] for a in dict(cfg.mesh.rules).get("batch", ()))
    plan = step_plan(cfg, mesh, batch, args.seq, args.backend)
    if args.measure and n_dev != 1:
        raise ConfigError(f"--measure compiles on one device; use --mesh data=1 (got {args.mesh})")
    compiled = None
    if args.topology:  # the compiler's figure replaces the estimate (the estimate is printed beside it)
        from ngram_jax.tools.aot import compile_for_tpu

        compiled = compile_for_tpu(cfg, args.topology, mesh_spec=args.mesh, batch=batch, seq=args.seq)
    if args.json:
        out = {"plan": plan} | ({"measured": measure_step(cfg, batch, args.seq)} if args.measure else {})
        if compiled is not None:
            out["compiled"] = compiled.to_json()
        print(json.dumps(out))
        return 0
    act = plan["blocks"] + plan["recompute"] + plan["head"] + plan["embed"]
    total_params = sum(math.prod(p.shape) for p in plans)
    print(f"{cfg.name}: {total_params:,} parameters on mesh {args.mesh} ({n_dev} devices), "
          f"batch {batch} x seq {args.seq}, model.dtype={cfg.model.dtype}, model.remat={cfg.model.remat}")
    print(f"  parameters       {gib(plan['params']):>14} per device")
    print(f"  optimizer state  {gib(plan['optimizer']):>14} per device (AdamW: 2 float32 moments, sharded like the "
          "parameters)")
    print(f"  other state+batch{gib(plan['state'] + plan['batch']):>14} per device")
    print(f"  gradients        {gib(plan['gradients']):>14} per device (float32)")
    print(f"  activations      {gib(act):>14} per device (blocks {gib(plan['blocks'])}, recompute "
          f"{gib(plan['recompute'])}, logits {gib(plan['head'])}, embedding {gib(plan['embed'])}; {args.backend})")
    print(f"  total            {gib(plan['total']):>14} per device (arguments + temporaries)"
          + (" -- the estimate; the compiler's figure follows" if compiled is not None else ""))
    if compiled is not None:
        peak = compiled.peak_bytes
        where = f"{compiled.topology}, libtpu {compiled.libtpu}"
        if compiled.memory.get("peak"):
            print(f"  compiled         {gib(peak):>14} per device ({where}: arguments "
                  f"{gib(compiled.memory['arguments'])}, temporaries {gib(compiled.memory['temporaries'])}; "
                  f"{'fits' if compiled.fits else 'does NOT fit'} in {gib(compiled.hbm_bytes)}; estimate "
                  f"{(plan['total'] - peak) / peak:+.0%})")
        else:
            print(f"  compiled         needs {gib(peak)} of temporaries per device ({where}): does NOT fit in "
                  f"{gib(compiled.hbm_bytes)}")
    elif args.backend == "tpu" and importlib.util.find_spec("libtpu") is not None:
        print("  (libtpu is installed: --topology GEN:AxB[xC] replaces this estimate with the compiler's figure)")
    if args.measure:
        got = measure_step(cfg, batch, args.seq)
        for key in ("arguments", "temporaries", "total"):
            print(f"  XLA {key:<12} {mib(got[key]):>14}   plan {mib(plan[key])} "
                  f"({(plan[key] - got[key]) / got[key]:+.1%})")
    print(f"\nlargest parameters per device (of {len(plans)}):")
    for p in sorted(plans, key=lambda p: -p.bytes_per_device)[: args.top]:
        print(f"  {p.path:<40} {str(p.shape):<22} split {p.shards:>5}x -> {gib(p.bytes_per_device)}")
    problems = [p for p in plans if p.problem]
    for p in problems:
        print(f"warning: {p.path}: {p.problem} (left unsplit along it)", file=sys.stderr)
    replicated = [p for p in plans if p.shards == 1 and math.prod(p.shape) >= 1 << 20]
    if replicated and n_dev > 1:
        print(f"note: {len(replicated)} parameter(s) of 1M+ elements are replicated, e.g. {replicated[0].path}")
    return 0


# XLA:CPU's default scheduler optimises for concurrency, not memory (docs/TRAINING.md, Memory): --measure compiles
# with the memory-minimising one, which is what the plan predicts.
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

if __name__ == "__main__":
    import os

    if "--measure" in sys.argv:  # read when the backend starts, i.e. after this line
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER_FLAG}".strip()
    jax.config.update("jax_platforms", "cpu")
    from ngram_jax import cli

    sys.exit(cli.run(main))
