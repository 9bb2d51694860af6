"""Compiled memory of the training step per rematerialisation policy and compute dtype: the planner's
prediction (python -m ngram_jax.tools.plan) next to XLA's memory analysis of the real jitted train_step.

    python benchmarks/memory.py [--config tiny_plain --batch 8 --seq 256 --scheduler memory] [overrides ...]

One device, nothing is run (lower + compile only). ``--scheduler memory`` (default) compiles with
XLA:CPU's memory-minimising scheduler, which the planner models; ``default`` keeps XLA:CPU's
concurrency-optimised one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="key=value config overrides for every row")
    ap.add_argument("--config", default="tiny_plain")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--scheduler", choices=("memory", "default"), default="memory")
    args = ap.parse_args()

    from ngram_jax.tools.plan import MEMORY_SCHEDULER_FLAG

    os.environ.pop("XLA_FLAGS", None)
    if args.scheduler == "memory":
        os.environ["XLA_FLAGS"] = MEMORY_SCHEDULER_FLAG
    import jax

    jax.config.update("jax_platforms", "cpu")
    from ngram_jax.config import ConfigWarning, load_config
    from ngram_jax.sharding import parse_mesh_spec
    from ngram_jax.tools.plan import measure_step, step_plan

    rows = [("float32", "none", ()), ("float32", "block", ()), ("float32", "dots", ()),
            ("float32", "names", ("model.remat_names=[attn_out,ffn_in]",)),
            ("bfloat16", "none", ()), ("bfloat16", "block", ())]
    mesh = parse_mesh_spec("data=1")
    mb = lambda n: f"{n / 2**20:8.1f}"  # noqa: E731
    print(f"{args.config} {' '.join(args.overrides)} batch {args.batch} x seq {args.seq}, one CPU device, "
          f"XLA:CPU {args.scheduler} scheduler, jax {jax.__version__}; MiB")
    print(f"{'dtype':<9} {'remat':<22} {'args XLA':>9} {'plan':>8} {'temp XLA':>9} {'plan':>8} {'total XLA':>9} "
          f"{'plan':>8} {'err':>7} {'compile':>8}")
    for dtype, remat, extra in rows:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConfigWarning)
            cfg = load_config(ROOT / "configs/models" / f"{args.config}.yaml",
                              [*args.overrides, f"model.dtype={dtype}", f"model.remat={remat}", *extra])
        plan = step_plan(cfg, mesh, args.batch, args.seq, backend="cpu")
        t0 = time.perf_counter()
        got = measure_step(cfg, args.batch, args.seq)
        dt = time.perf_counter() - t0
        label = remat + (f" {','.join(cfg.model.remat_names)}" if cfg.model.remat_names else "")
        err = (plan["total"] - got["total"]) / got["total"]
        print(f"{dtype:<9} {label:<22} {mb(got['arguments']):>9} {mb(plan['arguments']):>8} "
              f"{mb(got['temporaries']):>9} {mb(plan['temporaries']):>8} {mb(got['total']):>9} "
              f"{mb(plan['total']):>8} {err:+7.1%} {dt:7.0f}s", flush=True)


if __name__ == "__main__":
    main()
