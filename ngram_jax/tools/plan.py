"""Per-device memory plan of a training step on a mesh, from abstract shapes (no devices, nothing allocated).

    python -m ngram_jax.tools.plan configs/models/longcat_flash_lite.yaml --mesh data=64,fsdp=4,expert=8 \\
        --batch 1024 --seq 4096
    python -m ngram_jax.tools.plan configs/models/tiny_ne.yaml --mesh data=1 --batch 8 --seq 128 --backend cpu \\
        --measure    # also compile the real step here and print XLA's memory analysis next to the plan

The estimate is :mod:`ngram_jax.tools.memory_plan`: parameters split by the config's logical axis rules
(``mesh.rules``) exactly as training splits them, the optimizer state, the model's other variables and the
batch, the float32 gradients and the activations the backward pass keeps. It assumes a memory-minimising schedule
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

import jax
from flax import nnx

from ngram_jax.budget import check_config
from ngram_jax.config import Config, ConfigError, load_config
from ngram_jax.sharding import parse_mesh_spec
from ngram_jax.tools.memory_plan import plan_params, step_plan


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
