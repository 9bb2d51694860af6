"""Meshes, logical axis rules, sharded initialisation and the sharded N-gram table lookup.

Every parameter carries logical axis names (``out_sharding=``); ``config.mesh.rules`` maps them to
the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``. Build and run models inside
:func:`param_context`: with a mesh the parameters are created sharded and the N-gram lookup runs as
a ``shard_map`` masked local gather; without one (a laptop, a unit test) everything is plain arrays.

The lookup never moves a table: each device gathers the rows it owns for the ids its row group sees
(ids outside its shard give zeros), and the partial rows are combined by ``psum_scatter`` (over the
axes that also split the batch) and ``psum`` (over the others). Communication per step is
O(tokens x T x d_e), whatever the table size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ngram_jax.config import DEFAULT_RULES, MESH_AXES, AxisSizes, ConfigError, MeshConfig

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


# ----------------------------------------------------------------------------------------------
# Meshes


def initialize_distributed() -> bool:
    """``jax.distributed.initialize()`` when the environment describes several processes.

    Recognised: ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` (explicit,
    e.g. several local processes), or a multi-host TPU/SLURM/Open MPI environment that JAX detects
    itself (``NGRAM_JAX_DISTRIBUTED=1`` forces the call). Returns whether it initialised.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (only CPU reads it)
        jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(env["JAX_NUM_PROCESSES"]),
                                   process_id=int(env["JAX_PROCESS_ID"]))
        return True
    if env.get("NGRAM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
        return True
    return False


def _resolve_sizes(sizes: AxisSizes, total: int, what: str) -> tuple[int, ...]:
    values = [getattr(sizes, a) for a in MESH_AXES]
    known = math.prod(v for v in values if v != -1)
    if -1 in values:
        if total % known:
            raise ConfigError(f"mesh.{what}: {total} devices are not divisible by the fixed axes {known}")
        values[values.index(-1)] = total // known
    if math.prod(values) != total:
        raise ConfigError(f"mesh.{what}: axis sizes {dict(zip(MESH_AXES, values, strict=True))} multiply to "
                          f"{math.prod(values)}, but there are {total} devices; set one axis to -1 to fill")
    return tuple(values)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor, expert)`` (all Auto), hybrid ICI x DCN when multi-slice."""
    devices = list(devices if devices is not None else jax.devices())
    n_slices = len({getattr(d, "slice_index", 0) for d in devices})  # TPU multi-slice; 1 elsewhere
    dcn = _resolve_sizes(cfg.dcn, n_slices, "dcn")
    ici = _resolve_sizes(cfg.ici, len(devices) // n_slices, "ici")
    from jax.experimental import mesh_utils

    if n_slices > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):  # e.g. an unusual subset of devices
            grid = np.array(devices).reshape(ici)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=2,expert=4"`` -> axis sizes for every mesh axis (unnamed axes get size 1)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in filter(None, spec.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes:
            raise ConfigError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        sizes[name.strip()] = int(value)
    return sizes


def make_mesh_from_spec(spec: str, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """``"data=2,expert=4"`` -> a mesh (unnamed axes get size 1)."""
    return make_mesh(MeshConfig(ici=AxisSizes(**parse_mesh_spec(spec))), devices)


# ----------------------------------------------------------------------------------------------
# Rules


def rules_for_mesh(rules: Rules, mesh: Mesh) -> list[tuple[str, str | tuple[str, ...] | None]]:
    """Drop the mesh axes a mesh does not have or that have size 1; one axis -> a string, none -> None."""
    out = []
    for logical, axes in rules:
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
        out.append((logical, kept if len(kept) > 1 else (kept[0] if kept else None)))
    return out


def mesh_axes(logical: str) -> tuple[str, ...]:
    """Mesh axes the active rules give a logical axis (empty outside a mesh context)."""
    for name, axes in flax_spmd.get_logical_axis_rules():
        if name == logical:
            return (axes,) if isinstance(axes, str) else tuple(axes or ())
    return ()


def current_mesh() -> Mesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


@contextlib.contextmanager
def param_context(mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Build or run modules: sharded on ``mesh`` by ``rules``, or plain when ``mesh`` is None (logical
    names stay in the metadata for a later mesh)."""
    if mesh is None:
        with nnx.use_eager_sharding(False):
            yield
        return
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules_for_mesh(rules, mesh)), nnx.use_eager_sharding(True):
        yield


def logical_to_sharding(tree, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for an ``nnx.State`` (or abstract state) from its logical metadata."""
    with nnx.logical_axis_rules(rules_for_mesh(rules, mesh)):
        return nnx.get_named_sharding(tree, mesh)


def create_sharded(build: Callable[[], nnx.Module], mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Build a module with every parameter created directly in its shards (inside ``jit``): no device
    ever holds a full N-gram table. A dimension the mesh cannot split fails first, with the fix."""
    with param_context(mesh, rules):
        check_divisible(nnx.eval_shape(build), mesh, rules)
        return nnx.jit(build)()


def check_divisible(module: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
    """Raise a clear error for a parameter dimension the mesh cannot split evenly."""
    resolved = dict(rules_for_mesh(rules, mesh))
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if var.get_metadata().get("out_sharding") is None:
            continue
        names = var.get_metadata().get("out_sharding") or ()
        for dim, logical in enumerate(names):
            axes = resolved.get(logical)
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            shards = math.prod(mesh.shape[a] for a in axes)
            if shards > 1 and var.shape[dim] % shards:
                hint = (" set model.ngram.row_multiple (or model.ple.row_multiple) to a multiple of "
                        f"{shards}" if logical == "ngram_rows" else " change the mesh or the rule for "
                        f"{logical!r} in mesh.rules")
                raise ConfigError(f"parameter {'/'.join(map(str, path))} dim {dim} ({logical}) has size "
                                  f"{var.shape[dim]}, not divisible by the {shards} shards of mesh axes {axes}:"
                                  + hint)


# ----------------------------------------------------------------------------------------------
# The sharded lookup


def sharded_row_gather(table: jax.Array, rows: jax.Array, *, mesh, row_axes: tuple[str, ...],
                       batch_axes: tuple[str, ...]) -> jax.Array:
    """``table[rows]`` with the table row-sharded over ``row_axes`` and ``rows`` batch-sharded over
    ``batch_axes`` (dim 0). table [R, W], rows int [B, ...] -> [B, ..., W] sharded like ``rows``.

    Each device all-gathers the (small) ids of its row group, gathers the rows it owns (zeros for
    the rest), and the partial results are summed back: ``psum_scatter`` over the axes shared with
    the batch, ``psum`` over the other row axes. The backward pass scatters gradients into the
    owning shard only.
    """
    n_shards = math.prod(mesh.shape[a] for a in row_axes)
    if table.shape[0] % n_shards:
        raise ConfigError(f"table of {table.shape[0]} rows cannot be split over {n_shards} devices of mesh "
                          f"axes {row_axes}; set model.ngram.row_multiple to a multiple of {n_shards}")
    shared = tuple(a for a in batch_axes if a in row_axes)  # in the batch's (major-to-minor) order
    only_rows = tuple(a for a in row_axes if a not in shared)
    local_rows = table.shape[0] // n_shards
    extra = (None,) * (rows.ndim - 1)

    def local(tab, ids):  # tab [R/n, W], ids [b, ...]
        if shared:
            ids = jax.lax.all_gather(ids, shared, axis=0, tiled=True)
        first = jax.lax.axis_index(row_axes) * local_rows
        off = ids - first
        mine = (off >= 0) & (off < local_rows)
        vals = tab.at[jnp.where(mine, off, 0)].get(mode="promise_in_bounds")
        vals = jnp.where(mine[..., None], vals, jnp.zeros((), vals.dtype))
        if shared:
            vals = jax.lax.psum_scatter(vals, shared, scatter_dimension=0, tiled=True)
        if only_rows:
            vals = jax.lax.psum(vals, only_rows)
        return vals

    batch_spec = batch_axes if batch_axes else None
    return jax.shard_map(local, mesh=mesh, in_specs=(P(row_axes, None), P(batch_spec, *extra)),
                         out_specs=P(batch_spec, *extra, None))(table, rows)


def lookup_rows(table: jax.Array, rows: jax.Array, logical: str = "ngram_rows") -> jax.Array:
    """``table[rows]`` for a parameter whose dim 0 has logical name ``logical``: the sharded lookup
    inside a mesh context whose rules split that axis, a plain gather otherwise."""
    mesh = current_mesh()
    row_axes = tuple(a for a in mesh_axes(logical) if mesh is not None and a in mesh.axis_names)
    if mesh is None or not row_axes:
        return table.at[rows].get(mode="promise_in_bounds")
    batch_axes = tuple(a for a in mesh_axes("batch") if a in mesh.axis_names)
    n_batch = math.prod(mesh.shape[a] for a in batch_axes)
    if rows.shape[0] % n_batch:
        raise ConfigError(f"batch of {rows.shape[0]} rows cannot be split over the {n_batch} devices of mesh "
                          f"axes {batch_axes}; use a batch size divisible by {n_batch}")
    return sharded_row_gather(table, rows, mesh=mesh, row_axes=row_axes, batch_axes=batch_axes)


def per_device_bytes(array: jax.Array) -> int:
    """Bytes of the largest shard of ``array`` held by one device."""
    return max(s.data.nbytes for s in array.addressable_shards)


def replicated_params(module: nnx.Module, min_size: int) -> list[str]:
    """Paths of parameters with at least ``min_size`` elements that are fully replicated."""
    out = []
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        value = var[...]
        if value.size >= min_size and isinstance(value.sharding, NamedSharding) and \
                all(p is None for p in value.sharding.spec):
            out.append("/".join(map(str, path)))
    return out
