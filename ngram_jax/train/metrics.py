"""Training metrics: FLOP estimate and MFU, and a writer for JSONL and TensorBoard event files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax

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


class MetricsWriter:
    """Appends one JSON object per record to ``metrics.jsonl`` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, record: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self._jsonl.flush()
        for k, v in record.items():
            if isinstance(v, int | float) and math.isfinite(v):
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()
