"""Fused hashed gather of N-gram table rows: tokens -> n-gram ids -> rows (docs/KERNELS.md)."""

from ngram_jax.kernels.ngram_gather.api import available_implementations, ngram_gather

__all__ = ["ngram_gather", "available_implementations"]
