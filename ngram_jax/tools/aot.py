"""Compile a step for a real TPU topology ahead of time, on this machine (no TPU needed): libtpu's own compiler.

    python -m ngram_jax.tools.aot configs/models/longcat_flash_lite.yaml --topology v5p:8x8x4
    python -m ngram_jax.tools.aot configs/train_tiny.yaml --topology v5e:2x2 --mesh fsdp=4 --json
    python -m ngram_jax.tools.aot CONFIG [key=value ...] --topology GEN:AxB[xC] [--slices N] [--mesh data=..,fsdp=..]
        [--batch B] [--seq S] [--step train|prefill|decode|verify] [--draft-tokens K] [--json]

The abstract state of the config (nothing allocated) is laid out on the topology's chips by the config's
mesh (``mesh.ici``/``mesh.dcn``, or ``--mesh`` over one slice's chips; several slices make the hybrid
ICI x DCN mesh of :func:`ngram_jax.sharding.make_mesh`), and the real step is compiled for them:
``train`` (``ngram_jax.train.loop.train_step``, state donated), ``prefill`` (a batch of prompts of ``--seq``
tokens into a KV cache of that length), ``decode`` (one token per sequence against a full cache, donated as
``decoding.generate`` donates it) or ``verify`` (the speculative verification pass over ``--draft-tokens`` + 1
positions, the cache donated). Hardware-dependent
``auto`` choices resolve for TPU (``model.ngram.kernel`` -> ``pallas_tpu``, ``model.moe.grouped_matmul`` ->
``megablox``): the target decides, not this process's backend.

Per chip it reports the compiler's memory (arguments, outputs, aliased, temporaries, peak) against the
chip's HBM, its FLOPs and bytes accessed, a roofline step time (the larger of FLOPs / peak and bytes / HBM
bandwidth, :data:`CHIPS`), tokens/s and the MFU bound it allows, the collectives of the compiled module
(count and bytes per kind), the Mosaic (Pallas) calls, and for ``train`` the memory planner's prediction
(``ngram_jax.tools.plan``). Exit status 0 when the step fits in HBM, 1 when it does not (with the shortfall
and the knobs that help), 2 for a usage error (an unknown topology, a mesh that is not the chip count, a
batch the batch axes do not divide, libtpu missing), each one ``error:`` line before any compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ngram_jax.config import AxisSizes, Config, ConfigError, MeshConfig, load_config, replace
from ngram_jax.errors import UsageError, UserError
from ngram_jax.kernels.ngram_gather.pallas_tpu import KERNEL_NAME

STEPS = ("train", "prefill", "decode", "verify")


@dataclass(frozen=True)
class Chip:
    """One TPU generation, per chip: dense bfloat16 peak FLOP/s, HBM bandwidth (bytes/s) and the HBM the
    compiler can use (bytes)."""

    generation: str
    device_kind: str  # jax's device_kind of its chips
    peak_flops: float
    hbm_bandwidth: float
    hbm_bytes: int
    dims: int  # topology dimensions (2: AxB, 3: AxBxC)


# Peak bf16 FLOP/s and HBM bandwidth per chip: Google Cloud TPU documentation (cloud.google.com/tpu/docs/v5e,
# /v5p, /v6e; "System architecture"), read 2026-12-03. Usable HBM: what libtpu 0.0.42.1 reports as
# "available HBM" in its out-of-memory message (15.75G, 95.74G and 31.25G; GiB), checked on this machine.
CHIPS: dict[str, Chip] = {
    "v5e": Chip("v5e", "TPU v5 lite", 197e12, 819e9, int(15.75 * 2**30), 2),
    "v5p": Chip("v5p", "TPU v5", 459e12, 2765e9, int(95.74 * 2**30), 3),
    "v6e": Chip("v6e", "TPU v6 lite", 918e12, 1640e9, int(31.25 * 2**30), 2),
}

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclass
class AotReport:
    """What :func:`compile_for_tpu` found; every byte figure is per chip."""

    config: str
    topology: str
    slices: int
    device_kind: str
    num_chips: int
    mesh: dict[str, int]
    step: str
    batch: int
    seq: int
    fits: bool
    hbm_bytes: int
    peak_bytes: int
    memory: dict[str, int]  # arguments, outputs, aliased, temporaries, peak (bytes per chip)
    flops: float | None = None  # per chip per step, the compiler's count
    bytes_accessed: float | None = None
    roofline_s: float | None = None
    tokens_per_s_per_chip: float | None = None
    mfu_bound: float | None = None
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> {count, bytes}
    mosaic_calls: int = 0  # every Mosaic kernel (XLA's own ragged_dot is one too)
    ngram_gather_calls: int = 0  # the fused hashed gather (kernels/ngram_gather/pallas_tpu.py)
    plan: dict[str, float] | None = None  # the planner's terms (train only)
    shortfall_bytes: int = 0
    knobs: list[str] = field(default_factory=list)
    compile_s: float = 0.0
    libtpu: str = ""
    hlo: str = ""

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("hlo")
        return out


# ----------------------------------------------------------------------------------------------
# Topologies


def parse_topology(topology: str) -> tuple[Chip, tuple[int, ...]]:
    """``"v5p:8x8x4"`` -> (the generation, chips per dimension); a :class:`UsageError` for anything else."""
    gen, _, shape = topology.partition(":")
    known = ", ".join(CHIPS)
    if gen not in CHIPS:
        raise UsageError(f"--topology {topology!r}: unknown TPU generation {gen!r}; known: {known} "
                         "(e.g. v5p:8x8x4, v5e:2x2, v6e:4x4)")
    chip = CHIPS[gen]
    try:
        dims = tuple(int(d) for d in shape.split("x"))
    except ValueError:
        dims = ()
    if len(dims) != chip.dims or min(dims, default=0) < 1:
        example = "x".join(["2"] * chip.dims)
        raise UsageError(f"--topology {topology!r}: a {gen} topology is {chip.dims} chip counts joined by x, "
                         f"e.g. {gen}:{example}")
    return chip, dims


def check_libtpu() -> str:
    """libtpu's version; a :class:`UserError` naming the extra that installs it when it is missing."""
    if importlib.util.find_spec("libtpu") is None:
        raise UserError("libtpu is not installed, and it is the TPU compiler: pip install -e '.[tpu]' (the tpu "
                        "extra, jax[tpu] at the pinned jax version); no TPU is needed to compile ahead of time")
    from importlib.metadata import version

    return version("libtpu")


def topology_devices(topology: str, slices: int = 1) -> list:
    """The chips of ``slices`` slices of ``topology`` (abstract TPU devices to compile for)."""
    chip, dims = parse_topology(topology)
    if slices < 1:
        raise UsageError(f"--slices {slices} must be >= 1")
    check_libtpu()
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")  # quiets libtpu's probe for a TPU host
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling needs no chip: no exclusive lock
    from jax.experimental import topologies

    bounds = tuple(min(2, d) for d in dims[:2]) + (1,)
    try:
        name = f"{chip.generation}:{'x'.join(map(str, dims))}"
        desc = topologies.get_topology_desc(platform="tpu", topology_name=name, chip_config_name="default",
                                            chips_per_host_bounds=bounds, num_slices=slices)
    except Exception as err:  # noqa: BLE001 - libtpu's own message names what it refuses
        raise UsageError(f"--topology {topology!r}: libtpu refuses it ({str(err).splitlines()[0]})") from None
    return list(desc.devices)


# ----------------------------------------------------------------------------------------------
# Compiled-module readers (pure functions of the HLO text)

_SHAPE = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64)\[([\d,]*)\]")
_BITS = {"pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "f8e4m3fn": 8, "f8e5m2": 8, "s16": 16, "u16": 16, "bf16": 16,
         "f16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64, "u64": 64, "f64": 64}
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")


def shape_bytes(text: str) -> list[int]:
    """Bytes of every array shape written in ``text`` (e.g. an HLO result type)."""
    out = []
    for dtype, dims in _SHAPE.findall(text):
        n = math.prod(int(d) for d in dims.split(",") if d)
        out.append(n * _BITS[dtype] // 8)
    return out


def collectives(hlo: str) -> dict[str, dict[str, float]]:
    """Collectives of a compiled module by kind: ``{kind: {"count": n, "bytes": b}}``. An asynchronous
    ``*-start`` counts once with its largest buffer (its ``*-done`` not at all); a synchronous one with its
    results. Instructions are counted as written (a loop body once)."""
    found: dict[str, dict[str, float]] = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if not m:
            continue
        sizes = shape_bytes(m.group(1))
        nbytes = (max(sizes) if m.group(3) else sum(sizes)) if sizes else 0
        entry = found.setdefault(m.group(2), {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += nbytes
    return found


def mosaic_calls(hlo: str) -> int:
    """Pallas (Mosaic) kernels in a compiled TPU module: its ``tpu_custom_call`` instructions."""
    return sum(1 for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line and " = " in line)


def kernel_calls(hlo: str, name: str) -> int:
    """Calls of Pallas kernels whose name holds ``name`` (``pallas_call(name=...)``; a transformation may prefix
    it, e.g. ``jvp_ngram_gather_``) in a compiled TPU module: ``ngram_gather`` counts the hashing kernel and
    ``ngram_gather_by_id``."""
    return sum(1 for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line
               and re.match(rf"^\s*(?:ROOT )?%[\w.]*{re.escape(name)}[\w.]* = ", line))


def gathered_shapes(hlo: str, kind: str = "all-gather") -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, shape)`` of every result of ``kind`` collectives (e.g. to find an all-gathered table)."""
    out = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.match(line)
        if m and m.group(2) == kind:
            out += [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _SHAPE.findall(m.group(1))]
    return out


_OOM = (re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
        re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"))
_UNIT = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_oom(message: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from libtpu's out-of-memory message, or None."""
    for pattern in _OOM:
        m = pattern.search(message)
        if m:
            return int(float(m.group(1)) * _UNIT[m.group(2)]), int(float(m.group(3)) * _UNIT[m.group(4)])
    return None


def knobs(cfg: Config, step: str, mesh: dict[str, int]) -> list[str]:
    """What lowers a step's memory per chip, for this config."""
    m, t = cfg.model, cfg.train
    out = []
    if step == "train":
        if m.remat in ("none", "dots", "names"):
            out.append("model.remat=block (recompute each block in the backward pass)")
        if t.table_optimizer == "dense" and (m.ngram.enabled or m.ple.kind == "plne"):
            out.append("train.table_optimizer=rowwise_adagrad (one float32 per table row instead of AdamW's "
                       "two moments and a dense table gradient)")
        out.append(f"train.loss_chunks={min(t.loss_chunks * 2, cfg.data.seq_len)} (smaller logit pieces)")
    out.append("--batch (fewer sequences per chip)")
    out.append("more chips (a larger --topology or --slices; split the parameters over fsdp/expert in --mesh)")
    if m.param_dtype == "float32" and step != "train":
        out.append("model.param_dtype=bfloat16 (inference weights in bfloat16)")
    return out


# ----------------------------------------------------------------------------------------------
# Steps


def _mesh_config(cfg: Config, mesh_spec: str | None, chips_per_slice: int, slices: int) -> Config:
    """The config's mesh, or ``--mesh`` over one slice's chips; several slices split ``data`` over DCN unless
    the config's ``mesh.dcn`` says otherwise."""
    from ngram_jax.sharding import parse_mesh_spec

    mesh = cfg.mesh
    if mesh_spec:
        sizes = parse_mesh_spec(mesh_spec)
        if math.prod(sizes.values()) != chips_per_slice:
            raise ConfigError(f"--mesh {mesh_spec} has {math.prod(sizes.values())} devices, but a slice of this "
                              f"topology has {chips_per_slice} chips; make the axis sizes multiply to "
                              f"{chips_per_slice}")
        mesh = dataclasses.replace(mesh, ici=AxisSizes(**sizes))
    dcn = [getattr(mesh.dcn, a) for a in ("data", "fsdp", "tensor", "expert")]
    if slices > 1 and all(v == 1 for v in dcn):
        mesh = dataclasses.replace(mesh, dcn=AxisSizes(data=-1))
    return dataclasses.replace(cfg, mesh=MeshConfig(ici=mesh.ici, dcn=mesh.dcn, rules=mesh.rules))


def _place(abstract, mesh):
    """Abstract arrays (from ``nnx.eval_shape`` under an abstract mesh) placed on ``mesh``'s devices."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    def one(a):
        spec = getattr(getattr(a, "sharding", None), "spec", None) or PartitionSpec()
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree.map(one, abstract)


def _batch_spec(mesh, rules, batch: int):
    """The batch axes that split ``batch`` (all of them, or none when they do not divide it)."""
    from ngram_jax.sharding import rules_for_mesh

    axes = dict(rules_for_mesh(rules, mesh)).get("batch")
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    n = math.prod(mesh.shape[a] for a in axes)
    return axes, n


def _array(shape, dtype, mesh, spec):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))


def _lower_train(cfg: Config, mesh, batch: int, seq: int):
    import jax.numpy as jnp

    from ngram_jax.train.loop import TrainStep
    from ngram_jax.train.state import build_train_state

    model, opt = build_train_state(cfg, mesh, abstract=True)
    step = TrainStep(cfg, model, opt)
    state = _place(step.state, mesh)
    axes, _ = _batch_spec(mesh, cfg.mesh.rules, batch)
    b = axes or None
    tok = _array((batch, seq), jnp.int32, mesh, (b, None))
    data = {"inputs": tok, "targets": tok, "segment_ids": tok, "positions": tok,
            "loss_mask": _array((batch, seq), jnp.float32, mesh, (b, None))}
    return step._step.lower(state, data)


def _lower_inference(cfg: Config, mesh, step: str, batch: int, seq: int, draft_tokens: int):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ngram_jax import decoding, speculative
    from ngram_jax.model import build_model
    from ngram_jax.sharding import param_context

    with param_context(mesh, cfg.mesh.rules):
        model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(cfg.seed)))
    graphdef, state = nnx.split(model)
    state = _place(state, mesh)
    axes, n = _batch_spec(mesh, cfg.mesh.rules, batch)
    b = (axes or None) if batch % n == 0 else None  # a batch the axes do not divide is replicated (decode at 1)
    tok = _array((batch, seq), jnp.int32, mesh, (b, None))
    heads = "tensor" if mesh.shape.get("tensor", 1) > 1 else None

    def kv_spec(x):  # [B, S, H, D] caches: batch over the batch axes, heads over tensor; the rest replicated
        spec = [b] + [None] * (x.ndim - 1)
        if x.ndim == 4 and heads and x.shape[2] % mesh.shape["tensor"] == 0:
            spec[2] = heads
        return spec

    def place_tree(tree):
        return jax.tree.map(lambda x: _array(x.shape, x.dtype, mesh, kv_spec(x) if x.ndim else ()), tree)

    def run(fn):
        return lambda st, *args: fn(nnx.merge(graphdef, st), *args)

    if step == "prefill":
        return jax.jit(run(lambda m, t, s: decoding.prefill(m, t, s, seq))).lower(state, tok, tok)
    kv = place_tree(jax.eval_shape(lambda: decoding.init_kv(nnx.merge(graphdef, state), batch, seq)))
    vec = _array((batch,), jnp.int32, mesh, (b,))
    if step == "decode":
        hist = _array((batch, max(model.history_length(), 1)), jnp.int32, mesh, (b, None))
        dstate = decoding.DecodeState(kv, hist, vec)
        return jax.jit(run(decoding.decode_step), donate_argnums=2).lower(state, vec, dstate)  # as generate() does
    kv = [tuple(c._replace(index=vec) for c in block) for block in kv]  # per-row write index, as speculative runs it
    t = draft_tokens + 1
    verify = run(lambda m, table, start, length, kv: speculative.verify(m, table, start, length, t, kv))
    return jax.jit(verify, donate_argnums=4).lower(state, tok, vec, vec, kv)  # the cache, in place as in the loop


def check_sizes(batch: int | None, seq: int | None, slices: int, draft_tokens: int) -> None:
    """A :class:`UsageError` for a size no step can have (a value given is used as given, never replaced)."""
    for flag, value, least in (("--batch", batch, 1), ("--seq", seq, 2), ("--slices", slices, 1),
                               ("--draft-tokens", draft_tokens, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} {value} must be >= {least}")


def compile_for_tpu(cfg: Config, topology: str, *, mesh_spec: str | None = None, step: str = "train",
                    batch: int | None = None, seq: int | None = None, slices: int = 1,
                    draft_tokens: int = 3) -> AotReport:
    """Compile ``step`` of ``cfg`` for ``slices`` slices of ``topology`` with libtpu, ahead of time (see the
    module docstring); usage errors are raised before anything compiles."""
    from ngram_jax.backend import compile_target
    from ngram_jax.budget import check_config, parameter_budget
    from ngram_jax.sharding import make_mesh, param_context

    if step not in STEPS:
        raise UsageError(f"--step {step!r}: choose one of {', '.join(STEPS)}")
    chip, _ = parse_topology(topology)
    libtpu = check_libtpu()
    devices = topology_devices(topology, slices)
    cfg = _mesh_config(cfg, mesh_spec, len(devices) // slices, slices)
    check_sizes(batch, seq, slices, draft_tokens)
    batch = cfg.data.batch_size if batch is None else batch
    seq = cfg.data.seq_len if seq is None else seq
    if step == "verify" and seq < draft_tokens + 2:
        raise UsageError(f"--seq {seq} must leave room for the {draft_tokens} draft tokens")
    overrides = {"data.batch_size": batch, "data.seq_len": seq}
    if step == "train":
        overrides["train.loss_chunks"] = min(cfg.train.loss_chunks, seq)
    cfg = check_config(replace(cfg, **overrides))
    mesh = make_mesh(cfg.mesh, devices)
    axes, n = _batch_spec(mesh, cfg.mesh.rules, batch)
    if step in ("train", "prefill") and batch % n:
        raise ConfigError(f"--batch {batch} cannot be split over the {n} chips of the batch axes {axes} "
                          f"(mesh {dict(mesh.shape)}); use a multiple of {n}")
    report = AotReport(config=cfg.name, topology=topology, slices=slices, device_kind=devices[0].device_kind,
                       num_chips=len(devices), mesh=dict(mesh.shape), step=step, batch=batch, seq=seq, fits=False,
                       hbm_bytes=chip.hbm_bytes, peak_bytes=0, memory={}, libtpu=libtpu,
                       knobs=knobs(cfg, step, dict(mesh.shape)))
    if step == "train":
        from ngram_jax.tools.memory_plan import step_plan

        report.plan = step_plan(cfg, dict(mesh.shape), batch, seq, "tpu")
    t0 = time.perf_counter()
    with compile_target("tpu"), param_context(mesh, cfg.mesh.rules):
        if step == "train":
            lowered = _lower_train(cfg, mesh, batch, seq)
        else:
            lowered = _lower_inference(cfg, mesh, step, batch, seq, draft_tokens)
        try:
            compiled = lowered.compile()
        except Exception as err:  # noqa: BLE001 - only libtpu's out-of-memory is an answer; anything else is a bug
            oom = parse_oom(str(err))
            if oom is None:
                raise
            report.compile_s = time.perf_counter() - t0
            report.peak_bytes, report.hbm_bytes = oom
            report.shortfall_bytes = oom[0] - oom[1]
            report.memory = {"temporaries": oom[0]}
            return report
    report.compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    report.memory = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
                     "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes, "peak": peak}
    report.peak_bytes = peak
    report.fits = peak <= chip.hbm_bytes
    report.shortfall_bytes = max(0, peak - chip.hbm_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    report.flops, report.bytes_accessed = cost.get("flops"), cost.get("bytes accessed")
    report.hlo = compiled.as_text()
    report.collectives = collectives(report.hlo)
    report.mosaic_calls = mosaic_calls(report.hlo)
    report.ngram_gather_calls = kernel_calls(report.hlo, KERNEL_NAME)
    if report.flops and report.bytes_accessed:
        report.roofline_s = max(report.flops / chip.peak_flops, report.bytes_accessed / chip.hbm_bandwidth)
        tokens = batch * (seq if step in ("train", "prefill") else 1 if step == "decode" else draft_tokens + 1)
        report.tokens_per_s_per_chip = tokens / len(devices) / report.roofline_s
        if step == "train":
            from ngram_jax.train.metrics import flops_per_token

            model_flops = flops_per_token(cfg, parameter_budget(cfg)["activated_max"]) * tokens / len(devices)
            report.mfu_bound = model_flops / report.roofline_s / chip.peak_flops
    return report


# ----------------------------------------------------------------------------------------------
# Command line


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def format_report(r: AotReport) -> str:
    lines = [f"{r.config}: {r.step} step, batch {r.batch} x seq {r.seq}, on {r.topology}"
             f"{f' x {r.slices} slices' if r.slices > 1 else ''} ({r.num_chips} chips, {r.device_kind}), mesh "
             + ",".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) + f"; libtpu {r.libtpu}, compiled in "
             f"{r.compile_s:.0f} s"]
    if not r.memory.get("peak"):
        lines.append(f"  does not fit: libtpu needs {_gb(r.peak_bytes)} of HLO temporaries per chip, the chip has "
                     f"{_gb(r.hbm_bytes)} of HBM (short by {_gb(r.shortfall_bytes)})")
    else:
        m = r.memory
        lines.append(f"  memory per chip   arguments {_gb(m['arguments'])}, outputs {_gb(m['outputs'])}, aliased "
                     f"{_gb(m['aliased'])}, temporaries {_gb(m['temporaries'])}")
        lines.append(f"  peak              {_gb(r.peak_bytes)} of {_gb(r.hbm_bytes)} HBM "
                     f"({r.peak_bytes / r.hbm_bytes:.0%}): {'fits' if r.fits else 'DOES NOT FIT'}")
        if r.flops:
            lines.append(f"  compiler counts   {r.flops:.4g} FLOPs, {r.bytes_accessed:.4g} bytes accessed per chip")
        if r.roofline_s:
            mfu = f", MFU bound {r.mfu_bound:.1%}" if r.mfu_bound is not None else ""
            lines.append(f"  roofline          {r.roofline_s * 1e3:,.2f} ms per step, "
                         f"{r.tokens_per_s_per_chip:,.0f} tokens/s per chip{mfu}")
        kinds = ", ".join(f"{k} {int(v['count'])} ({_gb(v['bytes'])})" for k, v in sorted(r.collectives.items()))
        lines.append(f"  collectives       {kinds or 'none'}")
        lines.append(f"  Mosaic calls      {r.mosaic_calls} ({r.ngram_gather_calls} of them the N-gram gather)")
    if r.plan:
        got = r.memory.get("peak") or r.peak_bytes
        lines.append(f"  planner           {_gb(r.plan['total'])} per chip (compiler {_gb(got)}, planner "
                     f"{(r.plan['total'] - got) / got:+.0%})")
    if not r.fits:
        lines.append("  what helps: " + "; ".join(r.knobs))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.tools.aot", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--topology", required=True, help="GEN:AxB[xC], e.g. v5p:8x8x4, v5e:2x2, v6e:4x4")
    ap.add_argument("--slices", type=int, default=1, help="slices joined over DCN (multi-slice)")
    ap.add_argument("--mesh", help="ICI axis sizes over one slice, e.g. fsdp=64,expert=4 (default: the config's mesh)")
    ap.add_argument("--batch", type=int, help="global batch in sequences (default: data.batch_size)")
    ap.add_argument("--seq", type=int, help="sequence length (default: data.seq_len)")
    ap.add_argument("--step", default="train", choices=STEPS)
    ap.add_argument("--draft-tokens", type=int, default=3, help="verify: draft tokens per verification pass")
    ap.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = ap.parse_args(argv)
    parse_topology(args.topology)  # usage errors before the config and JAX
    check_sizes(args.batch, args.seq, args.slices, args.draft_tokens)
    cfg = load_config(args.config, args.overrides)
    report = compile_for_tpu(cfg, args.topology, mesh_spec=args.mesh, step=args.step, batch=args.batch,
                             seq=args.seq, slices=args.slices, draft_tokens=args.draft_tokens)
    print(json.dumps(report.to_json()) if args.json else format_report(report))
    return 0 if report.fits else 1


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU from this process's CPU backend
    from ngram_jax import cli

    sys.exit(cli.run(main))
