"""Checkpoints through orbax: a CheckpointManager holding the model and optimizer state, the data iterator
state and the metadata (the resolved config); building the model and optimizer (and the abstract restore
target) is :mod:`ngram_jax.train.state`'s job.

Saves are asynchronous and atomic (orbax writes a temporary directory and renames it when complete), so a
crash or a kill at any moment leaves the latest *complete* checkpoint readable. A complete checkpoint
damaged afterwards (a truncated or deleted file) is reported and skipped when resuming
(:meth:`Checkpointer.restore_latest`); a full disk during a save is a :class:`CheckpointError` naming the
directory and the last complete checkpoint, which stays intact.

The directory may be a ``gs://`` or ``s3://`` URL (:mod:`ngram_jax.storage`). There a checkpoint is complete
when orbax has written its ``commit_success.txt`` (an object store has no atomic rename); ``s3://`` needs
:mod:`ngram_jax.checkpoint.s3`.
"""

from __future__ import annotations

import contextlib
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

from ngram_jax import storage
from ngram_jax.checkpoint import s3
from ngram_jax.checkpoint.blocks import blockable, blocked_target, is_blocked, path_key, reshaped, to_blocks
from ngram_jax.errors import CheckpointError, exception_chain, one_line, root_cause


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain (tensorstore reports it as text, not as an errno)."""
    return any(getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e)
               for e in exception_chain(err))


def _brief(err: BaseException) -> str:
    """The root cause of ``err`` on one line (orbax wraps tensorstore's precise message in a long spec)."""
    cause = root_cause(err)
    return f"{type(cause).__name__}: {one_line(cause, 400)}"


class _AbandonedReads:
    """What orbax leaves behind when a restore fails, kept off the console.

    orbax reads a checkpoint's arrays concurrently (``asyncio.gather``) on an event loop it closes when the
    restore ends; when one read fails, the others are abandoned on that closed loop. Each ends later, in
    tensorstore's threads or when it is garbage-collected: as an unraisable exception ("Exception ignored
    in ...", the same read failure, naming the checkpoint's path in the tensorstore spec orbax quotes; or
    "Event loop is closed" from a read completing on the closed loop) or as asyncio's "Task exception was
    never retrieved" log record. The failure itself is reported once, by :meth:`Checkpointer.restore_latest`.

    :meth:`of` installs, at the first failed restore and for the rest of the process (the reads may end up
    to interpreter exit), a ``sys.unraisablehook`` and an ``asyncio`` log filter that drop exactly those:
    exceptions whose chain names a checkpoint directory that failed to restore, and "Event loop is closed".
    Every other unraisable exception and log record passes on unchanged."""

    failed: list[str] = []  # the directories (as text) of checkpoints whose restore failed

    @classmethod
    def of(cls, directory) -> None:
        cls.failed.append(os.fspath(directory))
        if not isinstance(sys.unraisablehook, _AbandonedReadHook):
            sys.unraisablehook = _AbandonedReadHook(sys.unraisablehook)
        noise = logging.getLogger("asyncio")
        if not any(isinstance(f, _AbandonedReadFilter) for f in noise.filters):
            noise.addFilter(_AbandonedReadFilter())

    @classmethod
    def matches(cls, err: BaseException | None) -> bool:
        for e in exception_chain(err):
            if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
                return True
            text = str(e)
            if any(d + "/" in text or d + "'" in text for d in cls.failed):
                return True
        return False


class _AbandonedReadHook:
    def __init__(self, previous):
        self.previous = previous

    def __call__(self, u) -> None:
        if not _AbandonedReads.matches(u.exc_value):
            self.previous(u)


class _AbandonedReadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and _AbandonedReads.matches(record.exc_info[1]))


def _all_processes_ok(ok: bool) -> bool:
    """Whether every process succeeded (processes must agree on the checkpoint they resume from)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(ok, np.int32))))


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
    """The checkpoints of one run directory: asynchronous saves of the train state (tables in row blocks),
    the data iterator's state and the metadata (step, config), and restores that skip unreadable ones."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        directory = storage.location(directory, "checkpoint directory")
        remote = storage.is_remote(directory)
        self.directory = directory if remote else directory.absolute()
        if remote:
            storage.check(directory, "checkpoint directory")  # before orbax's mkdir, which would create a bucket
            if storage.parts(directory)[0] == "s3":
                s3.enable()
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

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def save(self, step: int, state: dict, data_iter, meta: dict,
             row_chunked: frozenset[tuple[str, ...]] = frozenset()) -> None:
        """Save asynchronously. The arrays at ``row_chunked`` paths (tables and their optimizer state, see
        :func:`~ngram_jax.checkpoint.blocks.row_chunked_paths`) are stored in row blocks
        (:mod:`ngram_jax.checkpoint.blocks`) so that analysis can read single rows lazily."""

        def blocked(path, leaf) -> bool:
            return (path_key(path) in row_chunked and isinstance(leaf, jax.Array)
                    and blockable(leaf.shape, leaf.sharding))

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
            shape = stored.get(path_key(path))
            if shape is not None and is_blocked(shape, leaf.shape):
                return blocked_target(leaf, shape)
            return leaf

        read_as = jax.tree_util.tree_map_with_path(target, abstract_state)
        args = {"state": ocp.args.StandardRestore(read_as)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        state = self.mgr.restore(step, args=ocp.args.Composite(**args))["state"]
        return jax.tree.map(lambda x, want: x if x.shape == want.shape else reshaped(x, want.shape, want.sharding),
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
        return {path_key(p): tuple(v.shape) for p, v in flat if hasattr(v, "shape")}

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
                    _AbandonedReads.of(path)
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
