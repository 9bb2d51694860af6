"""What an MoE model's experts do on held-out data: the routing's diagnostics and the loss without them.

    report = routing_report(model, "data/study", seq_len=128, batch_size=16, max_batches=16)
    # {"expert_load_max_over_mean": ..., "dropped_fraction": ..., "routed_mass": ...,
    #  "bias_changed_fraction": ..., "zero_expert_fraction": ..., "eval_loss_without_moe": ...}

The diagnostics (``ngram_jax.layers.moe.routing_diagnostics``) are summed over the held-out batches and
averaged over the MoE layers; ``eval_loss_without_moe`` is the held-out loss of the same model with every
block's MoE shortcut branch removed (s = 0 in the ScMoE block): how much the routed experts contribute.
"""

from __future__ import annotations

import os

import numpy as np
from flax import nnx

from ngram_jax.data.pipeline import make_dataset
from ngram_jax.errors import DataError
from ngram_jax.eval.perplexity import evaluate
from ngram_jax.layers.moe import MoE, routing_diagnostics
from ngram_jax.sharding import param_context


def moe_layers(model) -> list[MoE]:
    """Every MoE layer of a model, in order, found by type."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]


def without_moe(model):
    """A copy of ``model`` whose ScMoE blocks have no MoE shortcut branch (each block's ``moe`` removed); the
    model itself is unchanged."""
    copy = nnx.clone(model)
    for block in copy.blocks:
        block.moe = None
    return copy


def routing_report(model, data: str | os.PathLike, *, seq_len: int, batch_size: int, max_batches: int) -> dict:
    """Routing diagnostics over the first ``max_batches`` held-out batches of a prepared directory and the
    held-out loss without the MoE branch (the module docstring). A model without MoE layers: ``{}``."""
    layers = moe_layers(model)
    if not layers:
        return {}
    cfg = model.config
    ds = make_dataset(data, "heldout", seq_len=seq_len, batch_size=batch_size, vocab_size=cfg.vocab_size, seed=0,
                      repeat=False)
    forward = nnx.jit(lambda m, x, seg, pos: m(x, segment_ids=seg, positions=pos))
    counts = totals = None
    with param_context(None):
        for i, batch in enumerate(ds):
            if i >= max_batches:
                break
            forward(model, batch["inputs"], batch["segment_ids"], batch.get("positions"))
            c = np.stack([np.asarray(m.counts[...], np.float64) for m in layers])  # [L, E+Z]
            t = np.stack([np.asarray(m.routing[...], np.float64) for m in layers])  # [L, 4]
            counts, totals = (c, t) if counts is None else (counts + c, totals + t)
    if counts is None:
        raise DataError(f"{data}: the held-out split yields no full batch of {batch_size}x{seq_len}")
    report = routing_diagnostics(counts, totals, cfg.moe.num_experts, cfg.moe.top_k)
    ev = evaluate(without_moe(model), data, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    report["eval_loss_without_moe"] = ev["loss"]
    return report
