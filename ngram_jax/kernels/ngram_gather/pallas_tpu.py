"""Pallas TPU kernel: token ids in (blocked into SMEM), n-gram ids computed in the kernel, rows of every
sub-table DMA'd straight from the HBM-resident table shard into the output block.

Blocking and the SMEM bound. The grid walks the flattened ``B*S`` tokens in blocks of
``TOKENS_PER_STEP`` (TB) tokens. Outside the kernel (cheap XLA) each block is packed into one int32 row
of W = ``smem_words_per_step(N)`` words (a multiple of 128), an array ``[num_blocks, 1, W]`` whose
``(1, W)`` blocks equal its last two dimensions (the TPU block-shape rule):
``[N-1 halo tokens | TB tokens | TB history counts | zero padding]``. The halo is the N-1 tokens before
the block (zeros before the first), so a hash never needs another block's tokens; the history count of a
token is ``min(t - segment_start, N-1)``, how many of its predecessors belong to its segment (EOS and
segment-id resets), and -1 for the padding tokens that fill the last block (they fetch nothing). The row
reaches SMEM through a ``BlockSpec(memory_space=SMEM)``, i.e. one small pipelined DMA per grid step, so
what a step holds in SMEM does not grow with the token count: 2 x W words for the double-buffered token
row (W = 128 for TB = 32 and N <= 65), 2 x TB*T words for the double-buffered block of row ids the kernel
writes out, and the scalar-prefetched constants, all sized by T = K*(N-1): hash constants [T*(N-1)],
sub-table sizes [T], row offsets [T] and the shard's ``row_start`` [1]. For LongCat-Flash-Lite (N=4, K=4,
T=12) that is 256 + 768 + 61 = 1085 words (4.2 KiB) per step at any batch size (1792 words, 7 KiB, once
Mosaic pads each 1-D SMEM array to 128-word tiles); ``tests/test_kernels.py`` checks this on a 1M-token
batch. The packed rows cost W/TB = 4 int32 words of HBM traffic per token, small next to the T rows of d_e
values it fetches.

Per grid step the scalar core loops over the block's tokens and hashes each (token, sub-table) pair
with exact int32 arithmetic (modular multiply by doubling, never above 2^31 - 1), then starts one row
DMA per pair -- all of the block's copies in flight at once, on one DMA semaphore (every copy is the same
size, so each wait retires one copy) -- and waits for them. Ids outside this shard's rows
``[row_start, row_start + R)`` write zeros instead, so the kernel runs unchanged on one shard inside
``shard_map``. The row ids go out too ([B, S, T], SMEM blocks): the backward pass (a custom VJP) scatter-adds
the row gradients into the shard with XLA at those ids, hashing nothing again.

Packed dtypes. The TPU lays a bfloat16 table out with 2 rows in each 32-bit word (tiles of 16 x 128), and
Mosaic refuses a DMA of one such row into or out of a tiled dimension ("Slice sizes along tiled dimensions
must be aligned to tiles"). The kernel moves whole words instead: the aligned slab of ``rows_per_word``
rows that holds the row (rows ``r & -p .. (r & -p) + p - 1``, ``p = 2`` for bfloat16) into an output block
``[TB, T, p, d_e]``, whose slabs span its last two dimensions; the caller keeps slice ``r mod p`` of each
slab (an XLA select over the gathered rows, never over the table). Float32 tables move single rows into
``[TB, T, d_e]``. The table is read in place, never copied or re-laid out. The real compiler (libtpu, ahead of
time, ``tests/test_tpu_compile.py``) accepts both for v5e, v5p and v6e, any N, K and d_e (lane-padded to
128 in VMEM when smaller).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from ngram_jax.kernels.ngram_gather.xla import scatter_add_rows
from ngram_jax.ngram import hashing

TOKENS_PER_STEP = 32
KERNEL_NAME = "ngram_gather"  # the Mosaic kernels' names in compiled TPU modules (tools.aot counts them)
IDS_KERNEL_NAME = "ngram_gather_by_id"


_SIMULATOR: contextvars.ContextVar = contextvars.ContextVar("ngram_jax_tpu_simulator", default=None)


@contextlib.contextmanager
def tpu_simulator(params: pltpu.InterpretParams | None = None) -> Iterator[pltpu.InterpretParams]:
    """Run the Pallas TPU kernels in JAX's TPU simulator while active (``pltpu.force_tpu_interpret_mode``),
    and let models choose ``kernel=pallas_tpu`` off TPU: the lookup reads the simulator's parameters
    through :func:`simulator_params` (JAX has no public reader of the forced mode)."""
    params = params if params is not None else pltpu.InterpretParams()
    token = _SIMULATOR.set(params)
    try:
        with pltpu.force_tpu_interpret_mode(params):
            yield params
    finally:
        _SIMULATOR.reset(token)


def simulator_params() -> pltpu.InterpretParams | None:
    """The parameters of the active :func:`tpu_simulator` (None outside one)."""
    return _SIMULATOR.get()


def check_interpret_mesh(mesh) -> None:
    """Refuse to run the TPU simulator (interpret mode, CPU) inside ``shard_map`` over every CPU device.

    Why (found 2026-11-25, JAX 0.10.2): the simulator interprets the kernel through host callbacks, and
    each kernel starts with a barrier that waits for the callbacks of all the mesh's devices. A host
    callback's operands are first copied to CPU device 0 and read back with ``np.asarray``; for a large
    operand (the table shard) that copy runs asynchronously on the CPU client's worker threads, one per
    device. When every CPU device is in the mesh, every worker can be inside a callback, blocked in the
    barrier, and the devices still copying their operands wait for a worker that never frees: a deadlock
    (reproduced without Pallas: 8 devices, 4 block in a barrier, 4 hand a 4 MB operand to a second
    callback; one spare CPU device outside the mesh and it finishes). A mesh that leaves at least one CPU
    device out runs; so does the kernel outside ``shard_map`` and on a real TPU.
    """
    cpu = len(jax.local_devices(backend="cpu"))
    if 1 < cpu <= mesh.size:  # a concrete or abstract mesh (inside a trace): its size is known either way
        raise ValueError(
            f"the Pallas TPU simulator (interpret mode) inside shard_map over all {cpu} CPU devices can "
            "deadlock (its cross-device barrier holds every CPU worker thread); build the mesh from fewer "
            "devices than the process has, e.g. force one more CPU device "
            "(XLA_FLAGS=--xla_force_host_platform_device_count=N+1), or use the xla kernel on CPU")


TOKEN_BITS = (hashing.MAX_VOCAB_SIZE - 1).bit_length()  # token ids < 2^20


def smem_words_per_step(max_n: int, tokens_per_step: int = TOKENS_PER_STEP) -> int:
    """Width W of one packed token row (halo + tokens + history counts), rounded up to a multiple of 128:
    Mosaic lays a [1, W] int32 SMEM block out in (1, 128) tiles, so this is also its padded size."""
    need = (max_n - 1) + 2 * tokens_per_step
    return -(-need // 128) * 128


def _mulmod(a, c, m):
    """(a * c) mod m for 0 <= a < 2^20, 0 <= c < m < 2^31, in int32 without overflow: binary
    doubling, where 2r mod m is r - (m - r) or r + r, and r + c mod m is r - (m - c) or r + c."""

    def body(b, r):
        d = m - r
        r = jnp.where(r >= d, r - d, r + r)
        d = m - c
        plus = jnp.where(r >= d, r - d, r + c)
        return jnp.where(((a >> (TOKEN_BITS - 1 - b)) & 1) == 1, plus, r)

    return jax.lax.fori_loop(0, TOKEN_BITS, body, jnp.int32(0))


def _fetcher(ids_ref, table_ref, out_ref, sem, row_start, pack: int):
    """``(fetch, wait)`` for the rows named in ``ids_ref`` (SMEM, [1, tb*T]; flattened row ids, -1: none):
    ``fetch(i, idx, k)`` starts the DMA of pair k's row into output slot (i, idx), or writes zeros for a row
    outside this shard ``[row_start, row_start + R)``; ``wait(i, idx, k)`` retires it. ``pack`` rows share a
    32-bit word of the table's tiled layout (1 for float32, 2 for bfloat16): the DMA moves the ``pack`` rows
    that hold the row (an aligned slab ``[pack, d_e]``, whole 32-bit words, which Mosaic accepts where a
    single 16-bit row is not tile-aligned) and the caller keeps the row's own slice."""
    shard_rows = table_ref.shape[0]

    def local(k):
        return ids_ref[0, k] - row_start

    def inside(k):
        return (ids_ref[0, k] >= 0) & (local(k) >= 0) & (local(k) < shard_rows)

    def copy(i, idx, k):
        if pack == 1:
            return pltpu.make_async_copy(table_ref.at[pl.ds(local(k), 1), :], out_ref.at[i, pl.ds(idx, 1), :],
                                         sem.at[0])
        first = pl.multiple_of(local(k) & -pack, pack)  # the aligned slab holding the row
        return pltpu.make_async_copy(table_ref.at[pl.ds(first, pack), :], out_ref.at[i, idx], sem.at[0])

    def fetch(i, idx, k):
        @pl.when(inside(k))
        def _start():
            copy(i, idx, k).start()

        @pl.when(jnp.logical_not(inside(k)))
        def _zero():
            if pack == 1:
                out_ref[i, pl.ds(idx, 1), :] = jnp.zeros((1, out_ref.shape[-1]), out_ref.dtype)
            else:
                out_ref[i, idx] = jnp.zeros(out_ref.shape[2:], out_ref.dtype)

    def wait(i, idx, k):
        @pl.when(inside(k))
        def _wait():
            copy(i, idx, k).wait()

    return fetch, wait


def _wait_all(wait, tb: int, num_tables: int) -> None:
    def body(i, carry):
        for idx in range(num_tables):
            wait(i, idx, i * num_tables + idx)
        return carry

    jax.lax.fori_loop(0, tb, body, 0)


def _kernel(c_ref, m_ref, off_ref, rs_ref, blk_ref, table_ref, out_ref, ids_ref, sem, *,
            num_tables: int, splits: int, hist: int, tb: int, pack: int):
    """One grid step: ``blk_ref`` (SMEM, [1, W]) = [hist halo tokens | tb tokens | tb history counts | pad].

    ``ids_ref`` (SMEM, [1, tb*T]) receives each (token, sub-table) pair's flattened row id (-1: padding),
    which :func:`_fetcher` then fetches."""
    fetch, wait = _fetcher(ids_ref, table_ref, out_ref, sem, rs_ref[0], pack)

    def hash_and_start(i, carry):
        x = blk_ref[0, hist + i]  # the token; its j-th predecessor is blk_ref[hist + i - j] (halo for i < j)
        valid = blk_ref[0, hist + tb + i]  # predecessors inside its segment (0..hist); -1: padding token
        for idx in range(num_tables):
            n = idx // splits + 2
            m = m_ref[idx]
            h = x % m
            for j in range(1, n):
                prev = jnp.where(valid >= j, blk_ref[0, hist + i - j], 0)
                term = _mulmod(prev, c_ref[idx * hist + j - 1], m)
                d = m - term
                h = jnp.where(h >= d, h - d, h + term)
            k = i * num_tables + idx
            ids_ref[0, k] = jnp.where(valid >= 0, off_ref[idx] + h, -1)
            fetch(i, idx, k)
        return carry

    jax.lax.fori_loop(0, tb, hash_and_start, 0)
    _wait_all(wait, tb, num_tables)


def _ids_kernel(rs_ref, ids_ref, table_ref, out_ref, sem, *, num_tables: int, tb: int, pack: int):
    """One grid step of the gather by row id: ``ids_ref`` (SMEM, [1, tb*T]) names the rows (hashed elsewhere)."""
    fetch, wait = _fetcher(ids_ref, table_ref, out_ref, sem, rs_ref[0], pack)

    def start(i, carry):
        for idx in range(num_tables):
            fetch(i, idx, i * num_tables + idx)
        return carry

    jax.lax.fori_loop(0, tb, start, 0)
    _wait_all(wait, tb, num_tables)


def rows_per_word(dtype) -> int:
    """Table rows that share one 32-bit word of the TPU's tiled layout: 1 (32-bit), 2 (16-bit), 4 (8-bit)."""
    size = jnp.dtype(dtype).itemsize
    if size > 4 or 4 % size:
        raise ValueError(f"ngram_gather pallas_tpu: tables of {jnp.dtype(dtype).name} are not supported; use float32, "
                         "bfloat16 or float16")
    return 4 // size


def _token_blocks(tokens, layout: hashing.NgramLayout, eos_id, segment_ids, tb: int):
    """[num_blocks, 1, W] int32: per block of ``tb`` flattened tokens one packed row (module docstring)."""
    b, s = tokens.shape
    hist = layout.max_n - 1
    n_tok = b * s
    num_blocks = -(-n_tok // tb)
    padded = num_blocks * tb
    tok = jnp.pad(tokens.reshape(-1).astype(jnp.int32), (0, padded - n_tok))
    pos = jnp.arange(s, dtype=jnp.int32)[None, :]
    valid = jnp.minimum(pos - hashing.segment_starts(tokens, eos_id, segment_ids), hist).astype(jnp.int32)
    valid = jnp.pad(valid.reshape(-1), (0, padded - n_tok), constant_values=-1)  # padding: no row at all
    with_halo = jnp.pad(tok, (hist, 0))  # token t of the flat array sits at t + hist
    window = (jnp.arange(num_blocks, dtype=jnp.int32) * tb)[:, None] + jnp.arange(tb + hist, dtype=jnp.int32)
    width = smem_words_per_step(layout.max_n, tb)
    rows = jnp.concatenate([with_halo[window], valid.reshape(num_blocks, tb),
                            jnp.zeros((num_blocks, width - hist - 2 * tb), jnp.int32)], axis=1)
    return rows[:, None, :], num_blocks, width


def _prefetch_args(layout: hashing.NgramLayout, row_start):
    """The scalar-prefetched operands: sized by the number of sub-tables T, never by the tokens."""
    consts = hashing.hash_constants(layout.vocab_size, layout.table_sizes, layout.max_n)  # [T, N-1] int64 < 2^31
    as_i32 = lambda v: jnp.asarray(np.asarray(v, np.int32))  # noqa: E731
    return (as_i32(consts.reshape(-1)), as_i32(layout.table_sizes), as_i32(layout.row_offsets),
            jnp.asarray(row_start, jnp.int32).reshape(1))


def _check_shard(table) -> int:
    """Rows per 32-bit word of the table's dtype, after checking that the shard splits into such slabs."""
    rows = table.shape[0]
    pack = rows_per_word(table.dtype)
    if rows % pack:
        raise ValueError(f"ngram_gather pallas_tpu: a {table.dtype} table shard of {rows} rows is fetched in aligned "
                         f"slabs of {pack} rows, which {rows} is not a multiple of; set model.ngram.row_multiple "
                         f"(or model.ple.row_multiple) to a multiple of {pack} x the row shards")
    return pack


def _keep_rows(out, ids, row_start, pack: int):
    """out [P, T, d_e] or, for packed dtypes, [P, T, pack, d_e] slabs -> each row's own slice [P, T, d_e]
    (a padding id -1 keeps slice 0 of its all-zero slab)."""
    if pack == 1:
        return out
    sub = (ids - row_start) & (pack - 1)
    return jnp.take_along_axis(out, sub[:, :, None, None], axis=2)[:, :, 0]


def _cost(first_block, table, fetches: int, ids_out: bool) -> pl.CostEstimate:
    """What one call moves, declared to the compiler: without it, the compiled module's "bytes accessed" (and
    so ``tools.aot``'s roofline) leaves out every row the kernel reads and writes. Each fetch reads its slab of
    ``pack`` rows from the table and writes it to the output; the packed token rows (or ids) come in and, with
    ``ids_out``, the row ids go out. Hashing is scalar integer work: no floating-point operations."""
    slab = rows_per_word(table.dtype) * table.shape[1] * table.dtype.itemsize
    moved = 2 * fetches * slab + first_block.size * first_block.dtype.itemsize + (4 * fetches if ids_out else 0)
    return pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=int(moved))


def _call(kernel, prefetch, first_block, first_spec, table, num_blocks: int, tb: int, t: int, ids_out: bool,
          interpret, name: str):
    """The ``pallas_call`` both kernels share: a grid over blocks of ``tb`` positions, the table in HBM (``pl.ANY``),
    rows out in ``[tb, T, (pack,) d_e]`` blocks and, with ``ids_out``, the row ids out in SMEM blocks."""
    d_e = table.shape[1]
    pack = rows_per_word(table.dtype)
    slab = (t, d_e) if pack == 1 else (t, pack, d_e)
    out_shape = [jax.ShapeDtypeStruct((num_blocks * tb, *slab), table.dtype)]
    out_specs = [pl.BlockSpec((tb, *slab), lambda blk, *_: (blk,) + (0,) * len(slab))]
    if ids_out:
        out_shape.append(jax.ShapeDtypeStruct((num_blocks, 1, tb * t), jnp.int32))
        out_specs.append(pl.BlockSpec((None, 1, tb * t), lambda blk, *_: (blk, 0, 0), memory_space=pltpu.SMEM))
    return pl.pallas_call(
        functools.partial(kernel, num_tables=t, tb=tb, pack=pack),
        out_shape=tuple(out_shape),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(num_blocks,),
            in_specs=[first_spec, pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=out_specs,
            scratch_shapes=[pltpu.SemaphoreType.DMA((1,))],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(first_block, table, num_blocks * tb * t, ids_out),
        interpret=interpret,
        name=name,
    )(*prefetch, first_block, table)


def gather_rows_pallas(tokens, table, layout: hashing.NgramLayout, eos_id, segment_ids=None, row_start=0,
                       interpret=False) -> tuple[jax.Array, jax.Array]:
    """Forward only: ([B, S, T, d_e] rows of ``table``, a shard starting at ``row_start``; int32 [B, S, T] their
    flattened row ids, computed in the kernel)."""
    b, s = tokens.shape
    t, d_e = layout.num_tables, table.shape[1]
    pack = _check_shard(table)
    tb = TOKENS_PER_STEP
    blocks, num_blocks, width = _token_blocks(tokens, layout, eos_id, segment_ids, tb)
    kernel = functools.partial(_kernel, splits=layout.splits, hist=layout.max_n - 1)
    spec = pl.BlockSpec((None, 1, width), lambda blk, *_: (blk, 0, 0), memory_space=pltpu.SMEM)
    out, ids = _call(kernel, _prefetch_args(layout, row_start), blocks, spec, table, num_blocks, tb, t, True,
                     interpret, KERNEL_NAME)
    ids = ids.reshape(-1, t)[: b * s]  # [B*S, T]
    out = _keep_rows(out[: b * s], ids, row_start, pack)
    return out.reshape(b, s, t, d_e), ids.reshape(b, s, t)


def rows_by_id_pallas(table, ids, row_start=0, interpret=False) -> jax.Array:
    """Forward only: the rows ``ids`` [..., T] (flattened row ids, hashed elsewhere) name in ``table`` (a shard
    starting at ``row_start``; other ids give zeros) -> [..., T, d_e]."""
    *lead, t = ids.shape
    d_e = table.shape[1]
    pack = _check_shard(table)
    tb = TOKENS_PER_STEP
    p = math.prod(lead)
    num_blocks = max(1, -(-p // tb))
    flat = jnp.pad(ids.reshape(p, t).astype(jnp.int32), ((0, num_blocks * tb - p), (0, 0)), constant_values=-1)
    start = jnp.asarray(row_start, jnp.int32).reshape(1)
    spec = pl.BlockSpec((None, 1, tb * t), lambda blk, *_: (blk, 0, 0), memory_space=pltpu.SMEM)
    (out,) = _call(_ids_kernel, (start,), flat.reshape(num_blocks, 1, tb * t), spec, table, num_blocks, tb, t, False,
                   interpret, IDS_KERNEL_NAME)
    out = _keep_rows(out[:p], flat[:p], row_start, pack)
    return out.reshape(*lead, t, d_e)


def gather_by_id_pallas_tpu(table, ids, row_start=0, interpret=False) -> jax.Array:
    """:func:`rows_by_id_pallas`, differentiable w.r.t. ``table`` (the segment-sum backward of the XLA path)."""

    @jax.custom_vjp
    def gather(tab, i, start):
        return rows_by_id_pallas(tab, i, start, interpret)

    def fwd(tab, i, start):
        return gather(tab, i, start), (i, start)

    def bwd(res, ct):
        i, start = res
        return scatter_add_rows(table.shape, table.dtype, i, start, ct), None, None

    gather.defvjp(fwd, bwd)
    return gather(table, ids, jnp.asarray(row_start, jnp.int32))


def ngram_gather_pallas_tpu(tokens, table, *, layout, eos_id, segment_ids=None, row_start=0, proj=None,
                            interpret=False):
    """Rows (or the projected mean with ``proj``) through the kernel, differentiable w.r.t. ``table``."""

    shape, dtype = table.shape, table.dtype
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)

    # tokens, segments and the shard start are arguments (not closed over), so that the backward pass
    # holds no tracer of an enclosing transformation (shard_map, grad)
    @jax.custom_vjp
    def gather(tab, tok, seg, start):
        return gather_rows_pallas(tok, tab, layout, eos_id, seg, start, interpret)[0]

    def fwd(tab, tok, seg, start):
        rows, ids = gather_rows_pallas(tok, tab, layout, eos_id, seg, start, interpret)
        return rows, (ids, start)  # the kernel's row ids: the backward pass hashes nothing

    def bwd(res, ct):
        ids, start = res
        return scatter_add_rows(shape, dtype, ids, start, ct), None, None, None

    gather.defvjp(fwd, bwd)
    rows = gather(table, tokens, segment_ids, jnp.asarray(row_start, jnp.int32))
    if proj is None:
        return rows
    return jnp.einsum("bste,ted->bsd", rows, proj) / (1 + layout.num_tables)
