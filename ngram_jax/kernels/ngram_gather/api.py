"""``ngram_gather``: one entry point over the implementations, chosen by name or by backend.

Order of preference per backend: TPU -> ``pallas_tpu`` then ``xla``; anything else -> ``xla`` (on GPU the
XLA gather is the default; no Mosaic GPU kernel has been shown to beat it). The choice, and any
fallback, is logged once. Naming an implementation that cannot run here fails at once with the reason.
"""

from __future__ import annotations

import functools
import logging

from ngram_jax.backend import target_backend
from ngram_jax.kernels.ngram_gather.pallas_tpu import gather_by_id_pallas_tpu, ngram_gather_pallas_tpu
from ngram_jax.kernels.ngram_gather.reference import masked_rows, ngram_gather_reference
from ngram_jax.kernels.ngram_gather.xla import gather_rows, ngram_gather_xla

log = logging.getLogger(__name__)

IMPLEMENTATIONS = {"reference": ngram_gather_reference, "xla": ngram_gather_xla, "pallas_tpu": ngram_gather_pallas_tpu}
# the same rows by flattened row id, hashed elsewhere: (table, ids [..., T], row_start) -> [..., T, d_e]
BY_ID = {"reference": masked_rows, "xla": gather_rows, "pallas_tpu": gather_by_id_pallas_tpu}
PREFERENCE = {"tpu": ("pallas_tpu", "xla"), "gpu": ("xla",), "cpu": ("xla",)}


def unavailable_reason(name: str, backend: str, interpret: bool) -> str | None:
    if name not in IMPLEMENTATIONS:
        return f"unknown implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}"
    if name == "pallas_tpu" and backend != "tpu" and not interpret:
        return (f"pallas_tpu compiles only for TPU (this backend is {backend}); pass interpret=True to run it in "
                "the TPU simulator, or use implementation='xla'")
    return None


def available_implementations(backend: str | None = None, interpret: bool = False) -> list[str]:
    backend = backend or target_backend()
    return [n for n in IMPLEMENTATIONS if unavailable_reason(n, backend, interpret) is None]


@functools.cache
def _log_choice(backend: str, chosen: str, skipped: tuple[str, ...]) -> None:
    if skipped:
        log.info("ngram_gather on %s: %s (skipped %s)", backend, chosen, ", ".join(skipped))
    else:
        log.info("ngram_gather on %s: %s", backend, chosen)


def ngram_gather(tokens, table, *, layout, eos_id, segment_ids=None, row_start=0, proj=None,
                 implementation: str | None = None, interpret=False):
    """Rows of the flattened N-gram table (or shard) each token reads: [B, S, T, d_e], or with ``proj``
    [T, d_e, D] the projected mean contribution ``sum_idx rows @ W_idx / (1 + T)`` [B, S, D].

    ``interpret``: run the Pallas TPU kernel in the simulator (``True`` or ``pltpu.InterpretParams()``).
    """
    backend = target_backend()
    if implementation is not None:
        reason = unavailable_reason(implementation, backend, bool(interpret))
        if reason:
            raise ValueError(f"ngram_gather: {reason}")
        chosen = implementation
    else:
        prefs = PREFERENCE.get(backend, ("xla",))
        ok = [n for n in prefs if unavailable_reason(n, backend, bool(interpret)) is None]
        chosen = ok[0]
        _log_choice(backend, chosen, tuple(n for n in prefs if n not in ok))
    kwargs = dict(layout=layout, eos_id=eos_id, segment_ids=segment_ids, row_start=row_start, proj=proj)
    if chosen == "pallas_tpu":
        kwargs["interpret"] = interpret
    return IMPLEMENTATIONS[chosen](tokens, table, **kwargs)
