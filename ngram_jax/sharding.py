"""Meshes, logical axis rules, sharded initialisation and the sharded N-gram table lookup.

Every parameter carries logical axis names (``out_sharding=``); ``config.mesh.rules`` maps them to
the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``. Build and run models inside
:func:`param_context`: with a mesh the parameters are created sharded and the N-gram lookup runs as
a ``shard_map`` masked local gather; without one (a laptop, a unit test) everything is plain arrays.

The lookup never moves a table (:func:`row_sharded_lookup`): each device runs the gather over the
rows it owns for the tokens its row group sees (ids outside its shard give zeros), and the partial
rows are combined by ``psum_scatter`` (over the axes that also split the batch) and ``psum`` (over the
others). The row-wise optimizers update tables where they live (:func:`row_sharded_update`).
Communication per step is O(tokens x T x d_e), whatever the table size.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

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
        try:
            sizes[name.strip()] = int(value)
        except ValueError:
            raise ConfigError(f"mesh spec {spec!r}: axis {name.strip()!r} needs an integer size, got {value!r} "
                              "(e.g. data=2,expert=4)") from None
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


def live_axes(mesh: Mesh, logical: str) -> tuple[str, ...]:
    """The axes of ``mesh`` of size > 1 that the active rules give a logical axis (what splits it there)."""
    return tuple(a for a in mesh_axes(logical) if a in mesh.axis_names and mesh.shape[a] > 1)


def current_mesh() -> Mesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def logical_axes(names: Sequence[str | None]) -> dict:
    """Metadata of a new variable: its logical axis names (``out_sharding``), and creation in its shards
    only when a mesh is set. Without one the variable is a plain array (its logical names stay for a later
    mesh), so that modules build and run on one device with no mesh or :func:`param_context`."""
    return {"out_sharding": tuple(names), "eager_sharding": None if current_mesh() is not None else False}


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
# Row-sharded tables: the lookup and the row-wise update run where the rows live


class RowSharding(NamedTuple):
    mesh: Mesh
    row_axes: tuple[str, ...]  # mesh axes that split the table's rows
    batch_axes: tuple[str, ...]  # mesh axes that split the batch (dim 0 of ids and activations)

    @property
    def shared(self) -> tuple[str, ...]:
        """Batch axes that also split the rows, in the batch's (major-to-minor) order."""
        return tuple(a for a in self.batch_axes if a in self.row_axes)

    @property
    def row_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.row_axes)


def row_sharding(logical: str = "ngram_rows") -> RowSharding | None:
    """How the active mesh and rules split a table whose dim 0 has logical name ``logical`` (None: it is
    not split, e.g. outside a mesh context)."""
    mesh = current_mesh()
    if mesh is None:
        return None
    row_axes = tuple(a for a in mesh_axes(logical) if a in mesh.axis_names)
    if not row_axes:
        return None
    return RowSharding(mesh, row_axes, tuple(a for a in mesh_axes("batch") if a in mesh.axis_names))


def _check_split(rs: RowSharding, rows: int, batch: int, logical: str) -> None:
    if rows % rs.row_shards:
        key = ("model.ngram.row_multiple (or model.ple.row_multiple)" if logical == "ngram_rows"
               else "model.vocab_size")
        raise ConfigError(f"table of {rows} rows cannot be split over {rs.row_shards} devices of mesh axes "
                          f"{rs.row_axes}; set {key} to a multiple of {rs.row_shards}")
    n_batch = math.prod(rs.mesh.shape[a] for a in rs.batch_axes)
    if batch % n_batch:
        raise ConfigError(f"batch of {batch} rows cannot be split over the {n_batch} devices of mesh axes "
                          f"{rs.batch_axes}; use a batch size divisible by {n_batch}")


def batch_axes_for(mesh: Mesh, axes: tuple[str, ...], batch: int) -> tuple[str, ...]:
    """The batch axes that split a batch of ``batch`` rows: all of them, or none for a batch smaller than
    their shard count (decoding a few sequences: every device holds them all). A larger batch they do not
    divide keeps them, and ``_check_split`` names the fix."""
    return () if batch < math.prod(mesh.shape[a] for a in axes) else axes


def _spec(axes: tuple[str, ...], ndim: int) -> P:
    return P(axes if axes else None, *([None] * (ndim - 1)))


# Partial rows one chunk of a lookup over shared axes forms per device (float32 bytes): bounds its memory.
LOOKUP_CHUNK_BYTES = 256 << 20


def _chunk_positions(positions: int, bytes_per_position: int) -> int:
    """The largest divisor of ``positions`` whose chunk of partial rows fits :data:`LOOKUP_CHUNK_BYTES` (>= 1)."""
    most = max(1, LOOKUP_CHUNK_BYTES // max(bytes_per_position, 1))
    return max(d for d in range(1, min(positions, most) + 1) if positions % d == 0)


def row_sharded_lookup(fn: Callable, table: jax.Array, *batch_args: jax.Array, logical: str = "ngram_rows",
                       out_ndim: int, kernel: bool = False, positionwise: bool = True) -> jax.Array:
    """Sum over the row shards of ``fn(local_table, row_start, *batch_args)``, which must give zeros for
    ids outside ``[row_start, row_start + local_rows)``. Without a mesh: ``fn(table, 0, *batch_args)``.

    Row axes that do not split the batch: each device runs ``fn`` over its own batch shard and the rows it
    owns, and the partial results are summed (``psum``). Row axes that also split the batch (``shared``, the
    default rules' case): a device must serve the rows it owns to the whole batch of its row group, so the
    (small) batch arguments are all-gathered over the shared axes, ``fn`` runs over them, and
    ``psum_scatter`` returns each device its own positions. That is done in chunks of positions
    (:data:`LOOKUP_CHUNK_BYTES` of partial rows per device at a time, ``lax.map``), so memory stays
    O(chunk), never O(global batch x width); it needs a ``positionwise`` ``fn`` (any leading shape, e.g.
    a gather by row id; a function of whole sequences, like the kernel that hashes tokens, must not see
    shared axes). A table never moves; the output ``[B, ...]`` is sharded like the batch.

    ``kernel=True``: ``fn`` calls a Pallas kernel, which the compiler cannot partition itself ("Mosaic kernels
    cannot be automatically partitioned"): it runs inside ``shard_map`` on every mesh, over the local batch
    with the whole table when the rules replicate the table's rows (and without the VMA check, which
    ``pallas_call`` does not support).
    """
    rs = row_sharding(logical)
    if rs is None:
        mesh = current_mesh()
        if not kernel or mesh is None:
            return fn(table, jnp.int32(0), *batch_args)
        batch_axes = batch_axes_for(mesh, live_axes(mesh, "batch"), batch_args[0].shape[0])
        _check_split(RowSharding(mesh, (), batch_axes), table.shape[0], batch_args[0].shape[0], logical)
        in_specs = (P(), *(_spec(batch_axes, a.ndim) for a in batch_args))
        return jax.shard_map(lambda tab, *args: fn(tab, jnp.int32(0), *args), mesh=mesh, in_specs=in_specs,
                             out_specs=_spec(batch_axes, out_ndim), check_vma=False)(table, *batch_args)
    rs = rs._replace(batch_axes=batch_axes_for(rs.mesh, rs.batch_axes, batch_args[0].shape[0]))
    _check_split(rs, table.shape[0], batch_args[0].shape[0], logical)
    shared, local_rows = rs.shared, table.shape[0] // rs.row_shards
    only_rows = tuple(a for a in rs.row_axes if a not in shared)
    if shared and not positionwise:
        raise ValueError(f"row_sharded_lookup: mesh axes {shared} split both the rows and the batch, which needs "
                         "a positionwise fn (a gather by row id)")
    n_shared = math.prod(rs.mesh.shape[a] for a in shared)

    def local(tab, *args):
        start = jax.lax.axis_index(rs.row_axes) * local_rows
        if not shared:
            vals = fn(tab, start, *args)
            return jax.lax.psum(vals, only_rows) if only_rows else vals
        lead = args[0].shape[: min(2, args[0].ndim)]  # [B, S] positions (or [B])
        p = math.prod(lead)
        flat = [a.reshape(p, *a.shape[len(lead):]) for a in args]
        out = jax.eval_shape(lambda *x: fn(tab, start, *x), *(f[:1] for f in flat))
        tail = out.shape[1:]
        c = _chunk_positions(p, n_shared * math.prod(tail) * 4)

        def chunk(xs):  # [c, ...] of this device's positions -> their rows, [c, *tail]
            gathered = [jax.lax.all_gather(x, shared, axis=0, tiled=True) for x in xs]  # [n_shared * c, ...]
            vals = jax.lax.psum_scatter(fn(tab, start, *gathered), shared, scatter_dimension=0, tiled=True)
            return jax.lax.psum(vals, only_rows) if only_rows else vals

        vals = jax.lax.map(chunk, [f.reshape(p // c, c, *f.shape[1:]) for f in flat])  # [p / c, c, *tail]
        return vals.reshape(*lead, *tail)

    in_specs = (_spec(rs.row_axes, table.ndim), *(_spec(rs.batch_axes, a.ndim) for a in batch_args))
    return jax.shard_map(local, mesh=rs.mesh, in_specs=in_specs, out_specs=_spec(rs.batch_axes, out_ndim),
                         check_vma=not kernel)(table, *batch_args)


def row_sharded_update(fn: Callable, row_arrays: Sequence[jax.Array], batch_args: Sequence[jax.Array],
                       scalars: Sequence[jax.Array] = (), *, logical: str = "ngram_rows"):
    """``(new_row_arrays, partial_sums) = fn(local_row_arrays, row_start, batch_args, scalars)`` on every
    row shard, with the batch arguments of the whole batch (all-gathered over the batch axes, so that every
    replica of a row sees every update of it). ``partial_sums`` (a tuple of scalars) are summed over the row
    shards. Row arrays keep their sharding; their local shards can be updated in place."""
    rs = row_sharding(logical)
    if rs is None:
        new, sums = fn(tuple(row_arrays), jnp.int32(0), tuple(batch_args), tuple(scalars))
        return new, sums
    _check_split(rs, row_arrays[0].shape[0], batch_args[0].shape[0], logical)
    local_rows = row_arrays[0].shape[0] // rs.row_shards

    def local(rows, args, scal):
        if rs.batch_axes:
            args = tuple(jax.lax.all_gather(a, rs.batch_axes, axis=0, tiled=True) for a in args)
        new, sums = fn(rows, jax.lax.axis_index(rs.row_axes) * local_rows, args, scal)
        return new, tuple(jax.lax.psum(x, rs.row_axes) for x in sums)

    row_specs = tuple(_spec(rs.row_axes, a.ndim) for a in row_arrays)
    arg_specs = tuple(_spec(rs.batch_axes, a.ndim) for a in batch_args)
    n_sums = len(jax.eval_shape(lambda: fn(tuple(row_arrays), jnp.int32(0), tuple(batch_args),
                                           tuple(scalars)))[1])
    return jax.shard_map(local, mesh=rs.mesh, in_specs=(row_specs, arg_specs, tuple(P() for _ in scalars)),
                         out_specs=(row_specs, tuple(P() for _ in range(n_sums))),
                         check_vma=False)(tuple(row_arrays), tuple(batch_args), tuple(scalars))


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
