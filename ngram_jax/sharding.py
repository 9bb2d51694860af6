"""Meshes, logical axis rules and sharded initialisation.

Every parameter carries logical axis names (``out_sharding=``); ``config.mesh.rules`` maps them to
the mesh axes ``data``, ``fsdp``, ``tensor``, ``expert``. Build and run models inside
:func:`param_context`: with a mesh the parameters are created sharded (and the N-gram lookup runs where
the table's rows live, :mod:`ngram_jax.ngram.row_sharded`); without one (a laptop, a unit test)
everything is plain arrays.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import AxisType, Mesh, NamedSharding

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
# Batch and device helpers


def batch_axes_for(mesh: Mesh, axes: tuple[str, ...], batch: int) -> tuple[str, ...]:
    """The batch axes that split a batch of ``batch`` rows: all of them, or none for a batch smaller than
    their shard count (decoding a few sequences: every device holds them all). A larger batch they do not
    divide keeps them, and the lookup names the fix (:mod:`ngram_jax.ngram.row_sharded`)."""
    return () if batch < math.prod(mesh.shape[a] for a in axes) else axes


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
