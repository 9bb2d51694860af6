"""Rotary position embedding, LongCat/DeepSeek interleaved layout, with optional YaRN scaling.

Pairs ``(x_{2i}, x_{2i+1})`` are rotated by ``pos * inv_freq[i]``; the result is written as
``[rotated evens, rotated odds]`` (the de-interleaved order transformers uses). Queries and keys get
the same layout, so attention scores equal those of the interleaved formulation.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def inv_frequencies(dim: int, theta: float, yarn_factor: float = 1.0, original_max_position: int = 4096,
                    beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
    """Per-pair inverse frequencies [dim // 2]; YaRN interpolation when ``yarn_factor > 1``."""
    base = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if yarn_factor <= 1.0:
        out = base.astype(np.float32)
        out.flags.writeable = False  # cached: shared by every caller
        return out

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / max(high - low, 1e-3), 0, 1)
    extrapolate = 1 - ramp  # high frequencies keep their value, low ones are interpolated
    out = (base / yarn_factor * (1 - extrapolate) + base * extrapolate).astype(np.float32)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(factor: float, mscale: float, mscale_all_dim: float) -> float:
    """Scale of YaRN's cos/sin: mscale(f, mscale) / mscale(f, mscale_all_dim) when both are set."""
    if factor <= 1:
        return 1.0
    if mscale and mscale_all_dim:
        return yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    return yarn_mscale(factor)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, scale: float = 1.0) -> jax.Array:
    """x [B, S, H, R], positions int [B, S] -> [B, S, H, R] (float32 angles, cos/sin times scale)."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, S, R/2]
    cos = (jnp.cos(angles) * scale)[:, :, None, :].astype(x.dtype)
    sin = (jnp.sin(angles) * scale)[:, :, None, :].astype(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
