"""Forward+backward tokens/s of the tiny model family, side by side, and the same tiny LongCat-Flash
through transformers (PyTorch CPU).

    python benchmarks/model_step.py [--batch 8 --seq 256 --repeats 5]

Each step is value_and_grad of the next-token cross-entropy (no optimizer update).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from timing import median_seconds

from ngram_jax.budget import parameter_budget
from ngram_jax.config import ConfigWarning, load_config
from ngram_jax.model import build_model
from ngram_jax.sharding import param_context

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
# (label, config, overrides)
RUNS = [
    ("tiny_plain", "tiny_plain", ()),
    ("tiny_ne", "tiny_ne", ()),
    ("tiny_plne", "tiny_plne", ()),
    ("tiny_moe", "tiny_moe", ()),
    ("tiny_dense", "tiny_dense", ()),
    ("tiny_ne   moe.dispatch=capacity", "tiny_ne", ("model.moe.dispatch=capacity",)),
    ("tiny_moe  moe.dispatch=capacity", "tiny_moe", ("model.moe.dispatch=capacity",)),
]


def load(name: str, overrides=()):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(CONFIGS / f"{name}.yaml", overrides=list(overrides))


def jax_step_time(cfg, tokens: np.ndarray, repeats: int) -> float:
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))

    @nnx.jit
    def step(m, t):
        def loss(m):
            logits = m(t[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, t[:, 1:]).mean()

        return nnx.value_and_grad(loss)(m)

    t = jnp.asarray(tokens)
    return median_seconds(lambda: step(model, t), repeats)


def torch_step_time(tokens: np.ndarray, repeats: int) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    from ngram_jax.convert.hf import config_to_hf

    hf = config_to_hf(load("tiny_plain").model)
    torch.manual_seed(0)
    model = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**hf)).float().train()
    t = torch.as_tensor(tokens).long()

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(t[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].reshape(-1))
        loss.backward()

    return median_seconds(step, repeats)  # torch runs eagerly: step() returns when done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", help="comma-separated model labels to run (default: all), e.g. tiny_plain,tiny_ne")
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers/PyTorch row")
    args = ap.parse_args()
    runs = [r for r in RUNS if args.only is None or r[0] in args.only.split(",")]
    tokens = np.random.default_rng(0).integers(1, 4096, (args.batch, args.seq + 1)).astype(np.int32)
    n_tok = args.batch * args.seq
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {jax.devices()[0].device_kind}, jax {jax.__version__}; "
          f"tokens/step={args.batch}x{args.seq}")
    rows = []
    for label, name, overrides in runs:
        cfg = load(name, overrides)
        b = parameter_budget(cfg)
        s = jax_step_time(cfg, tokens, args.repeats)
        rows.append(dict(model=label, total_params=b["total"], activated=b["activated_max"], step_ms=s * 1e3,
                         tokens_per_s=n_tok / s))
    torch_s = None if args.no_torch else torch_step_time(tokens, args.repeats)
    if torch_s is not None:
        rows.append(dict(model="tiny_plain (transformers, torch CPU)", total_params=rows[0]["total_params"],
                         activated=rows[0]["activated"], step_ms=torch_s * 1e3, tokens_per_s=n_tok / torch_s))
    ref = rows[0]["tokens_per_s"]
    print(f"{'model':<38} {'params':>10} {'activated':>10} {'step ms':>9} {'tokens/s':>9} {'vs plain':>9}")
    for r in rows:
        print(f"{r['model']:<38} {r['total_params']:>10,} {r['activated']:>10,} {r['step_ms']:>9.1f} "
              f"{r['tokens_per_s']:>9,.0f} {r['tokens_per_s'] / ref:>8.2f}x")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
