"""Checkpoints: an orbax CheckpointManager holding the model and optimizer state, the data iterator
state and the resolved config; and :func:`restore_model` for analysis from Python. Building the
model and optimizer (and the abstract restore target) is :mod:`ngram_jax.train.state`'s job.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete),
so a crash or a kill at any moment leaves the latest *complete* checkpoint readable.
"""

from __future__ import annotations

import errno
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from ngram_jax.config import Config, ConfigError, from_dict, to_dict
from ngram_jax.train.state import build_train_state, train_state_target

# Keys that may differ between a checkpoint and the run resuming it (run control, not the model).
# train.steps is checked on its own by the training loop (it shapes the learning-rate schedule: a change
# needs train.extend=true).
RUN_CONTROL_KEYS = ("train.steps", "train.extend", "train.log_every", "train.eval_every", "train.eval_batches",
                    "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.run_dir",
                    "train.peak_flops_per_device", "data.path", "data.bundled", "mesh.ici", "mesh.dcn", "name")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, requested: Config) -> list[str]:
    """``key: saved -> requested`` for every key that differs, run-control keys excepted."""
    a, b = _flatten(saved), _flatten(to_dict(requested))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in RUN_CONTROL_KEYS):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, list):
            va = _tuplify(va)
        if isinstance(vb, list):
            vb = _tuplify(vb)
        if va != vb:
            diffs.append(f"{key}: checkpoint {va!r} -> requested {vb!r}")
    return diffs


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


TABLE_CHUNK_ROWS = 32  # random row reads touch about one chunk per row: keep chunks a few rows long


def row_chunked_paths(model, opt=None) -> frozenset[tuple[str, ...]]:
    """Paths, in the saved ``{"model": ..., "opt": ...}`` tree, of the tables (found by type) and of the
    optimizer state shaped like them: these are stored in chunks of a few rows."""
    from ngram_jax.ngram.lookup import table_paths
    from ngram_jax.train.optimizer import RowState

    tables = table_paths(model)
    out = {("model", *t) for t in tables}
    if opt is not None:
        for path, var in nnx.to_flat_state(nnx.state(opt)):
            names = tuple(map(str, path))
            inside = any(names[i : i + len(t)] == t for t in tables for i in range(len(names)))
            if inside or isinstance(var, RowState):
                out.add(("opt", *names))
    return frozenset(out)


class Checkpointer:
    def __init__(self, directory: str | Path, keep: int = 3):
        self.directory = Path(directory).absolute()
        self.mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state: dict, data_iter, meta: dict,
             row_chunked: frozenset[tuple[str, ...]] = frozenset()) -> None:
        """Save asynchronously. The arrays at ``row_chunked`` paths (tables and their optimizer state, see
        :func:`row_chunked_paths`) are stored in chunks of ``TABLE_CHUNK_ROWS`` rows so that analysis can
        read single rows lazily."""

        def args(path, leaf):
            if tuple(str(getattr(p, "key", p)) for p in path) not in row_chunked or leaf.ndim == 0:
                return ocp.SaveArgs()
            row_bytes = leaf.dtype.itemsize * (leaf.size // max(leaf.shape[0], 1))
            return ocp.SaveArgs(chunk_byte_size=TABLE_CHUNK_ROWS * row_bytes)

        save_args = jax.tree_util.tree_map_with_path(args, state)
        try:
            self.mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state, save_args=save_args),
                data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OSError(err.errno, f"disk full while saving step {step} to {self.directory}; the last "
                                         f"complete checkpoint (step {self.latest_step()}) is intact") from err
            raise

    def read_meta(self, step: int) -> dict:
        return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> dict:
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        return self.mgr.restore(step, args=ocp.args.Composite(**args))["state"]

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def find_checkpoints(path: str | Path) -> Path:
    """A run directory or its ``checkpoints`` directory -> the checkpoints directory."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints"
    if path.is_dir():
        return path
    raise FileNotFoundError(f"no checkpoints at {path}")


def restore_model(path: str | Path, step: int | None = None, mesh=None):
    """``(model, config)`` from a training checkpoint, onto ``mesh`` (resharded) or one device.

    ``path`` is a run directory or its ``checkpoints`` directory; ``step`` defaults to the latest.
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
