"""Checkpoints: an orbax CheckpointManager holding the model and optimizer state, the data iterator
state and the resolved config; and :func:`restore_model` for analysis from Python. Building the
model and optimizer (and the abstract restore target) is :mod:`ngram_jax.train.state`'s job.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete),
so a crash or a kill at any moment leaves the latest *complete* checkpoint readable. A complete
checkpoint damaged afterwards (a truncated or deleted file) is reported and skipped when resuming
(:meth:`Checkpointer.restore_latest`); a full disk during a save is a :class:`CheckpointError`
naming the directory and the last complete checkpoint, which stays intact.

The directory may be a ``gs://`` or ``s3://`` URL (:mod:`ngram_jax.storage`). There a checkpoint is complete
when orbax has written its ``commit_success.txt`` (an object store has no atomic rename), and orbax's
tensorstore specs for ``s3://`` come from :func:`ngram_jax.storage.s3_kvstore` (:func:`_orbax_s3_kvstores`).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import sys
from collections.abc import Callable

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from ngram_jax import storage
from ngram_jax.config import Config, ConfigError, from_dict, migrate, to_dict
from ngram_jax.errors import CheckpointError
from ngram_jax.train.state import build_train_state, train_state_target

# Keys that may differ between a checkpoint and the run resuming it (run control, not the model).
# train.steps is checked on its own by the training loop (it shapes the learning-rate schedule: a change
# needs train.extend=true).
RUN_CONTROL_KEYS = ("train.steps", "train.extend", "train.init_from", "train.log_every", "train.eval_every",
                    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.progress",
                    "train.run_dir", "train.peak_flops_per_device", "train.loss_chunks", "data.path", "data.bundled",
                    "mesh.ici", "mesh.dcn", "name")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, requested: Config, ignore: tuple[str, ...] = RUN_CONTROL_KEYS) -> list[str]:
    """``key: saved -> requested`` for every key that differs, the keys (and sections) in ``ignore``
    (by default the run-control keys) excepted. A key the saved config lacks (added to the schema after
    the save, e.g. ``train.freeze_target``) counts as its default value."""
    a, b = _flatten(migrate(saved)), _flatten(to_dict(requested))
    defaults = _flatten(to_dict(Config()))
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == k or key.startswith(k + ".") for k in ignore):
            continue
        va, vb = a.get(key, defaults.get(key)), b.get(key)
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
MAX_TABLE_BLOCKS = 4096  # a larger table gets longer blocks (a multiple of TABLE_CHUNK_ROWS rows)


# Row-chunked arrays are stored in blocks of ``c`` rows, ``[R, ...] -> [R/c, c, ...]``, each block one
# tensorstore chunk (orbax's per-block chunking, ``shard_axes=(0,)``, with no byte target: asking orbax
# for small chunks by byte size works too, but warns once per array and save). ``c`` is TABLE_CHUNK_ROWS
# for tables of up to MAX_TABLE_BLOCKS such blocks and grows with larger tables (:func:`block_rows`): orbax
# keeps every chunk key of a checkpoint in one OCDBT b-tree node, and the cost of each chunk read grew
# with the number of keys (measured: about 80 us per read at 100K keys, 1 ms at 563K). An array whose row
# shards do not hold whole blocks is stored as it is (one chunk per shard). Restores and
# :class:`ngram_jax.analyze.LazyCheckpoint` undo the blocking from the stored shape.


def block_rows(rows: int, shards: int = 1) -> int | None:
    """Rows per stored block of a ``rows``-row array on ``shards`` row shards: the smallest multiple ``c``
    of TABLE_CHUNK_ROWS that makes whole blocks on every shard and at most MAX_TABLE_BLOCKS blocks (one
    block per shard if no shorter one does); None when TABLE_CHUNK_ROWS-row blocks do not divide the shards."""
    if rows <= 0 or rows % (TABLE_CHUNK_ROWS * shards):
        return None
    per_shard = rows // (TABLE_CHUNK_ROWS * shards)  # minimal blocks per shard
    need = -(-rows // (TABLE_CHUNK_ROWS * MAX_TABLE_BLOCKS))  # blocks of at least this many minimal blocks
    k = next(k for k in range(min(need, per_shard), per_shard + 1) if per_shard % k == 0)
    return TABLE_CHUNK_ROWS * k


def _row_spec(sharding) -> tuple:
    """The PartitionSpec of a NamedSharding as a tuple (None for other shardings)."""
    spec = getattr(sharding, "spec", None)
    return None if spec is None else tuple(spec)


def _row_shards(sharding, ndim: int) -> int:
    spec = _row_spec(sharding)
    if not spec or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return int(np.prod([sharding.mesh.shape[a] for a in axes]))


def _blocked_sharding(sharding, ndim: int, block_axis: int = 0):
    """``sharding`` of ``[R, ...]`` carried to ``[R/c, c, ...]``: the row axes on the block axis (or, with
    ``block_axis=1``, on the rows within a block)."""
    spec = _row_spec(sharding)
    if spec is None:
        return sharding
    spec = spec + (None,) * (ndim - len(spec))
    rows, rest = spec[0], spec[1:]
    new = (rows, None, *rest) if block_axis == 0 else (None, rows, *rest)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*new))


def blockable(shape: tuple[int, ...], sharding) -> bool:
    """Whether ``[R, ...]`` splits into whole blocks (:func:`block_rows`) on every row shard."""
    return len(shape) >= 1 and block_rows(shape[0], _row_shards(sharding, len(shape))) is not None


def _reshaped(x: jax.Array, shape: tuple[int, ...], sharding) -> jax.Array:
    """``x`` reshaped (row-major, no data reordering) and laid out with ``sharding``."""
    return jax.jit(lambda a: a.reshape(shape), out_shardings=sharding)(x)


def to_blocks(x: jax.Array) -> jax.Array:
    """``[R, ...] -> [R/c, c, ...]`` (``c`` from :func:`block_rows`), each row shard's blocks kept on it."""
    c = block_rows(x.shape[0], _row_shards(x.sharding, x.ndim))
    return _reshaped(x, (x.shape[0] // c, c, *x.shape[1:]), _blocked_sharding(x.sharding, x.ndim))


def blocked_target(target: jax.ShapeDtypeStruct, stored: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    """The restore target of an array stored as blocks ``stored`` for the logical ``target``: row shards
    on the block axis when they divide it, else on the rows within a block, else replicated."""
    n = _row_shards(target.sharding, len(target.shape))
    axis = 0 if stored[0] % n == 0 else 1 if stored[1] % n == 0 else None
    if axis is None:
        sharding = jax.sharding.NamedSharding(target.sharding.mesh, jax.sharding.PartitionSpec())
    else:
        sharding = _blocked_sharding(target.sharding, len(target.shape), axis)
    return jax.ShapeDtypeStruct(stored, target.dtype, sharding=sharding)


def is_blocked(stored: tuple[int, ...], logical: tuple[int, ...]) -> bool:
    """Whether an array of logical shape ``logical`` was stored as row blocks of shape ``stored``."""
    return (len(stored) == len(logical) + 1 and stored[1] % TABLE_CHUNK_ROWS == 0
            and stored[0] * stored[1] == logical[0] and tuple(stored[2:]) == tuple(logical[1:]))


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


def _key(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", p)) for p in path)


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (tensorstore reports it as text, not as an errno)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _brief(err: BaseException, limit: int = 400) -> str:
    """The root cause of ``err`` on one line (orbax wraps tensorstore's precise message in a long spec)."""
    seen = {id(err)}
    while (inner := err.__cause__ or err.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        err = inner
    text = " ".join(str(err).split()) or "(no message)"
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"


class _FailedReadNoise(logging.Filter):
    """Drops asyncio's "Task/Future exception was never retrieved" reports: after a failed restore they
    are orbax's abandoned concurrent reads of the same unreadable checkpoint, which is reported once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def _is_failed_read_consequence(u) -> bool:
    """An unraisable exception left by orbax's abandoned concurrent reads of a checkpoint that failed to
    restore: the same read failure (already reported) or "Event loop is closed" (their loop is gone)."""
    name = getattr(getattr(u.object, "cr_code", None), "co_name", "")
    return (name == "_read_array_index_and_device_put"
            or (isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"))


class _FailedReadHook:
    """``sys.unraisablehook`` that drops :func:`_is_failed_read_consequence` reports and passes every other
    one on; installed once, at the first failed restore, for the rest of the process (the abandoned reads
    can end, or be collected, any time later, up to interpreter exit)."""

    def __init__(self, previous):
        self.previous, self.last = previous, 0.0

    def __call__(self, u) -> None:
        import time

        if _is_failed_read_consequence(u):
            self.last = time.monotonic()
        else:
            self.previous(u)


def _drain_failed_reads(quiet_for: float = 0.5, limit: float = 10.0) -> None:
    """After orbax's restore failed on one array, its concurrent reads of the other arrays end later, in
    tensorstore's threads, each printing "Exception ignored ..." (the same failure, already reported,
    or "Event loop is closed"). Silence exactly those from now on (other unraisable exceptions still
    reach the usual hook) and wait until none arrives for ``quiet_for`` seconds, so that they do not
    interleave with the next restore's messages."""
    import gc
    import time

    noise = logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadNoise) for f in noise.filters):
        noise.addFilter(_FailedReadNoise())  # stays: the abandoned futures may be collected at exit
    hook = sys.unraisablehook
    if not isinstance(hook, _FailedReadHook):
        hook = sys.unraisablehook = _FailedReadHook(hook)
    t0 = hook.last = time.monotonic()
    while True:
        gc.collect()
        time.sleep(0.1)
        now = time.monotonic()
        if now - hook.last >= quiet_for or now - t0 >= limit:
            break


def _all_processes_ok(ok: bool) -> bool:
    """Whether every process succeeded (processes must agree on the checkpoint they resume from)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


SLOW_SAVE_ENV = "NGRAM_JAX_TEST_SLOW_SAVE"


def _install_slow_save_hook() -> None:
    """A hook for tests, active only when ``NGRAM_JAX_TEST_SLOW_SAVE=<step>:<seconds>`` is set: the
    background write of that step's metadata (orbax's JSON handler) waits, so that a test can kill the
    process while an asynchronous save is in flight (its temporary directory exists, training goes on)."""
    step, _, seconds = os.environ.get(SLOW_SAVE_ENV, "").partition(":")
    original = ocp.JsonCheckpointHandler._save_fn
    if not seconds or getattr(original, "_slow_save_hook", False):
        return

    async def slow(self, x, directory):
        if isinstance(x, dict) and x.get("step") == int(step):
            await asyncio.sleep(float(seconds))
        await original(self, x, directory)

    slow._slow_save_hook = True
    ocp.JsonCheckpointHandler._save_fn = slow


def _orbax_s3_kvstores() -> None:
    """Let orbax write and read ``s3://`` checkpoints. orbax 0.12.8 builds tensorstore kvstore specs for local
    and ``gs://`` directories only: for ``s3://`` its OCDBT spec fails ("Checkpoint path should be absolute")
    and its plain spec would name a local file. Its one builder (``tensorstore_utils.build_kvstore_tspec``,
    which every array, OCDBT merge and sharding file goes through) is wrapped, once: an ``s3://`` directory is
    built as the same ``gs://`` one and each GCS kvstore in the result replaced by :func:`storage.s3_kvstore` of
    the same bucket and key (with the endpoint, which tensorstore does not read from the environment)."""
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    original = ts_utils.build_kvstore_tspec
    if getattr(original, "_ngram_jax_s3", False):
        return

    def to_s3(spec):
        if isinstance(spec, dict) and spec.get("driver") in ("gcs", "gcs_grpc") and "bucket" in spec:
            return storage.s3_kvstore(spec["bucket"], spec.get("path", ""))  # the key as orbax gave it
        if isinstance(spec, dict):
            return {k: to_s3(v) for k, v in spec.items()}
        if isinstance(spec, list):
            return [to_s3(v) for v in spec]
        return spec

    def build_kvstore_tspec(directory, *args, **kwargs):
        text = os.fspath(directory)
        if text.startswith("s3:/"):  # orbax normalises s3://b/p to s3:/b/p before some calls
            return to_s3(original("gs://" + text[len("s3:/"):].lstrip("/"), *args, **kwargs))
        return original(directory, *args, **kwargs)

    build_kvstore_tspec._ngram_jax_s3 = True
    ts_utils.build_kvstore_tspec = build_kvstore_tspec


class DataState:
    """A data iterator's state taken at one moment, saved in the iterator's place: the training loop
    reads the next batch while a step runs, so the iterator itself is one batch ahead of the step being
    saved. (grain's checkpoint handler takes ``get_state()`` of an object that is not a grain iterator
    as JSON bytes; restoring goes into the real iterator as usual.)"""

    def __init__(self, state: dict):
        self._json = json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._json


class Checkpointer:
    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        directory = storage.location(directory, "checkpoint directory")
        remote = storage.is_remote(directory)
        self.directory = directory if remote else directory.absolute()
        if remote:
            storage.check(directory, "checkpoint directory")  # before orbax's mkdir, which would create a bucket
            _orbax_s3_kvstores()
        self.mgr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=True,
                # no atomic rename in a bucket: a checkpoint is complete once its commit_success.txt is written
                temporary_path_class=ocp.path.atomicity.CommitFileTemporaryPath if remote else None),
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
        )
        self._saving: int | None = None  # the step of the latest save, which may still be in flight
        _install_slow_save_hook()

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state: dict, data_iter, meta: dict,
             row_chunked: frozenset[tuple[str, ...]] = frozenset()) -> None:
        """Save asynchronously. The arrays at ``row_chunked`` paths (tables and their optimizer state, see
        :func:`row_chunked_paths`) are stored in chunks of a few rows (:func:`block_rows`) so that analysis
        can read single rows lazily."""

        def blocked(path, leaf) -> bool:
            return _key(path) in row_chunked and isinstance(leaf, jax.Array) and blockable(leaf.shape, leaf.sharding)

        save_args = jax.tree_util.tree_map_with_path(
            lambda path, leaf: ocp.SaveArgs(shard_axes=(0,)) if blocked(path, leaf) else ocp.SaveArgs(), state)
        state = jax.tree_util.tree_map_with_path(
            lambda path, leaf: to_blocks(leaf) if blocked(path, leaf) else leaf, state)
        if self._saving is not None:  # orbax first waits for the previous save: a failure there is that step's
            with self._save_errors(f"step {self._saving}"):
                self.mgr.wait_until_finished()
        self._saving = step
        with self._save_errors(f"step {step}"):
            self.mgr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state, save_args=save_args),
                data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta)), force=True)

    def _save_errors(self, what: str):
        """A context mapping a failed save (raised at once or by an asynchronous save) to a one-line
        :class:`CheckpointError` naming the directory and the last complete checkpoint: ENOSPC, and, in a
        bucket, a storage failure (the server unreachable, a refused request). Other errors propagate."""
        import contextlib

        @contextlib.contextmanager
        def ctx():
            try:
                yield
            except CheckpointError:
                raise
            except Exception as err:
                full = _is_disk_full(err)
                reason = None if full or not storage.is_remote(self.directory) else storage.failure(err, self.directory)
                if not full and reason is None:
                    raise
                try:
                    self.mgr.reload()  # the steps actually complete there
                except Exception:  # noqa: BLE001 - the storage is gone: the steps this process knows of
                    pass
                last = self.mgr.latest_step()
                intact = (f"the last complete checkpoint, step {last} ({self.directory / str(last)}), is intact"
                          if last is not None else "no earlier checkpoint exists")
                if full:
                    raise CheckpointError(f"disk full (no space left on device) while saving {what} to "
                                          f"{self.directory}: {_brief(err)}; {intact}. Free space (or lower "
                                          "train.keep_checkpoints) and run again to resume") from err
                raise CheckpointError(f"saving {what} to {self.directory} failed: {reason}; {intact}. Run again "
                                      "to resume from it once the storage answers") from err

        return ctx()

    def read_meta(self, step: int) -> dict:
        return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: dict, data_iter=None) -> dict:
        """The state of ``step`` laid out as ``abstract_state`` (arrays stored in row blocks unblocked)."""
        stored = self.stored_shapes(step)

        def target(path, leaf):
            shape = stored.get(_key(path))
            if shape is not None and is_blocked(shape, leaf.shape):
                return blocked_target(leaf, shape)
            return leaf

        read_as = jax.tree_util.tree_map_with_path(target, abstract_state)
        args = {"state": ocp.args.StandardRestore(read_as)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        state = self.mgr.restore(step, args=ocp.args.Composite(**args))["state"]
        return jax.tree.map(lambda x, want: x if x.shape == want.shape else _reshaped(x, want.shape, want.sharding),
                            state, abstract_state)

    def stored_shapes(self, step: int) -> dict[tuple[str, ...], tuple[int, ...]]:
        """Path -> shape of every array as stored at ``step`` (from orbax's metadata; empty if unreadable,
        the restore then reports the problem)."""
        try:
            meta = self.mgr.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the restore itself raises the clear error
            return {}
        if meta is None:
            return {}
        tree = getattr(meta, "tree", meta)
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
        return {_key(p): tuple(v.shape) for p, v in flat if hasattr(v, "shape")}

    def restore_latest(self, abstract_state: dict, data_iter=None,
                       check: Callable[[int, dict], None] | None = None,
                       log: Callable[[str], None] | None = None) -> tuple[int, dict, dict] | None:
        """``(step, meta, state)`` of the newest checkpoint that reads back, or None when there is none.

        ``check(step, meta)`` may refuse a checkpoint by raising (e.g. a config mismatch): that error
        propagates. A checkpoint that fails to read (a truncated or missing file) is reported through
        ``log`` (its path, step and error) and the previous one is tried; once an older one is restored,
        the unreadable newer ones are moved aside to ``<step>.unreadable-<n>`` (kept for inspection) so
        that training can save those steps again. None readable: :class:`CheckpointError`.
        """
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.mgr.reload()
        bad: list[tuple[int, str]] = []
        for step in sorted(self.mgr.all_steps(), reverse=True):
            path = self.directory / str(step)
            problem = None
            try:
                meta = self.read_meta(step)
            except Exception as err:  # noqa: BLE001 - any read failure means this checkpoint is unusable
                meta, problem = None, f"its metadata does not read ({_brief(err)})"
            if meta is not None and check is not None:
                check(step, meta)
            state = None
            if problem is None:
                try:
                    state = self.restore(step, abstract_state, data_iter)
                except Exception as err:  # noqa: BLE001
                    problem = f"its state does not read ({_brief(err)})"
                if problem is not None:
                    _drain_failed_reads()
            if not _all_processes_ok(problem is None):
                problem = problem or "it does not read on another process"
            if problem is not None:
                bad.append((step, problem))
                log(f"warning: checkpoint {path} (step {step}) is unreadable: {problem}; trying the previous one")
                continue
            for bad_step, _ in bad:
                self._move_aside(bad_step, log)
            if bad:
                log(f"resuming from step {step} ({path}), the newest readable checkpoint")
            return step, meta, state
        if bad:
            steps = ", ".join(str(s) for s, _ in bad)
            raise CheckpointError(f"no readable checkpoint in {self.directory}: steps {steps} all fail to read "
                                  f"(step {bad[0][0]}: {bad[0][1]}). Nothing was moved or deleted; move the "
                                  "directory aside to start from scratch, or restore it from a backup")
        return None

    def _move_aside(self, step: int, log: Callable[[str], None]) -> None:
        path = self.directory / str(step)
        if jax.process_index() == 0:
            n = 0
            while (target := path.with_name(f"{step}.unreadable-{n}")).exists():
                n += 1
            storage.move_dir(path, target)
            log(f"moved the unreadable checkpoint {path} to {target}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ngram_jax:moved_aside_{step}")
        self.mgr.reload()

    def wait(self) -> None:
        with self._save_errors("a checkpoint" if self._saving is None else f"step {self._saving}"):
            self.mgr.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        except BaseException:
            try:
                self.mgr.close()
            except Exception:  # noqa: BLE001 - the same failure again; the first one is raised
                pass
            raise
        self.mgr.close()


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
