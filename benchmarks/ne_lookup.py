"""Forward+backward time of NgramEmbedding vs a plain embedding of the same D, same tokens.

    python benchmarks/ne_lookup.py [--vocab 8192 --d-model 512 --batch 8 --seq 512 --ratios 1,8,64]

Reports the median step time of each and the NE / plain ratio, measured side by side in one run.
The backward pass materialises a dense table gradient, so its cost grows with the table size
(sparse row-wise updates are the cure; see the roadmap in the README).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import median_seconds

from ngram_jax.ngram.embedding import NgramEmbedding
from ngram_jax.ngram.lookup import token_lookup
from ngram_jax.sharding import param_context


class PlainEmbedding(nnx.Module):
    def __init__(self, vocab: int, d: int, rngs: nnx.Rngs):
        self.embedding = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, d)))

    def __call__(self, tokens):
        return token_lookup(self.embedding[...], tokens)


def time_fwd_bwd(module: nnx.Module, tokens: jax.Array, repeats: int) -> float:
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def step(p, t):
        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p, rest)(t) ** 2)

        return jax.value_and_grad(loss)(p)

    return median_seconds(lambda: step(params, tokens), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--max-n", type=int, default=3)
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--ratios", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()

    tokens = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.seq)), jnp.int32)
    with param_context():
        plain = time_fwd_bwd(PlainEmbedding(args.vocab, args.d_model, nnx.Rngs(0)), tokens, args.repeats)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}; V={args.vocab} D={args.d_model} N={args.max_n} K={args.splits} "
          f"tokens={args.batch}x{args.seq}")
    print(f"{'ratio r':>8} {'table rows':>11} {'table MB':>9} {'NE ms':>8} {'plain ms':>9} {'NE/plain':>9}")
    results = []
    for r in (float(x) for x in args.ratios.split(",")):
        with param_context():
            ne = NgramEmbedding(args.vocab, args.d_model, max_n=args.max_n, splits=args.splits, ratio=r,
                                eos_id=0, rngs=nnx.Rngs(0))
        t = time_fwd_bwd(ne, tokens, args.repeats)
        mb = ne.ngram_table[...].nbytes / 2**20
        results.append(dict(ratio=r, rows=ne.layout.total_rows, table_mb=mb, ne_ms=t * 1e3,
                            plain_ms=plain * 1e3, ne_over_plain=t / plain))
        print(f"{r:>8g} {ne.layout.total_rows:>11,} {mb:>9.1f} {t * 1e3:>8.2f} {plain * 1e3:>9.2f} "
              f"{t / plain:>8.1f}x")
        del ne
    print(json.dumps(results))


if __name__ == "__main__":
    main()
