"""Model and optimizer construction in one place: the training state of a config, created in its
shards on a mesh (or plain on one device, or abstract), and the restore target of a checkpoint."""

from __future__ import annotations

import jax
from flax import nnx

from ngram_jax.config import Config
from ngram_jax.model import build_model
from ngram_jax.sharding import create_sharded, logical_to_sharding, param_context
from ngram_jax.train.optimizer import Optimizer


def build_train_state(cfg: Config, mesh=None, abstract: bool = False):
    """``(model, optimizer)`` for a config: created in their shards on ``mesh``, plain on one device
    without a mesh, or abstract (shapes and logical shardings, nothing allocated)."""

    def build():
        model = build_model(cfg, nnx.Rngs(cfg.seed))
        return model, Optimizer(model, cfg.train)

    if abstract:
        with param_context(mesh, cfg.mesh.rules):
            return nnx.eval_shape(build)
    if mesh is None:
        with param_context(None):
            return build()
    return create_sharded(build, mesh, cfg.mesh.rules)


def abstract_with_shardings(tree, mesh, rules) -> dict:
    """Pure-dict abstract arrays (shape, dtype, sharding) for restoring an nnx state onto ``mesh`` (one
    device when ``mesh`` is None)."""
    if mesh is None:
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), tree)
    else:
        shardings = logical_to_sharding(tree, mesh, rules)
    pure_abs, pure_sh = nnx.to_pure_dict(tree), nnx.to_pure_dict(shardings)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure_abs, pure_sh)


def train_state_target(model, opt, mesh, rules) -> dict:
    """The abstract restore target of ``Checkpointer.restore`` for a (possibly abstract) model and
    optimizer: ``{"model": ..., "opt": ...}``."""
    return {"model": abstract_with_shardings(nnx.state(model), mesh, rules),
            "opt": abstract_with_shardings(nnx.state(opt), mesh, rules)}
