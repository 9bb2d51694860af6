"""Train-step time of the tiny NE model with N-gram tables at r and 16r, for each table optimizer, on one
device and on an 8-device CPU mesh, measured side by side in one run.

    python benchmarks/table_growth.py [--steps 6] [--ratio 2.37] [--factor 16]

A step whose cost does not grow with the tables has ratio (16r step / r step) near 1. The dense control
(AdamW over the full table gradient) grows with the table; the row-wise optimizers update only the rows
a batch read. Last line: ``table_growth_step_ratio=<worst ratio of a row-wise optimizer>``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import itertools  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from timing import median_seconds  # noqa: E402

from ngram_jax.config import ConfigWarning, load_config  # noqa: E402
from ngram_jax.sharding import make_mesh_from_spec, param_context  # noqa: E402
from ngram_jax.train.loop import train_step  # noqa: E402
from ngram_jax.train.state import build_train_state  # noqa: E402

OPTIMIZERS = ("dense", "rowwise_adagrad", "lazy_adam")


def batch(cfg, seed: int) -> dict:
    b, s = cfg.data.batch_size, cfg.data.seq_len
    x = np.random.default_rng(seed).integers(1, cfg.model.vocab_size, (b, s + 1)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "segment_ids": np.ones((b, s), np.int32),
            "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)), "loss_mask": np.ones((b, s), np.float32)}


def prepared(optimizer: str, ratio: float, mesh):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config("configs/train_tiny.yaml", [f"train.table_optimizer={optimizer}",
                                                      f"model.ngram.ratio={ratio}"])
    model, opt = build_train_state(cfg, mesh)
    step = nnx.jit(train_step, donate_argnums=(0, 1))
    batches = [batch(cfg, i) for i in range(2)]
    with param_context(mesh):
        for b in batches:  # compile and warm up
            jax.block_until_ready(step(model, opt, b)["loss"])
    return cfg, model, opt, step, batches


def time_steps(state, mesh, steps: int) -> float:
    cfg, model, opt, step, batches = state
    order = itertools.cycle(batches[:2])
    with param_context(mesh):
        return median_seconds(lambda: step(model, opt, next(order))["loss"], steps, warmup=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (r, 16r, r, 16r, ...)")
    ap.add_argument("--ratio", type=float, default=2.37)
    ap.add_argument("--factor", type=float, default=16)
    args = ap.parse_args()
    small, big = args.ratio, round(args.ratio * args.factor, 4)
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind} x{jax.device_count()}, "
          f"jax {jax.__version__}; configs/train_tiny.yaml (batch 16 x 128), tables at r={small} and r={big}, "
          f"median step of {args.rounds} interleaved rounds x {args.steps} steps")
    head = ("optimizer", "devices", "rows(r)", "rows(16r)", "ms(r)", "ms(16r)", "ratio")
    print(f"{head[0]:<16} {head[1]:<8} " + " ".join(f"{h:>9}" for h in head[2:]))
    worst = 0.0
    for where in ("1", "data=8"):
        mesh = None if where == "1" else make_mesh_from_spec(where)
        for name in OPTIMIZERS:
            states = {r: prepared(name, r, mesh) for r in (small, big)}
            t = {r: [] for r in states}
            for _ in range(args.rounds):
                for r, st in states.items():
                    t[r].append(time_steps(st, mesh, args.steps))
            ms = {r: 1e3 * min(v) for r, v in t.items()}
            ratio = ms[big] / ms[small]
            rows = {r: st[1].embed.ngram_table.shape[0] for r, st in states.items()}
            print(f"{name:<16} {where:<8} {rows[small]:>10,} {rows[big]:>10,} {ms[small]:>9.1f} {ms[big]:>9.1f} "
                  f"{ratio:>7.3f}", flush=True)
            if name != "dense":
                worst = max(worst, ratio)
            del states
    print(f"table_growth_step_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
