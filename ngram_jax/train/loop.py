"""The training loop: data -> jitted step (donated state) -> metrics, evaluation, checkpoints.

Resumes from the latest complete checkpoint in ``train.run_dir``; SIGTERM/SIGINT save at the
current step and exit cleanly; a non-finite loss stops with a clear message and saves nothing.
``train.run_dir``, ``data.path`` and ``train.init_from`` may be ``gs://`` or ``s3://`` URLs
(:mod:`ngram_jax.storage`): their buckets are checked before anything is built or written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ngram_jax import storage
from ngram_jax.budget import check_config, parameter_budget
from ngram_jax.checkpoint import Checkpointer, DataState, config_differences, row_chunked_paths, warm_start
from ngram_jax.config import Config, ConfigError, eval_step_for_tokens, to_dict
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import ensure_bundled, read_metadata
from ngram_jax.errors import DataError
from ngram_jax.layers.moe import routing_diagnostics, update_selection_bias
from ngram_jax.ngram.lookup import hashed_tables, row_perturbations
from ngram_jax.sharding import initialize_distributed, make_mesh, param_context, rules_for_mesh
from ngram_jax.train.loss import eval_step, loss_fn
from ngram_jax.train.metrics import MetricsWriter, TrainWindow, peak_flops
from ngram_jax.train.optimizer import Optimizer, schedule
from ngram_jax.train.state import build_train_state, train_state_target


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def train_step(model, opt: Optimizer, batch, draft_head_weight: float = 1.0, loss_chunks: int = 1):
    """One update. With a row-wise table optimizer the N-gram tables are not differentiated: the step
    takes the gradient of zero perturbations of the gathered rows (row gradients [B, S, T, W]) and
    updates only the rows read, on the shards that own them."""
    lookups = dict(hashed_tables(model))
    rows = {k: m.row_ids(batch["inputs"], segment_ids=batch["segment_ids"]) for k, m in lookups.items()}
    if not opt.sparse:
        (_, loss), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, opt.wrt), has_aux=True)(
            model, batch, draft_head_weight, loss_chunks)
        grad_norm = optax.tree.norm(grads)
        opt.dense.update(model, grads)
    else:
        deltas = {k: jnp.zeros(m.gathered_shape(batch["inputs"].shape), jnp.float32) for k, m in lookups.items()}

        def perturbed_loss(model, deltas):
            with row_perturbations(model, deltas):
                return loss_fn(model, batch, draft_head_weight, loss_chunks)

        (_, loss), (grads, row_grads) = nnx.value_and_grad(
            perturbed_loss, argnums=(nnx.DiffState(0, opt.wrt), 1), has_aux=True)(model, deltas)
        sq = jnp.square(optax.tree.norm(grads))
        for k, m in lookups.items():
            sq = sq + opt.tables[k].sq_norm(m, rows[k], row_grads[k])
        grad_norm = jnp.sqrt(sq)
        scale = jnp.minimum(1.0, opt.grad_clip / jnp.maximum(grad_norm, 1e-30))
        step = opt.step[...]
        opt.dense.update(model, jax.tree.map(lambda g: g * scale, grads))
        for k, m in lookups.items():
            opt.tables[k].update(m, rows[k], row_grads[k], step, scale)
    for k, m in lookups.items():
        m.record_usage(rows[k])
    if not opt.freeze_target:  # a frozen target keeps its routing too
        update_selection_bias(model)  # aux-loss-free balancing, outside the optimizer
    counts = [b.moe.counts[...] for b in model.blocks if b.moe is not None]
    totals = [b.moe.routing[...] for b in model.blocks if b.moe is not None]
    usage = [m.usage_fraction() for m in lookups.values()]
    return {"loss": loss, "grad_norm": grad_norm, "tokens": jnp.sum(batch["segment_ids"] != 0),
            "expert_counts": jnp.stack(counts) if counts else jnp.zeros((0, 0), jnp.int32),
            "routing_totals": jnp.stack(totals) if totals else jnp.zeros((0, 0), jnp.float32),
            "ngram_rows_seen_frac": usage[0] if usage else jnp.float32(jnp.nan)}


class TrainStep:
    """The jitted update ``train.py`` runs, over the split state of (model, optimizer).

    ``nnx.jit`` walks the module graph on every call (about 60 ms of Python per call for the tiny models on
    this project's 2-core CPU; it overlaps the running step, so the measured step time barely changes:
    docs/BENCHMARKS.md, ``benchmarks/vs_torch.py``); here the graph is split once, the step is a pure
    ``jax.jit`` function of the state pytree (its buffers donated, so the update is in place), and the
    modules see the new state only when :meth:`sync` is called (before evaluation, checkpoint saves and at the end).

        step = TrainStep(cfg, model, opt)
        metrics = step(batch)   # asynchronous: reading a metric waits for the step
        step.sync()             # model and opt now hold the latest parameters and optimizer state
    """

    def __init__(self, cfg: Config, model, opt):
        self.modules = (model, opt)
        self.graphdef, self.state = nnx.split(self.modules)
        weight, chunks = cfg.train.draft_head_weight, cfg.train.loss_chunks

        def pure(state, batch):
            model, opt = nnx.merge(self.graphdef, state)
            out = train_step(model, opt, batch, weight, chunks)
            return nnx.state((model, opt)), out

        def pure_eval(state, batch):
            model, _ = nnx.merge(self.graphdef, state)
            return eval_step(model, batch, chunks)

        self._step = jax.jit(pure, donate_argnums=(0,))
        self._eval = jax.jit(pure_eval)
        self._synced = True

    def __call__(self, batch: dict) -> dict:
        self.state, out = self._step(self.state, batch)
        self._synced = False
        return out

    def eval(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        """``(sum of cross-entropy, scored targets)`` of a held-out batch under the current state."""
        return self._eval(self.state, batch)

    def sync(self):
        """Write the latest state into the model and optimizer modules; returns them."""
        if not self._synced:
            nnx.update(self.modules, self.state)
            self._synced = True
        return self.modules

    def lower(self, batch: dict):
        """The lowered step (for HLO inspection and XLA's memory analysis)."""
        return self._step.lower(self.state, batch)


def make_train_step(cfg: Config, model, opt) -> TrainStep:
    """``step(batch) -> metrics``: one update of ``model`` and ``opt`` (see :class:`TrainStep`)."""
    return TrainStep(cfg, model, opt)


class _StopFlag:
    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def _device_batch(batch: dict, sharding: NamedSharding) -> dict:
    out = {}
    for k, v in batch.items():
        spec = P(*sharding.spec, *([None] * (v.ndim - len(sharding.spec))))
        out[k] = jax.make_array_from_process_local_data(NamedSharding(sharding.mesh, spec), v)
    return out


def evaluate(cfg: Config, sharding, eval_fn) -> float:
    """Mean held-out cross-entropy per token over ``train.eval_batches`` batches; ``eval_fn(batch)``
    returns ``(sum of cross-entropy, scored targets)`` of a device batch."""
    ds = make_dataset(cfg.data.path, "heldout", seq_len=cfg.data.seq_len,
                      batch_size=cfg.data.batch_size // jax.process_count(), vocab_size=cfg.model.vocab_size,
                      seed=cfg.data.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                      repeat=False)
    total, count = 0.0, 0.0
    for i, batch in enumerate(ds):
        if i >= cfg.train.eval_batches:
            break
        s, c = eval_fn(_device_batch(batch, sharding))
        total, count = total + float(s), count + float(c)
    if count == 0:
        raise DataError(f"{cfg.data.path}: the held-out split yields no full batch of "
                         f"{cfg.data.batch_size}x{cfg.data.seq_len}; lower data.batch_size")
    return total / count


def log_metrics(cfg: Config, out: dict, window: TrainWindow) -> dict:
    """The metrics of a log step: throughput and MFU of the window's training steps, gradient norm,
    the step's routing (``layers.moe.routing_diagnostics``), N-gram row usage."""
    record = {"grad_norm": float(out["grad_norm"]), **window.report()}
    counts = np.asarray(out["expert_counts"])
    if counts.size:  # the logged step's routing: load, drops, routed mass, the bias's share of the choices
        record.update(routing_diagnostics(counts, out["routing_totals"], cfg.model.moe.num_experts,
                                          cfg.model.moe.top_k))
    seen = float(out["ngram_rows_seen_frac"])
    if math.isfinite(seen):  # fraction of the N-gram rows read so far, recorded by the model
        record["ngram_rows_seen_frac"] = seen
    return record


def check_resumed_steps(saved_steps: int, cfg: Config, start: int) -> None:
    """Resuming with another ``train.steps`` would silently change the learning-rate schedule (the
    cosine decays over ``train.steps``): refused unless ``train.extend`` is true, which takes the
    schedule of the new ``train.steps`` for the remaining steps. A constant schedule does not depend on
    ``train.steps``: any number of steps resumes it."""
    steps = cfg.train.steps
    if steps == saved_steps or cfg.train.extend or cfg.train.schedule == "constant":  # constant: no change
        return
    old, new = schedule(dataclasses.replace(cfg.train, steps=saved_steps)), schedule(cfg.train)
    raise ConfigError(
        f"{cfg.train.run_dir} was trained (to step {start}) with train.steps={saved_steps}, which its "
        f"learning-rate schedule decays over; train.steps={steps} would change the learning rate from step "
        f"{start} on ({float(old(start)):.3g} -> {float(new(start)):.3g}). Resume with train.steps={saved_steps}, "
        f"or set train.extend=true to continue on the schedule of train.steps={steps}")


def train(cfg: Config) -> dict:
    """Train (or resume) the run ``cfg.train.run_dir``; returns the final metrics."""
    check_config(cfg)
    where = storage.config_locations(cfg)
    initialize_distributed()
    t, d = cfg.train, cfg.data
    run_dir = where["train.run_dir"]
    lead = jax.process_index() == 0
    # a bucket that does not exist, refuses writes or cannot be reached: one line, before anything is written
    storage.check(run_dir, "train.run_dir", write=lead)
    for key in ("data.path", "train.init_from"):
        if key in where:
            storage.check(where[key], key)
    if d.bundled and lead:
        ensure_bundled(d.path, cfg.model.vocab_size)
    if jax.process_count() > 1:  # the others wait until process 0 has prepared the data
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ngram_jax:data_ready")
    meta = read_metadata(d.path)
    if meta["vocab_size"] != cfg.model.vocab_size:
        raise ConfigError(f"{d.path} was tokenized with vocab_size {meta['vocab_size']}, the model has "
                          f"model.vocab_size={cfg.model.vocab_size}")
    if cfg.model.eos_id is not None and meta["eos_id"] != cfg.model.eos_id:
        raise ConfigError(f"{d.path} ends documents with token {meta['eos_id']}, the model resets n-grams at "
                          f"model.eos_id={cfg.model.eos_id}")
    if d.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size={d.batch_size} must divide over {jax.process_count()} processes")

    mesh = make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    batch_axes = dict(rules_for_mesh(rules, mesh)).get("batch")
    sharding = NamedSharding(mesh, P(batch_axes))
    ckpt = Checkpointer(run_dir / "checkpoints", t.keep_checkpoints)

    def same_config(step: int, saved_meta: dict) -> None:
        diffs = config_differences(saved_meta["config"], cfg)
        if diffs:
            ckpt.close()
            raise ConfigError(f"{run_dir} holds a checkpoint (step {step}) of a different configuration; "
                              "use another train.run_dir or the same config. Differences:\n  " + "\n  ".join(diffs))
        try:
            check_resumed_steps(saved_meta["config"]["train"]["steps"], cfg, step)
        except ConfigError:
            ckpt.close()
            raise

    latest = ckpt.latest_step()
    if latest is not None:  # refuse another config before the model is built (and compiled)
        try:
            meta = ckpt.read_meta(latest)
        except Exception:  # noqa: BLE001 - an unreadable checkpoint is reported by restore_latest below
            meta = None
        if meta is not None:
            same_config(latest, meta)
    model, opt = build_train_state(cfg, mesh)
    train_iter = iter(make_dataset(d.path, "train", seq_len=d.seq_len, batch_size=d.batch_size // jax.process_count(),
                                   vocab_size=cfg.model.vocab_size, seed=d.seed, process_index=jax.process_index(),
                                   process_count=jax.process_count()))
    # the newest checkpoint that reads back; unreadable newer ones are reported and moved aside
    found = ckpt.restore_latest(train_state_target(model, opt, mesh, rules), train_iter, check=same_config,
                                log=(lambda msg: print(msg, file=sys.stderr, flush=True)) if lead else (lambda _: None))
    start = found[0] if found else 0
    if found:
        restored = found[2]
        for module, saved in ((model, restored["model"]), (opt, restored["opt"])):
            state = nnx.state(module)
            nnx.replace_by_pure_dict(state, saved)
            nnx.update(module, state)
        if lead:
            print(f"resumed {run_dir} from step {start}", flush=True)
    elif t.init_from:  # a new run starting from another run's model (e.g. a frozen target for an MTP head)
        kept = warm_start(model, t.init_from, mesh)
        if lead:
            print(f"{run_dir} starts from {t.init_from}; initialised here: {', '.join(kept) or 'nothing'}", flush=True)

    chunked = row_chunked_paths(model, opt)
    window = TrainWindow(cfg, parameter_budget(cfg)["activated_max"], peak_flops(cfg) * jax.device_count())
    lr_at = schedule(t)
    writer = MetricsWriter(run_dir, enabled=lead)
    result: dict = {"step": start}
    curve_steps = {eval_step_for_tokens(n, d.batch_size, d.seq_len) for n in t.eval_at_tokens}

    with param_context(mesh, rules), _StopFlag() as stop:
        step_fn = make_train_step(cfg, model, opt)
        progress = None
        if t.progress and lead:
            from tqdm import tqdm

            progress = tqdm(total=t.steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)
        step = start
        batch = _device_batch(next(train_iter), sharding) if step < t.steps else None
        try:
            while step < t.steps:
                t0 = time.perf_counter()  # the window times the training step alone (not eval, saves, logs)
                out = step_fn(batch)  # asynchronous
                step += 1
                # the data state of this step (checkpoints save it), then the next batch is packed and put on
                # the device while the step runs
                data_state = DataState(train_iter.get_state())
                batch = _device_batch(next(train_iter), sharding) if step < t.steps else None
                loss = float(out["loss"])  # waits for the step
                window.add(time.perf_counter() - t0, out)
                if not math.isfinite(loss):
                    last = ckpt.latest_step()
                    where = f"step {last} in {ckpt.directory}" if last is not None else "none yet"
                    raise TrainingDiverged(f"loss is {loss} at step {step}: training stopped and this step was not "
                                           f"saved; last good checkpoint: {where} (lower train.lr or check the data)")
                record = {"loss": loss, "lr": float(lr_at(step - 1))}
                if step % t.log_every == 0 or step == t.steps:
                    record.update(log_metrics(cfg, out, window))
                    if progress is not None:
                        progress.set_postfix(loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
                if step % t.eval_every == 0 or step == t.steps or step in curve_steps:
                    record["eval_loss"] = evaluate(cfg, sharding, step_fn.eval)
                    record["eval_ppl"] = math.exp(min(record["eval_loss"], 50.0))
                    result.update(eval_loss=record["eval_loss"], eval_ppl=record["eval_ppl"])
                writer.write(step, record)
                result.update(step=step, loss=loss)
                if progress is not None:
                    progress.update(1)
                if (step % t.checkpoint_every == 0 or step == t.steps or step in curve_steps
                        or stop.signal is not None):  # a curve point is saved: a resumed run never redoes it
                    step_fn.sync()
                    # in a bucket metrics.jsonl is rewritten now and then: it holds every step up to a checkpoint
                    # before the checkpoint can be complete (a resumed run continues after it)
                    writer.flush()
                    ckpt.save(step, {"model": nnx.to_pure_dict(nnx.state(model)),
                                     "opt": nnx.to_pure_dict(nnx.state(opt))}, data_state,
                              {"config": to_dict(cfg), "step": step}, chunked)
                if stop.signal is not None:
                    ckpt.wait()
                    name = signal.Signals(stop.signal).name
                    if lead:
                        print(f"\n{name}: saved step {step} to {ckpt.directory}; run again to resume", flush=True)
                    result["stopped_by"] = name
                    break
            step_fn.sync()
        except BaseException as err:  # the error that stopped training is the one reported, not a closer's
            failed = isinstance(err, storage.StorageError) or storage.failure(err) is not None
            closers = [progress.close] if progress is not None else []
            # after a storage failure nothing more is written there (each write would wait out the retries)
            for close in (*closers, lambda: writer.close(flush=not failed), ckpt.close):
                with contextlib.suppress(Exception):
                    close()
            if isinstance(err, storage.StorageError):  # e.g. metrics.jsonl: where the run stands
                last = ckpt.mgr.latest_step()  # the steps complete (a save that failed in ckpt.close is dropped)
                intact = (f"the last complete checkpoint, step {last} ({ckpt.directory / str(last)}), is intact"
                          if last is not None else "no checkpoint was saved")
                raise storage.StorageError(f"{err}; training stopped at step {step} and {intact}. Run again to "
                                           "resume from it once the storage answers") from err
            raise
        if progress is not None:
            progress.close()
        writer.close()
        ckpt.close()
    result["checkpoint"] = str(ckpt.directory / str(step))
    return result
