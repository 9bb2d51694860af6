"""Models from training checkpoints: :func:`restore_model` (analysis from Python, eval, generate),
:func:`warm_start` (``train.init_from``) and :func:`read_config` (checks before restoring)."""

from __future__ import annotations

import os

import jax
from flax import nnx

from ngram_jax import storage
from ngram_jax.checkpoint.manager import Checkpointer
from ngram_jax.config import Config, ConfigError, from_dict
from ngram_jax.train.state import build_train_state, train_state_target


def find_checkpoints(path: str | os.PathLike, what: str = "checkpoint"):
    """A run directory or its ``checkpoints`` directory (a local path or a URL) -> the checkpoints directory
    (a :func:`ngram_jax.storage.location`). A bucket that does not exist or cannot be reached is a one-line error."""
    path = storage.check(path, what)
    with storage.reported(path, what):
        if (path / "checkpoints").is_dir():
            return path / "checkpoints"
        if path.is_dir():
            return path
    raise FileNotFoundError(f"no checkpoints at {path}")


def read_config(path: str | os.PathLike, step: int | None = None) -> Config:
    """The config a checkpoint was trained with (no weights read): for checks before restoring."""
    ckpt = Checkpointer(find_checkpoints(path))
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        return from_dict(ckpt.read_meta(step)["config"])
    finally:
        ckpt.close()


def warm_start(model: nnx.Module, path: str | os.PathLike, mesh=None) -> list[str]:
    """``train.init_from``: copy the parameters and MoE selection biases of run ``path``'s latest checkpoint
    into ``model`` wherever both have them, in ``model``'s shardings (a draft head only when it is of the
    same kind). Returns the paths the run lacks (they keep their initialization, e.g. an MTP head added to a
    trained target); another shape at the same path is a ConfigError."""
    from ngram_jax.layers.moe import SelectionBias

    which = nnx.Any(nnx.Param, SelectionBias)
    src, src_cfg = restore_model(path, mesh=mesh)
    source = nnx.to_pure_dict(nnx.state(src, which))
    if src_cfg.model.draft_head != model.config.draft_head:  # another kind of head: nothing of it applies
        source.pop("draft_head", None)
    state = nnx.state(model, which)
    pure, kept = nnx.to_pure_dict(state), []

    def copy(dst: dict, src: dict, prefix: str) -> None:
        for k, v in dst.items():
            name = f"{prefix}{k}"
            if k not in src:
                kept.append(name)
            elif isinstance(v, dict):
                copy(v, src[k], name + "/")
            elif v.shape != src[k].shape:
                raise ConfigError(f"train.init_from={path}: {name} has shape {tuple(src[k].shape)} there and "
                                  f"{tuple(v.shape)} here; start from a run of the same model (or none)")
            else:
                dst[k] = jax.device_put(src[k], v.sharding)

    copy(pure, source, "")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return kept


def restore_model(path: str | os.PathLike, step: int | None = None, mesh=None):
    """``(model, config)`` from a training checkpoint, onto ``mesh`` (resharded) or one device.

    ``path`` is a run directory or its ``checkpoints`` directory; ``step`` defaults to the latest. Every
    table is read whole: for tables larger than memory, ``ngram_jax.analyze.LazyCheckpoint(path).model()``
    restores the rest and reads table rows on demand.
    """
    ckpt = Checkpointer(find_checkpoints(path))
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        cfg = from_dict(ckpt.read_meta(step)["config"])
        model, opt = build_train_state(cfg, mesh, abstract=True)
        graphdef, state = nnx.split(model)
        try:
            restored = ckpt.restore(step, train_state_target(model, opt, mesh, cfg.mesh.rules))
        except ValueError as err:
            raise ConfigError(f"checkpoint {ckpt.directory} step {step} does not match the model its config "
                              f"describes: {err}") from err
        nnx.replace_by_pure_dict(state, restored["model"])
        return nnx.merge(graphdef, state), cfg
    finally:
        ckpt.close()
