"""The backend a program is built for: the process's default backend, or the target of an ahead-of-time
compile (``ngram_jax.tools.aot`` compiles for TPU from a CPU process).

Choices that depend on the hardware (``model.ngram.kernel: auto``, ``model.moe.grouped_matmul: auto``) ask
:func:`target_backend`, never ``jax.default_backend()`` directly, so that a step compiled for a TPU topology
holds the TPU kernels whatever machine compiles it:

    with compile_target("tpu"):
        model = build_model(cfg, rngs)      # kernel auto -> pallas_tpu
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("ngram_jax_target_backend", default=None)


def target_backend() -> str:
    """``"tpu"``, ``"gpu"`` or ``"cpu"``: the compile target set by :func:`compile_target`, else the
    process's default backend."""
    return _TARGET.get() or jax.default_backend()


@contextlib.contextmanager
def compile_target(backend: str) -> Iterator[None]:
    """Build and trace for ``backend`` (e.g. ``"tpu"`` while compiling ahead of time on a CPU machine)."""
    if backend not in ("tpu", "gpu", "cpu"):
        raise ValueError(f"unknown compile target {backend!r}; use tpu, gpu or cpu")
    token = _TARGET.set(backend)
    try:
        yield
    finally:
        _TARGET.reset(token)
