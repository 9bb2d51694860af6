"""Tokens/s the grain input pipeline delivers vs tokens/s the default training (make train) consumes.

    python benchmarks/input_pipeline.py [--config configs/train_tiny.yaml --batches 200]

Pipeline: shuffle + packing + next-token targets + batching (the model computes n-gram ids itself,
on device).
Training: the jitted step of the same config on this machine. Goal: the pipeline is at least 10x
faster than training consumes.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import jax
from flax import nnx

from ngram_jax.config import ConfigWarning, load_config
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import ensure_bundled


def pipeline_rate(cfg, batches: int) -> float:
    it = iter(make_dataset(cfg.data.path, "train", seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                           vocab_size=cfg.model.vocab_size, seed=0))
    next(it)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        n += next(it)["inputs"].size
    return n / (time.perf_counter() - t0)


def training_rate(cfg, steps: int) -> float:
    from ngram_jax.sharding import param_context
    from ngram_jax.train.loop import train_step
    from ngram_jax.train.state import build_train_state

    model, opt = build_train_state(cfg)
    it = iter(make_dataset(cfg.data.path, "train", seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                           vocab_size=cfg.model.vocab_size, seed=0))
    batches = [next(it) for _ in range(steps + 1)]
    with param_context(None):
        step = nnx.jit(train_step, donate_argnums=(0, 1))
        jax.block_until_ready(step(model, opt, batches[0]))
        t0 = time.perf_counter()
        for b in batches[1:]:
            out = step(model, opt, b)
        jax.block_until_ready(out)
    return steps * cfg.data.batch_size * cfg.data.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/train_tiny.yaml")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=20)
    args = ap.parse_args()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(args.config)
    ensure_bundled(cfg.data.path, cfg.model.vocab_size)
    plain = pipeline_rate(cfg, args.batches)
    train = training_rate(cfg, args.train_steps)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"{args.config}: batch {cfg.data.batch_size} x seq {cfg.data.seq_len}")
    for name, rate in (("pipeline (packing, targets, batching)", plain),
                       ("training step (jitted, 1 device)", train)):
        print(f"{name:<54} {rate:>11,.0f} tokens/s  {rate / train:6.1f}x training")


if __name__ == "__main__":
    main()
