"""Training metrics: FLOP estimate, throughput and MFU over training steps only, and a writer for JSONL
and TensorBoard event files."""

from __future__ import annotations

import json
import math
import sys

import jax
import numpy as np

from ngram_jax import storage
from ngram_jax.config import Config

# dense bf16 peak FLOP/s per chip, by jax device_kind prefix
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def flops_per_token(cfg: Config, activated_params: int) -> float:
    """Training FLOPs per token: 6 x activated parameters + causal attention scores (fwd + bwd)."""
    m, a = cfg.model, cfg.model.attention
    if a.kind == "mla":
        per_head = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
    else:
        per_head = 2 * a.head_dim
    attention = 6 * (2 * m.num_blocks) * a.num_heads * per_head * cfg.data.seq_len / 2
    return 6.0 * activated_params + attention


def peak_flops(cfg: Config) -> float:
    if cfg.train.peak_flops_per_device > 0:
        return cfg.train.peak_flops_per_device
    kind = jax.devices()[0].device_kind
    for prefix, value in PEAK_FLOPS.items():
        if kind.startswith(prefix):
            return value
    return math.nan  # unknown (e.g. CPU): MFU is not reported


def activated_params(cfg: Config, activated_max: int, expert_counts) -> float:
    """Activated parameters per token as routed: ``activated_max`` (every routed slot a real expert) less
    one expert's weights for every slot that went to a zero expert.

    ``expert_counts`` int [L, E+Z]: assignments per expert of the real tokens of a step, one row per MoE
    layer (``train_step``'s ``expert_counts``); real experts per token in layer l are
    ``top_k * sum(counts[l, :E]) / sum(counts[l])``."""
    e = cfg.model.moe
    counts = np.asarray(expert_counts, np.float64)
    if counts.size == 0 or e.num_experts == 0:
        return float(activated_max)
    k_max = min(e.top_k, e.num_experts)
    total = counts.sum(axis=1)
    real = np.where(total > 0, e.top_k * counts[:, : e.num_experts].sum(axis=1) / np.maximum(total, 1), k_max)
    return float(activated_max - 3 * cfg.model.d_model * e.expert_dim * np.sum(k_max - real))


class TrainWindow:
    """Throughput and MFU between two log steps, from the training steps alone.

    :meth:`add` takes the seconds of one training step (fetching its batch, the step, waiting for its
    loss) and the step's output: ``tokens`` (real tokens, ``segment_ids != 0``: padding is not counted)
    and ``expert_counts`` (for the activated parameters actually routed, see :func:`activated_params`).
    Evaluation, checkpoint saves and logging happen outside :meth:`add` and never enter the window."""

    def __init__(self, cfg: Config, activated_max: int, peak: float):
        self.cfg, self.activated_max, self.peak = cfg, activated_max, peak
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds, self.tokens, self.flops, self.activated_tokens = 0, 0.0, 0, 0.0, 0.0

    def add(self, seconds: float, out: dict) -> None:
        tokens = int(out["tokens"])
        activated = activated_params(self.cfg, self.activated_max, out["expert_counts"])
        self.steps += 1
        self.seconds += seconds
        self.tokens += tokens
        self.activated_tokens += activated * tokens
        self.flops += flops_per_token(self.cfg, activated) * tokens

    def report(self) -> dict:
        """The window's metrics (then starts a new window)."""
        seconds = max(self.seconds, 1e-12)
        record = {"tokens_per_s": self.tokens / seconds, "step_time_s": seconds / max(self.steps, 1),
                  "train_tokens": self.tokens,
                  "activated_params": self.activated_tokens / self.tokens if self.tokens else math.nan}
        if math.isfinite(self.peak):
            record["mfu"] = self.flops / seconds / self.peak
        self.reset()
        return record


class _EventFile(storage.AppendedFile):
    """A TensorBoard event file in a bucket, rewritten whole whenever tensorboardX flushes it (every
    ``flush_secs``, from its writer thread, and at close). TensorBoard is best effort: a flush that fails
    (the storage unreachable) prints one warning and keeps the events for the next flush."""

    def __init__(self, path: str):
        super().__init__(path, binary=True, every_s=float("inf"), what="TensorBoard event file")
        self.warned = False
        self.abandoned = False  # the storage failed: close without writing

    def flush(self) -> None:
        try:
            super().flush()
        except storage.StorageError as err:
            if not self.warned:
                print(f"warning: {err}; the events are kept for the next flush", file=sys.stderr, flush=True)
            self.warned = True

    def close(self, flush: bool = True) -> None:
        super().close(flush and not self.abandoned)


class _EventFilesInBuckets:
    """tensorboardX's writer factory for ``gs://`` and ``s3://`` event files, through :mod:`ngram_jax.storage`
    (its own writers for them need other clients, google-cloud-storage and boto3)."""

    def __init__(self):
        self.opened: list[_EventFile] = []

    def open(self, path: str) -> _EventFile:
        self.opened.append(_EventFile(path))
        return self.opened[-1]

    def directory_check(self, path: str) -> None:  # a bucket has no directories to create
        pass


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard.

    ``run_dir`` may be a ``gs://`` or ``s3://`` URL: ``metrics.jsonl`` is then rewritten at most every
    ``flush_s`` seconds and at every :meth:`flush` (the training loop flushes with each checkpoint, so that
    a resumed run finds every step up to the checkpoint it resumes from)."""

    def __init__(self, run_dir, enabled: bool = True, flush_s: float = 30.0):
        self.enabled = enabled
        if not enabled:
            return
        run_dir = storage.location(run_dir, "train.run_dir")
        self._jsonl = storage.AppendedFile(run_dir / "metrics.jsonl", every_s=flush_s, what="train.run_dir")
        from tensorboardX import SummaryWriter, record_writer

        self._events = _EventFilesInBuckets()
        if storage.is_remote(run_dir):  # tensorboardX picks the factory by the URL's scheme
            for scheme in storage.SCHEMES:
                record_writer.register_writer_factory(scheme, self._events)
        self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        for k, v in record.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self, flush: bool = True) -> None:
        """Flush and close; ``flush=False`` after a storage failure (writing again would only wait for the
        clients' retries to run out)."""
        if self.enabled:
            for f in self._events.opened:
                f.abandoned = not flush
            self._jsonl.close(flush)
            self._tb.close()
