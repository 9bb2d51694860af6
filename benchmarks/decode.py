"""Decode tokens/s of the tiny NE model vs the same model with a plain embedding, side by side.

    python benchmarks/decode.py [--batch 8 --prompt 32 --new 128 --repeats 3]

Times the jitted decode step (KV cache + N-gram cache) after a prefill; both models share every
other setting (tiny_ne vs tiny_plain). Goal: NE costs at most 5% per token.
Last line: ``decode_ne_overhead=<NE time per token / plain time per token>``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngram_jax import generate as gen
from ngram_jax.config import ConfigWarning, load_config
from ngram_jax.model import build_model
from ngram_jax.sharding import param_context


def decode_rate(name: str, batch: int, prompt: int, new: int, repeats: int, overrides=()) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(f"configs/models/{name}.yaml", overrides=list(overrides))
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, cfg.model.vocab_size, (batch, prompt)), jnp.int32)
    seg = jnp.ones_like(tokens)
    prefill = gen.frozen(gen.prefill, model, static_argnums=(2,))
    # the parameters are inputs only (no per-call copies); the state is donated (the KV cache updated in place)
    step = gen.frozen(gen.decode_step, model, donate_argnums=(1,))
    times = []
    for _ in range(repeats + 1):
        logits, state = prefill(tokens, seg, prompt + new + 1)
        nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        logits, state = jax.block_until_ready(step(nxt, state))  # compiled (one more position in the cache)
        t0 = time.perf_counter()
        for _ in range(new):
            logits, state = step(nxt, state)
            nxt = jnp.argmax(logits, -1).astype(jnp.int32)
        jax.block_until_ready(nxt)
        times.append(time.perf_counter() - t0)
    return batch * new / statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides for both models, e.g. model.d_model=256")
    args = ap.parse_args()
    rates: dict[str, list[float]] = {"tiny_plain": [], "tiny_ne": []}
    for _ in range(3):  # interleaved rounds, so that machine noise hits both alike
        for name in rates:
            rates[name].append(decode_rate(name, args.batch, args.prompt, args.new, args.repeats, args.overrides))
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, median of 3 rounds x {args.repeats}; "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    plain, ne = statistics.median(rates["tiny_plain"]), statistics.median(rates["tiny_ne"])
    print("rounds (tokens/s):", {k: [round(x) for x in v] for k, v in rates.items()})
    print(f"tiny_plain  {plain:>10,.0f} tokens/s")
    print(f"tiny_ne     {ne:>10,.0f} tokens/s   NE cost per token: {plain / ne - 1:+.1%}")
    print(f"decode_ne_overhead={plain / ne:.3f}")


if __name__ == "__main__":
    main()
