"""The output head + cross-entropy inside the whole training step, side by side: the chunked head and loss
the library trains with (``train.loss_chunks`` pieces, ``ngram_jax.train.loss.linear_cross_entropy``)
against the logits-then-cross-entropy formulation it replaced (``Model.__call__`` logits [B, S, V], then
``mean_cross_entropy`` differentiated through them).

    python benchmarks/loss_head.py [--steps 10] [--configs study tiny_plain]

Each variant is a full ``TrainStep`` (what ``train.py`` runs: loss, backward, clipping, AdamW); the
variants run in interleaved rounds on one fixed batch, the median over rounds is reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import ngram_jax.train.loop as loop
from ngram_jax.config import ConfigWarning, load_config
from ngram_jax.model import default_positions
from ngram_jax.sharding import param_context
from ngram_jax.train.loss import loss_fn, mean_cross_entropy
from ngram_jax.train.state import build_train_state

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def logits_loss_fn(model, batch, draft_head_weight=1.0, loss_chunks=1):
    """The formulation before the chunked head: [B, S, V] logits, then the cross-entropy (no draft head)."""
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    loss = mean_cross_entropy(logits, batch["targets"], batch["loss_mask"])
    return loss + model.aux_loss(), loss


def make_step(cfg, loss, batch):
    """A compiled, warmed-up TrainStep whose train_step calls ``loss``."""
    loop.loss_fn = loss  # train_step reads the module's loss_fn when the step is traced: trace it here
    try:
        model, opt = build_train_state(cfg)
        with param_context():
            step = loop.make_train_step(cfg, model, opt)
            for _ in range(2):  # compile, warm up
                float(step(batch)["loss"])
    finally:
        loop.loss_fn = loss_fn
    return step


def batch_for(cfg, seed=0):
    b, s, v = cfg.data.batch_size, cfg.data.seq_len, cfg.model.vocab_size
    tokens = np.random.default_rng(seed).integers(2, v, (b, s + 1)).astype(np.int32)
    seg = jnp.ones((b, s), jnp.int32)
    return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]), "segment_ids": seg,
            "positions": default_positions((b, s), seg), "loss_mask": jnp.ones((b, s), jnp.float32)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", nargs="+", default=["study", "tiny_plain"])
    args = ap.parse_args()
    results = []
    for name in args.configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            base = load_config(CONFIGS / f"{name}.yaml")
        variants = {"logits": (base, logits_loss_fn)}
        for chunks in (1, 4, 8, 16):
            if chunks <= base.data.seq_len:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConfigWarning)
                    cfg = load_config(CONFIGS / f"{name}.yaml", overrides=[f"train.loss_chunks={chunks}"])
                variants[f"chunks={chunks}"] = (cfg, loss_fn)
        batch = batch_for(base)
        steps = {}
        for label, (cfg, loss) in variants.items():
            steps[label] = make_step(cfg, loss, batch)
        times = {label: [] for label in steps}
        for _ in range(args.steps):
            for label, step in steps.items():
                t0 = time.perf_counter()
                float(step(batch)["loss"])
                times[label].append(time.perf_counter() - t0)
        ref = statistics.median(times["logits"])
        b, s = base.data.batch_size, base.data.seq_len
        print(f"\n{name}: {b}x{s} tokens, vocab {base.model.vocab_size}, d_model {base.model.d_model}")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"  {label:<10} {med * 1e3:8.1f} ms/step   {ref / med:5.2f}x the logits formulation")
            results.append({"config": name, "variant": label, "ms": med * 1e3, "speedup": ref / med})
    print(json.dumps({"machine": platform.machine(), "jax": jax.__version__, "results": results}))


if __name__ == "__main__":
    main()
