"""MoE dispatch cost: the 8-expert tiny_ne vs its 33-expert parameter-equivalent baseline tiny_moe,
dropless with each grouped matmul (``ragged_dot``, ``tiled``) and capacity dispatch for reference.

    python benchmarks/moe_dispatch.py [--batch 8 --seq 256 --rounds 12 --tiles 32,128]

Each step is value_and_grad of the next-token cross-entropy (as benchmarks/model_step.py). Every
variant is compiled and warmed up first, then the rounds interleave them (one step of each per
round), so that load from other processes hits every row alike; the table gives the median step.
``--tiles`` adds tiled rows at other tile sizes (the default tile is the config's). A second table
times the grouped SwiGLU alone (fwd+bwd, 4096 rows = 8x256 tokens x top-2, D=128, F=64, the rows split
evenly over E experts) for E in ``--op-experts``: ``ragged_dot`` vs ``tiled``. The last line is
``moe33_over_moe8=<tiny_moe / tiny_ne dropless step with the default grouped matmul of this backend>``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from model_step import load

from ngram_jax.config import MoEConfig
from ngram_jax.layers.grouped_matmul import resolve_impl
from ngram_jax.layers.moe import sorted_swiglu
from ngram_jax.model import build_model
from ngram_jax.sharding import param_context


def make_step(cfg):
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))

    @nnx.jit
    def step(m, t):
        def loss(m):
            logits = m(t[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

        return nnx.value_and_grad(loss)(m)

    return model, step


def make_op(experts: int, impl: str, tile: int, rows: int = 4096, d: int = 128, f: int = 64):
    """value_and_grad of the grouped SwiGLU alone, rows split evenly over ``experts``."""
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (rows, d))
    gate, up = (jax.random.normal(k, (experts, d, f)) * 0.1 for k in ks[1:3])
    down = jax.random.normal(ks[3], (experts, f, d)) * 0.1
    sizes = jnp.full((experts,), rows // experts, jnp.int32).at[: rows % experts].add(1)

    def loss(x, gate, up, down):
        return jnp.sum(sorted_swiglu(x, sizes, gate, up, down, impl=impl, tile=tile) ** 2)

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    return lambda: fn(x, gate, up, down)


def interleaved(fns, rounds: int) -> list[list[float]]:
    """Compile and warm up every fn, then ``rounds`` rounds of one call each; seconds per call."""
    for fn in fns:
        jax.block_until_ready(fn())
        jax.block_until_ready(fn())
    times = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[i].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=12, help="timed steps per variant (median reported)")
    ap.add_argument("--tiles", default="", help="extra tile sizes for the tiled rows, e.g. 32,128")
    ap.add_argument("--op-experts", default="1,8,33,128",
                    help="expert counts of the grouped-SwiGLU table (empty: skip it)")
    args = ap.parse_args()
    default_impl = resolve_impl(MoEConfig.grouped_matmul)
    default_tile = MoEConfig.grouped_matmul_tile
    variants = []  # (label, config name, experts, overrides)
    for name, experts in (("tiny_ne", 8), ("tiny_moe", 33)):
        variants.append((f"{name} dropless ragged_dot", name, experts,
                         ("model.moe.dispatch=dropless", "model.moe.grouped_matmul=ragged_dot")))
        for tile in [default_tile] + [int(t) for t in args.tiles.split(",") if t]:
            variants.append((f"{name} dropless tiled m={tile}", name, experts,
                             ("model.moe.dispatch=dropless", "model.moe.grouped_matmul=tiled",
                              f"model.moe.grouped_matmul_tile={tile}")))
        variants.append((f"{name} capacity (factor 1.25)", name, experts, ("model.moe.dispatch=capacity",)))

    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 4096, (args.batch, args.seq + 1)).astype(np.int32))
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}; tokens/step={args.batch}x{args.seq}; rounds={args.rounds}; "
          f"default grouped matmul here: {default_impl}, tile {default_tile}", flush=True)
    op_experts = [int(e) for e in args.op_experts.split(",") if e]
    if op_experts:
        ops = [(e, impl) for e in op_experts for impl in ("ragged_dot", "tiled")]
        op_times = interleaved([make_op(e, impl, default_tile) for e, impl in ops], args.rounds)
        op_ms = {key: statistics.median(t) * 1e3 for key, t in zip(ops, op_times, strict=True)}
        print(f"| experts | ragged_dot ms | tiled m={default_tile} ms | ragged_dot / tiled |")
        print("|---:|---:|---:|---:|")
        for e in op_experts:
            r, t = op_ms[(e, "ragged_dot")], op_ms[(e, "tiled")]
            print(f"| {e} | {r:.1f} | {t:.1f} | {r / t:.1f}x |", flush=True)
    fns = []
    for _label, name, _, overrides in variants:
        model, step = make_step(load(name, overrides))
        fns.append(lambda model=model, step=step: step(model, tokens))
    times = interleaved(fns, args.rounds)
    med = [statistics.median(t) * 1e3 for t in times]
    ref = {name: med[i] for i, (label, name, _, _) in enumerate(variants)
           if label == f"{name} dropless {default_impl}" + (f" m={default_tile}" if default_impl == "tiled" else "")}
    print("| variant | experts | step ms (median) | min ms | max ms | vs tiny_ne default |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (label, _, experts, _) in enumerate(variants):
        print(f"| {label} | {experts} | {med[i]:.1f} | {min(times[i]) * 1e3:.1f} | {max(times[i]) * 1e3:.1f} | "
              f"{med[i] / ref['tiny_ne']:.2f}x |")
    print(f"moe33_over_moe8={ref['tiny_moe'] / ref['tiny_ne']:.3f}")


if __name__ == "__main__":
    main()
