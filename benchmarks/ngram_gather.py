"""Fused hashed gather: bytes a perfect implementation moves (the roofline) and achieved GB/s per
implementation, forward and backward, next to the machine's measured copy bandwidth.

    python benchmarks/ngram_gather.py [--vocab 32768 --ratio 8.37 --d-e 128 --batch 16 --seq 1024]

Roofline bytes: forward reads the ids and T rows per token and writes them (2 x rows + ids);
backward reads the row cotangents and read-modify-writes the table rows (3 x rows). The Pallas TPU
kernel only runs on a TPU (its CPU interpret mode is a simulator, not a speed); it is listed when a
TPU is present.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from timing import median_seconds

from ngram_jax.kernels.ngram_gather import available_implementations, ngram_gather
from ngram_jax.ngram import hashing


def timed(fn, *args, repeats: int) -> float:
    return median_seconds(lambda: fn(*args), repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--ratio", type=float, default=8.37)
    ap.add_argument("--max-n", type=int, default=3)
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--d-e", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    lay = hashing.make_layout(args.vocab, args.max_n, args.splits, args.ratio)
    table = jax.random.normal(jax.random.key(0), (lay.padded_rows, args.d_e), jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.seq)), jnp.int32)
    n_tok, t = args.batch * args.seq, lay.num_tables
    rows_bytes = n_tok * t * args.d_e * 4
    fwd_bytes, bwd_bytes = 2 * rows_bytes + n_tok * 4, 3 * rows_bytes + n_tok * 4

    big = jnp.ones((64 << 20,), jnp.float32)  # 256 MiB
    copy_s = timed(jax.jit(lambda x: x + 1.0), big, repeats=args.repeats)
    copy_gbs = 2 * big.nbytes / copy_s / 1e9
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}; V={args.vocab} r={args.ratio} N={args.max_n} K={args.splits} d_e={args.d_e} "
          f"tokens={args.batch}x{args.seq}; table {table.nbytes / 2**20:.0f} MiB")
    print(f"copy bandwidth (read + write of 256 MiB): {copy_gbs:.1f} GB/s")
    print(f"roofline bytes: forward {fwd_bytes / 1e6:.1f} MB, backward {bwd_bytes / 1e6:.1f} MB")
    print(f"{'implementation':<16} {'fwd ms':>8} {'fwd GB/s':>9} {'bwd ms':>8} {'bwd GB/s':>9}")
    impls = [n for n in available_implementations() if n != "reference"] + ["reference"]
    w = jax.random.normal(jax.random.key(1), (args.batch, args.seq, t, args.d_e))
    for impl in impls:
        fwd = jax.jit(lambda tok, tb, impl=impl: ngram_gather(tok, tb, layout=lay, eos_id=0, implementation=impl))
        grad = jax.jit(jax.grad(lambda tb, tok, impl=impl: jnp.sum(
            ngram_gather(tok, tb, layout=lay, eos_id=0, implementation=impl) * w)))
        f_s = timed(fwd, tokens, table, repeats=args.repeats)
        b_s = timed(grad, table, tokens, repeats=args.repeats) - f_s
        print(f"{impl:<16} {f_s * 1e3:>8.2f} {fwd_bytes / f_s / 1e9:>9.2f} {b_s * 1e3:>8.2f} "
              f"{bwd_bytes / max(b_s, 1e-9) / 1e9:>9.2f}")


if __name__ == "__main__":
    main()
