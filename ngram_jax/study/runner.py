"""Run a sweep: validate every run first, then train, evaluate and record each unfinished one.

Each run trains in ``OUT/runs/NAME`` (``ngram_jax.train.loop.train``: it resumes from the latest
checkpoint, so a killed runner loses at most ``train.checkpoint_every`` steps of the run it was in),
is evaluated from its final checkpoint on the held-out split, and gets one JSON line in
``OUT/results.jsonl``. A rerun skips the runs recorded there. ``OUT`` may be a ``gs://`` or ``s3://`` URL.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import sys
import time
from collections.abc import Callable

from ngram_jax import storage
from ngram_jax.config import Config, ConfigError, eval_step_for_tokens, to_dict
from ngram_jax.errors import DataError
from ngram_jax.study.sweep import Run, Sweep

RESULTS = "results.jsonl"
# keys that may differ between a recorded run and the same run now (where it ran, how it printed)
IGNORED_DIFFERENCES = ("train.run_dir", "train.progress", "name")


def run_tokens(cfg: Config) -> int:
    """Tokens a run trains on: train.steps x data.batch_size x data.seq_len (row slots; padding included)."""
    return cfg.train.steps * cfg.data.batch_size * cfg.data.seq_len


def curve_steps(cfg: Config) -> list[tuple[int, int]]:
    """``(step, tokens)`` of every point of the run's held-out loss curve (``train.eval_at_tokens``): the
    first step reaching each token count, and the tokens trained by then."""
    per_step = cfg.data.batch_size * cfg.data.seq_len
    steps = [eval_step_for_tokens(n, cfg.data.batch_size, cfg.data.seq_len) for n in cfg.train.eval_at_tokens]
    return [(s, s * per_step) for s in steps]


def _metrics(cfg: Config) -> list[dict]:
    path = storage.location(cfg.train.run_dir, "train.run_dir") / "metrics.jsonl"
    with storage.reported(path, "train.run_dir"):
        found = path.is_file()
    text = storage.read_text(path, "train.run_dir", "a metrics.jsonl of a training run") if found else ""
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return out


def recorded_evals(cfg: Config) -> dict[int, float]:
    """Held-out losses in the run's metrics.jsonl by step (a resumed run's later record of a step wins)."""
    return {int(r["step"]): float(r["eval_loss"]) for r in _metrics(cfg) if "eval_loss" in r}


def read_curve(run: Run) -> list[list[float]]:
    """``[[tokens, held-out loss], ...]`` of a trained run, from its metrics.jsonl."""
    evals = recorded_evals(run.config)
    missing = [tok for step, tok in curve_steps(run.config) if step not in evals]
    if missing:
        raise DataError(f"run {run.name}: {run.config.train.run_dir}/metrics.jsonl records no held-out loss at "
                        f"{missing[0]:,} tokens of its curve (train.eval_at_tokens); rerun it in a new --out")
    return [[tok, evals[step]] for step, tok in curve_steps(run.config)]


def training_speed(cfg: Config) -> float | None:
    """Median training tokens/s over the run's logged windows (``tokens_per_s`` in metrics.jsonl)."""
    speeds = sorted(float(r["tokens_per_s"]) for r in _metrics(cfg) if "tokens_per_s" in r)
    return speeds[len(speeds) // 2] if speeds else None


def _saved_steps(cfg: Config) -> list[int]:
    ckpt = storage.location(cfg.train.run_dir, "train.run_dir") / "checkpoints"
    with storage.reported(ckpt, "train.run_dir"):
        return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def check_resumable(run: Run) -> None:
    """A run directory about to be resumed has recorded every curve point up to the step it resumes from
    (its checkpoint's config is compared by the training loop itself); otherwise the curve it would
    finish could not be trusted: a :class:`DataError` naming the point, before training."""
    saved = _saved_steps(run.config)
    if not saved:
        return
    evals = recorded_evals(run.config)
    for step, tok in curve_steps(run.config):
        if step <= saved[-1] and step not in evals:
            raise DataError(f"run {run.name}: {run.config.train.run_dir} resumes from step {saved[-1]}, but its "
                            f"metrics.jsonl has no held-out loss at step {step} ({tok:,} tokens), a point of the "
                            "curve its config asks for (train.eval_at_tokens): it was trained with another curve "
                            "or its metrics were lost; use another --out or remove the run directory")


def check_data(sweep: Sweep) -> None:
    """Before any training: every run's data directory exists (the bundled corpus is prepared), matches the
    model's vocabulary and EOS, and holds at least the tokens the run trains on (no repeated epochs)."""
    from ngram_jax.data.prepare import ensure_bundled, read_metadata

    metas: dict[str, dict] = {}
    for run in sweep.runs:
        m, d = run.config.model, run.config.data
        if d.path not in metas:
            metas[d.path] = ensure_bundled(d.path, m.vocab_size) if d.bundled else read_metadata(d.path)
        meta = metas[d.path]
        if meta["vocab_size"] != m.vocab_size:
            raise ConfigError(f"run {run.name}: {d.path} was tokenized with vocab_size {meta['vocab_size']}, the "
                              f"model has model.vocab_size={m.vocab_size}")
        if m.eos_id is not None and meta["eos_id"] != m.eos_id:
            raise ConfigError(f"run {run.name}: {d.path} ends documents with token {meta['eos_id']}, the model "
                              f"resets n-grams at model.eos_id={m.eos_id}")
        need, have = run_tokens(run.config), int(meta["splits"]["train"]["tokens"])
        if need > have:
            raise DataError(f"run {run.name}: trains on {need:,} tokens (train.steps x data.batch_size x "
                            f"data.seq_len = {run.config.train.steps} x {d.batch_size} x {d.seq_len}) but {d.path} "
                            f"has {have:,} training tokens; use a larger corpus (python -m ngram_jax.data.prepare "
                            "--study) or fewer steps")


def read_results(out: str | os.PathLike, sweep: Sweep) -> dict[str, dict]:
    """Finished runs by name. A record of another sweep or scale, or of a run whose configuration has
    changed since, is a :class:`DataError` (use another --out)."""
    from ngram_jax.checkpoint import config_differences

    path = storage.location(out, "--out") / RESULTS
    with storage.reported(path, "--out"):
        if not path.is_file():
            return {}
    text = storage.read_text(path, "--out", f"a {RESULTS} of python -m ngram_jax.study")
    by_name = {r.name: r for r in sweep.runs}
    done: dict[str, dict] = {}
    lines = text.splitlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rec["name"], rec["sweep"]  # noqa: B018 - presence check
        except (json.JSONDecodeError, KeyError, TypeError):
            if lineno == len(lines) and not text.endswith("\n"):  # a write cut short by a kill: that run reruns
                path.write_text("".join(x + "\n" for x in lines[:-1]))
                break
            raise DataError(f"{path}:{lineno}: not a results record (a JSON object with name and sweep)") from None
        if (rec["sweep"], rec.get("scale")) != (sweep.name, sweep.scale):
            raise DataError(f"{path} holds results of sweep {rec['sweep']!r} at scale {rec.get('scale')!r} "
                            f"(line {lineno}), not {sweep.name!r} at {sweep.scale!r}; use another --out")
        run = by_name.get(rec["name"])
        if run is not None and "config" in rec:
            diffs = config_differences(rec["config"], run.config, IGNORED_DIFFERENCES)
            if diffs:
                raise DataError(f"{path}: run {run.name} was recorded with another configuration ("
                                + "; ".join(diffs[:3]) + "); use another --out, or the same --set/--scale")
        if run is not None and rec.get("eval_curve") is not None:
            want = [tok for _, tok in curve_steps(run.config)]
            if [int(p[0]) for p in rec["eval_curve"]] != want:
                raise DataError(f"{path}: run {run.name} recorded its curve at {[p[0] for p in rec['eval_curve']]} "
                                f"tokens, its config asks for {want}; use another --out")
        done[rec["name"]] = rec
    return done


def activation_norms(model, batch: dict) -> dict[str, float]:
    """Mean L2 norm per (non-padding) token of the input embedding (after amplification) and of the first
    attention sublayer's output: the paper's explanation of amplification (section 3)."""
    import jax.numpy as jnp
    import numpy as np

    from ngram_jax.model import default_positions

    x, seg = jnp.asarray(batch["inputs"]), jnp.asarray(batch["segment_ids"])
    pos = jnp.asarray(batch["positions"]) if "positions" in batch else default_positions(x.shape, seg)
    h = model.embed(x, segment_ids=seg)
    blk = model.blocks[0]
    a = blk.attn[0](blk.attn_norm[0](h), pos, seg)
    mask = np.asarray(seg) != 0

    def mean_norm(t):
        return float(np.linalg.norm(np.asarray(t, np.float64), axis=-1)[mask].mean())

    return {"embedding_norm": mean_norm(h), "attention_out_norm": mean_norm(a)}


def evaluate_run(run: Run) -> dict:
    """Held-out loss, bits per byte and activation norms of a finished run, from its last checkpoint
    (the same ``train.eval_batches`` held-out batches for every run of every seed); for an MoE model also
    ``routing``, its routing diagnostics and held-out loss without the MoE branch (``eval.routing``)."""
    from ngram_jax.checkpoint import restore_model
    from ngram_jax.data.pipeline import make_dataset
    from ngram_jax.eval.perplexity import evaluate
    from ngram_jax.eval.routing import routing_report

    cfg = run.config
    model, _ = restore_model(cfg.train.run_dir)
    ev = evaluate(model, cfg.data.path, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
                  max_batches=cfg.train.eval_batches)
    batch = next(iter(make_dataset(cfg.data.path, "heldout", seq_len=cfg.data.seq_len,
                                   batch_size=cfg.data.batch_size, vocab_size=cfg.model.vocab_size, seed=0,
                                   repeat=False)))
    out = {"eval_loss": ev["loss"], "eval_bits_per_byte": ev["bits_per_byte"], "eval_tokens": ev["tokens"],
           **activation_norms(model, batch)}
    if cfg.model.moe.num_experts:  # what the routed experts do, and the loss without them
        out["routing"] = routing_report(model, cfg.data.path, seq_len=cfg.data.seq_len,
                                        batch_size=cfg.data.batch_size, max_batches=cfg.train.eval_batches)
    return out


def record_for(sweep: Sweep, run: Run, ev: dict, wall_s: float) -> dict:
    from ngram_jax.budget import closed_form_budget, ratios

    b = closed_form_budget(run.config.model)
    return {
        "sweep": sweep.name, "scale": sweep.scale, "name": run.name, "group": run.group, "seed": run.seed,
        "variant": run.variant, "grid": run.grid, "overrides": run.overrides, "derived": run.derived,
        "baseline_of": run.baseline_of, **ev, "tokens": run_tokens(run.config), "steps": run.config.train.steps,
        "train_tokens_per_s": training_speed(run.config),
        "total_params": b["total"], "activated_params": b["activated_max"], "activated_params_min": b["activated_min"],
        "ngram_params": b["ngram"], "ngram_share": b["ngram"] / b["total"],
        **ratios(b), "budget": b, "wall_s": round(wall_s, 1),
        "config": to_dict(run.config),
    }


def select_runs(runs: list, only: list[str] | None) -> list:
    """The runs ``only`` names (exact names or shell patterns, ``hi-*``), in the order of ``only``; every
    run when it is None. A pattern that matches no run is an error naming the runs there are."""
    if only is None:
        return list(runs)
    chosen = []
    for pattern in only:
        hits = [r for r in runs if fnmatch.fnmatchcase(r.name, pattern)]
        if not hits:
            raise ConfigError(f"--only {pattern!r} matches no run of this sweep; its runs: "
                              f"{', '.join(r.name for r in runs)}")
        chosen += [r for r in hits if r.name not in {c.name for c in chosen}]
    return chosen


def run_sweep(sweep: Sweep, out: str | os.PathLike, *, max_runs: int | None = None, only: list[str] | None = None,
              train_fn: Callable[[Config], dict] | None = None, log: Callable[[str], None] | None = None) -> list[dict]:
    """Train, evaluate and record the sweep's unfinished runs (only those ``only`` selects, in its order;
    at most ``max_runs`` of them, counting only runs this call finishes). Returns the records written by
    this call."""
    out = storage.check(out, "--out", write=True)  # a bucket that is missing or refuses writes fails first
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check_data(sweep)
    done = read_results(out, sweep)  # refuses a results file of another sweep before any training
    todo = [r for r in select_runs(sweep.runs, only) if r.name not in done]
    for run in todo:  # every resumed run's recorded curve agrees with its config, before any training
        check_resumable(run)
    log(f"{sweep.name} ({sweep.scale}): {len(sweep.runs)} runs, {len(done)} finished, {len(todo)} to go")
    if train_fn is None:
        from ngram_jax.train.loop import train as train_fn
    out = storage.output_dir(out, "--out")
    written = []
    for i, run in enumerate(todo):
        if max_runs is not None and i >= max_runs:
            log(f"--max-runs {max_runs}: stopping with {len(todo) - i} runs left")
            break
        log(f"[{i + 1}/{len(todo)}] {run.name}")
        t0 = time.perf_counter()
        result = train_fn(run.config)
        if result.get("stopped_by"):  # SIGTERM/SIGINT: the run saved a checkpoint; a rerun resumes it
            log(f"{run.name}: stopped by {result['stopped_by']} at step {result.get('step')}; run again to resume")
            break
        ev = evaluate_run(run)
        if not math.isfinite(ev["eval_loss"]):
            raise DataError(f"run {run.name}: held-out loss is {ev['eval_loss']}")
        if run.config.train.eval_at_tokens:
            ev["eval_curve"] = read_curve(run)
        rec = record_for(sweep, run, ev, time.perf_counter() - t0)
        with storage.AppendedFile(out / RESULTS, every_s=0, durable=True) as f:  # on disk (or in the bucket) now
            f.write(json.dumps(rec) + "\n")
        written.append(rec)
        log(f"{run.name}: held-out loss {ev['eval_loss']:.4f}, {ev['eval_bits_per_byte']:.4f} bits/byte, "
            f"{rec['total_params']:,} params ({rec['ngram_share']:.0%} NE)")
    return written


def list_runs(sweep: Sweep) -> list[str]:
    from ngram_jax.budget import closed_form_budget

    lines = []
    for r in sweep.runs:
        b = closed_form_budget(r.config.model)
        extra = " ".join(f"{k}={v}" for k, v in r.derived.items())
        lines.append(f"{r.name:<48} total {b['total']:>12,}  activated {b['activated_max']:>11,}  "
                     f"NE {b['ngram'] / b['total']:>4.0%}  tokens {run_tokens(r.config):>12,}  {extra}")
    return lines

