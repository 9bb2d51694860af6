"""Logical axis names and the context in which modules are built.

Every parameter carries logical axis names (``out_sharding=``); :data:`DEFAULT_RULES` maps them
to mesh axes. Build modules inside :func:`param_context`: with a mesh the parameters are created
sharded, without one (a laptop, a unit test) they are plain arrays that keep their logical names.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh

# logical axis -> mesh axes (None: replicated). The NE row axis is the one that must be split.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("vocab", ("tensor", "fsdp")),
    ("embed", None),
    ("ngram_rows", ("data", "fsdp", "expert", "tensor")),
    ("ngram_dim", None),
    ("ngram_tables", None),
    ("ple_embed", None),
    ("mlp", "tensor"),
    ("layers", None),
)


@contextlib.contextmanager
def param_context(mesh: Mesh | None = None,
                  rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES) -> Iterator[None]:
    """Context for building modules: shards parameters on ``mesh`` by ``rules``, or builds them
    unsharded when ``mesh`` is None (logical names stay in the metadata for a later mesh)."""
    if mesh is None:
        with nnx.use_eager_sharding(False):
            yield
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(rules, mesh)), nnx.use_eager_sharding(True):
        yield


def rules_for_mesh(rules: Sequence[tuple[str, str | tuple[str, ...] | None]],
                   mesh: Mesh) -> list[tuple[str, str | tuple[str, ...] | None]]:
    """Drop the mesh axes a mesh does not have (e.g. ``expert`` on a data-only mesh)."""
    out = []
    for logical, axes in rules:
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if a in mesh.axis_names)
        out.append((logical, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return out
