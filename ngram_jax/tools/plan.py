"""Per-device memory plan of a config on a mesh, from abstract shapes (no devices, nothing allocated).

    python -m ngram_jax.tools.plan configs/models/longcat_flash_lite.yaml --mesh data=64,fsdp=4,expert=8 \\
        --batch 1024 --seq 4096

Parameters are split by the config's logical axis rules (``mesh.rules``) exactly as training would
split them; the optimizer state is AdamW's two float32 moments, sharded like their parameters;
activations are an estimate of what one forward pass keeps for the backward pass without
rematerialisation (per ScMoE block: the attention inputs, q/k/v, scores and outputs, the FFN and
expert hidden states, the N-gram rows), plus the float32 logits.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from flax import nnx

from ngram_jax.budget import check_config
from ngram_jax.config import Config, load_config
from ngram_jax.model import build_model
from ngram_jax.sharding import parse_mesh_spec


@dataclass(frozen=True)
class ParamPlan:
    path: str
    shape: tuple[int, ...]
    dtype_bytes: int
    shards: int  # devices the parameter is split over
    problem: str = ""  # a dimension the mesh cannot split

    @property
    def bytes_per_device(self) -> int:
        return math.ceil(math.prod(self.shape) / self.shards) * self.dtype_bytes


def plan_params(cfg: Config, mesh: dict[str, int]) -> list[ParamPlan]:
    rules = {name: axes for name, axes in cfg.mesh.rules}
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
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
        out.append(ParamPlan("/".join(map(str, path)), tuple(var.shape), np.dtype(var.dtype).itemsize, shards,
                             problem))
    return out


def activation_bytes(cfg: Config, mesh: dict[str, int], batch: int, seq: int) -> int:
    m = cfg.model
    rules = dict(cfg.mesh.rules)
    batch_shards = math.prod(mesh[a] for a in rules.get("batch", ()))
    tensor = math.prod(mesh[a] for a in rules.get("heads", ()))
    tokens = batch * seq / batch_shards
    a, e = m.attention, m.moe
    if a.kind == "mla":
        qk, v = a.qk_nope_head_dim + a.qk_rope_head_dim, a.v_head_dim
        attn = m.d_model + a.q_lora_rank + a.kv_lora_rank + a.num_heads * (2 * qk + 2 * v) / tensor
    else:
        attn = m.d_model + (a.num_heads * 2 + a.num_kv_heads * 2) * a.head_dim / tensor
    scores = a.num_heads / tensor * seq  # the attention probabilities XLA keeps per query
    ffn = m.d_model + 3 * m.ffn_dim / tensor
    moe = (m.d_model + e.top_k * (m.d_model + 3 * e.expert_dim)) if e.num_experts else 0
    per_block = 2 * (attn + scores + ffn) + moe + 4 * m.d_model
    ngram = m.d_model * 2 if m.ngram.enabled else 0
    act = tokens * (m.num_blocks * per_block + ngram + m.d_model) * np.dtype(m.dtype).itemsize
    logits = tokens * m.vocab_size / math.prod(mesh[x] for x in rules.get("vocab", ())) * 4
    return int(act + logits)


def gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


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
    args = ap.parse_args(argv)
    cfg = check_config(load_config(args.config, args.overrides))
    mesh = parse_mesh_spec(args.mesh)
    plans = plan_params(cfg, mesh)
    n_dev = math.prod(mesh.values())
    batch = args.batch or math.prod(mesh[a] for a in dict(cfg.mesh.rules).get("batch", ()))
    params = sum(p.bytes_per_device for p in plans)
    opt = sum(math.ceil(math.prod(p.shape) / p.shards) * 4 * 2 for p in plans)  # AdamW mu, nu in float32
    act = activation_bytes(cfg, mesh, batch, args.seq)
    total_params = sum(math.prod(p.shape) for p in plans)
    print(f"{cfg.name}: {total_params:,} parameters on mesh {args.mesh} ({n_dev} devices), "
          f"batch {batch} x seq {args.seq}")
    print(f"  parameters       {gib(params):>14} per device")
    print(f"  optimizer state  {gib(opt):>14} per device (AdamW: 2 float32 moments, sharded like the parameters)")
    print(f"  activations      {gib(act):>14} per device (estimate, no rematerialisation)")
    print(f"  total            {gib(params + opt + act):>14} per device")
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


if __name__ == "__main__":
    jax.config.update("jax_platforms", "cpu")
    from ngram_jax import cli

    sys.exit(cli.run(main))
