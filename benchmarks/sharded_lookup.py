"""Collective bytes per step and step time of the sharded N-gram lookup for two table sizes.

    python benchmarks/sharded_lookup.py [--mesh data=2,fsdp=2,expert=2 --ratios 4,64]

Runs on 8 simulated CPU devices (forced below). For each table ratio r it compiles forward+backward
of an NgramEmbedding whose flattened table is row-sharded over the whole mesh, sums the result
sizes of every collective in the compiled HLO, and times the step. The bytes must be equal: the
lookup moves ids and gathered rows, never table rows it does not need.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from timing import median_seconds  # noqa: E402

from ngram_jax.ngram.embedding import NgramEmbedding  # noqa: E402
from ngram_jax.sharding import create_sharded, make_mesh_from_spec, param_context  # noqa: E402

COLLECTIVE = re.compile(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(-start)?\(")
SHAPE = re.compile(r"(pred|[suf]\d+|bf16)\[([\d,]*)\]")
BYTES = {"pred": 1, "bf16": 2}


def collective_bytes(hlo: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in hlo.splitlines():
        m = COLLECTIVE.search(line)
        if not m:
            continue
        for dtype, dims in SHAPE.findall(m.group(1)):
            size = BYTES.get(dtype, int(dtype[1:]) // 8 if dtype[1:].isdigit() else 4)
            out[m.group(2)] = out.get(m.group(2), 0) + size * int(np.prod([int(d) for d in dims.split(",") if d]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mesh", default="data=2,fsdp=2,expert=2")
    ap.add_argument("--ratios", default="4,64")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    mesh = make_mesh_from_spec(args.mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.seq)), jnp.int32)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {len(jax.devices())} simulated CPU devices, "
          f"jax {jax.__version__}; mesh {args.mesh}; V={args.vocab} D={args.d_model} N=3 K=2 "
          f"tokens={args.batch}x{args.seq}")
    rows = []
    for r in (float(x) for x in args.ratios.split(",")):
        layer = create_sharded(lambda r=r: NgramEmbedding(args.vocab, args.d_model, max_n=3, splits=2, ratio=r,
                                                          eos_id=0, row_multiple=8, rngs=nnx.Rngs(0)), mesh)
        with param_context(mesh):
            step = nnx.jit(nnx.value_and_grad(lambda m, t: jnp.mean(m(t) ** 2)))
            hlo = step.lower(layer, tokens).compile().as_text()
            seconds = median_seconds(lambda layer=layer, step=step: step(layer, tokens), args.repeats)
        table = layer.ngram_table[...]
        coll = collective_bytes(hlo)
        rows.append(dict(ratio=r, table_rows=table.shape[0], table_mb=table.nbytes / 2**20,
                         table_shard_mb=max(s.data.nbytes for s in table.addressable_shards) / 2**20,
                         collective_bytes=sum(coll.values()), by_op=coll, step_ms=seconds * 1e3))
    print(f"{'ratio':>6} {'table rows':>11} {'table MB':>9} {'shard MB':>9} {'collective bytes':>17} {'step ms':>8}")
    for x in rows:
        print(f"{x['ratio']:>6g} {x['table_rows']:>11,} {x['table_mb']:>9.1f} {x['table_shard_mb']:>9.1f} "
              f"{x['collective_bytes']:>17,} {x['step_ms']:>8.1f}")
    print("collectives by op:", {x["ratio"]: x["by_op"] for x in rows})
    print("bytes equal across table sizes:", len({x["collective_bytes"] for x in rows}) == 1)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
