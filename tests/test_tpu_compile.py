"""The real TPU compiler (libtpu, ahead of time on this CPU machine): the fused hashed-gather kernel and the
tiny models' steps compile for v5e / v5p / v6e topologies, with the kernel on the path.

Interpret mode and ``jax.export`` accept kernels Mosaic refuses (a bfloat16 row DMA'd into a tiled dimension,
a Pallas call under GSPMD outside ``shard_map``); only libtpu's compile catches them. Compiles are shared:
each (config, mesh) step is compiled once per module (``compiled`` below).
"""

import functools
import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ngram_jax import cli
from ngram_jax.config import load_config
from ngram_jax.kernels.ngram_gather.pallas_tpu import KERNEL_NAME, TOKENS_PER_STEP, ngram_gather_pallas_tpu
from ngram_jax.ngram import hashing
from ngram_jax.ngram.lookup import Table
from ngram_jax.tools import aot

GENERATIONS = {"v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}
# (N, K, d_e): every order 2..5, splits 1..4, row widths below, at and above one 128-lane tile
LAYOUTS = [(2, 1, 40), (3, 2, 64), (4, 4, 256), (5, 3, 136)]


@functools.cache
def devices(topology: str):
    return aot.topology_devices(topology)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda v: "N{}K{}d{}".format(*v))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gen", list(GENERATIONS))
def test_kernel_forward_and_backward_compile(gen, dtype, layout):
    """Forward and backward of the kernel in one compiled module per generation, dtype and layout (on one
    chip: the table is a shard starting at an arbitrary row). The bfloat16 cases are the ones Mosaic refused
    when the kernel DMA'd single 16-bit rows ("Slice sizes along tiled dimensions must be aligned to tiles")."""
    max_n, splits, d_e = layout
    lay = hashing.make_layout(4096, max_n, splits, 2.37, row_multiple=64)
    mesh = Mesh(np.array(devices(GENERATIONS[gen])[:1]), ("x",))
    table = jax.ShapeDtypeStruct((lay.padded_rows, d_e), jnp.dtype(dtype), sharding=NamedSharding(mesh, P()))
    tokens = jax.ShapeDtypeStruct((2, 96), jnp.int32, sharding=NamedSharding(mesh, P()))

    def fwd_bwd(tab, tok):
        f = lambda t: ngram_gather_pallas_tpu(tok, t, layout=lay, eos_id=1, row_start=64)  # noqa: E731
        rows, vjp = jax.vjp(f, tab)
        return rows, vjp(jnp.ones_like(rows))[0]

    hlo = jax.jit(fwd_bwd).lower(table, tokens).compile().as_text()
    assert aot.kernel_calls(hlo, KERNEL_NAME) == 1
    # the compiler is told what the kernel moves: every fetched slab read and written (a bfloat16 row comes
    # with its word-mate), plus the packed tokens in and the row ids out (a few words per position)
    positions = -(-tokens.size // TOKENS_PER_STEP) * TOKENS_PER_STEP
    rows = 2 * positions * lay.num_tables * (4 // table.dtype.itemsize) * d_e * table.dtype.itemsize
    declared = declared_bytes(hlo, KERNEL_NAME)
    assert rows <= declared <= rows + 4 * positions * (lay.num_tables + 8)


def declared_bytes(hlo: str, name: str) -> int:
    """The ``bytes_accessed`` the Pallas calls named ``name`` declare in a compiled module."""
    calls = [line for line in hlo.splitlines() if 'custom_call_target="tpu_custom_call"' in line and name in line]
    return sum(int(b) for line in calls for b in re.findall(r'\\?"bytes_accessed\\?":\\?"(\d+)', line))


MESHES = {"data": "data=4", "fsdp": "fsdp=4", "data_expert": "data=2,expert=2", "tensor": "tensor=4"}
CASES = [("tiny_ne", m) for m in MESHES] + [("tiny_plne", "data"), ("tiny_plne", "tensor"), ("tiny_moe", "fsdp"),
                                            ("tiny_moe", "tensor")]


@functools.cache
def compiled(config: str, mesh: str, step: str = "train", *overrides: str) -> aot.AotReport:
    cfg = load_config(f"configs/models/{config}.yaml", ["data.batch_size=8", "data.seq_len=64", *overrides])
    return aot.compile_for_tpu(cfg, "v5e:2x2", mesh_spec=MESHES.get(mesh, mesh), step=step)


def table_rows(config: str, *overrides: str) -> set[int]:
    """The first dimension of every embedding table of a config (token and N-gram tables)."""
    from flax import nnx

    from ngram_jax.model import build_model
    from ngram_jax.sharding import param_context

    cfg = load_config(f"configs/models/{config}.yaml", list(overrides))
    with param_context(None):
        model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    return {v.shape[0] for _, v in nnx.to_flat_state(nnx.state(model, Table))}


@pytest.mark.parametrize("config,mesh", CASES, ids=[f"{c}-{m}" for c, m in CASES])
def test_tiny_train_steps_compile_with_the_kernel_and_no_table_all_gather(config, mesh):
    """kernel=auto compiles to the Pallas kernel (the TPU target decides), inside shard_map on every mesh; no
    all-gather brings a whole table to a chip (the lookup moves ids and rows, never tables)."""
    r = compiled(config, mesh)
    assert r.fits and r.num_chips == 4 and r.device_kind == "TPU v5 lite"
    assert r.mosaic_calls >= 1  # the N-gram gather and/or XLA's ragged_dot grouped matmuls (MoE)
    lookups = {"tiny_ne": 1, "tiny_plne": 1, "tiny_moe": 0}[config]
    assert r.ngram_gather_calls == lookups
    rows = table_rows(config)
    gathered = [s for _, s in aot.gathered_shapes(r.hlo) if s]
    assert not [s for s in gathered if s[0] in rows], gathered
    assert r.collectives and r.flops > 0 and r.roofline_s > 0


@pytest.mark.parametrize("optimizer", ["rowwise_adagrad", "lazy_adam"])
def test_row_wise_table_optimizers_compile(optimizer):
    """The sparse table optimizers (rows updated on the shards that own them, ``row_sharded_update``)."""
    r = compiled("tiny_plne", "fsdp", "train", f"train.table_optimizer={optimizer}")
    assert r.fits and r.ngram_gather_calls == 1
    rows = table_rows("tiny_plne")
    assert not [s for _, s in aot.gathered_shapes(r.hlo) if s and s[0] in rows]


def test_multi_slice_compiles_with_the_hybrid_mesh():
    """Two v5e:2x2 slices: data over DCN (between slices), fsdp over ICI (make_mesh's hybrid mesh)."""
    cfg = load_config("configs/models/tiny_ne.yaml", ["data.batch_size=8", "data.seq_len=64"])
    r = aot.compile_for_tpu(cfg, "v5e:2x2", mesh_spec="fsdp=4", slices=2)
    assert r.fits and r.num_chips == 8 and r.mesh == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
    assert r.ngram_gather_calls == 1


def test_a_replicated_table_runs_the_kernel_inside_shard_map():
    """mesh.rules replicating the N-gram rows: the kernel still runs per chip on its batch shard (GSPMD cannot
    partition a Mosaic call: "Mosaic kernels cannot be automatically partitioned")."""
    r = compiled("tiny_ne", "data", "train", "mesh.rules.ngram_rows=[]")
    assert r.fits and r.ngram_gather_calls == 1


@pytest.mark.parametrize("step,batch", [("prefill", 8), ("decode", 8), ("verify", 8), ("decode", 1)])
def test_inference_steps_compile(step, batch):
    """Batch 1 on 4 chips: fewer sequences than batch shards, held whole on every chip."""
    r = compiled("tiny_ne", "data_expert", step, f"data.batch_size={batch}")
    assert r.fits and r.peak_bytes > 0 and r.roofline_s > 0
    assert r.ngram_gather_calls == 1  # decoding: the kernel gathers by the ids of its N-gram cache
    if step != "prefill":  # the KV cache is donated, updated in place: not held twice at the peak
        assert r.memory["aliased"] > 0.5 * r.memory["outputs"], r.memory


def test_memory_report_and_json(capsys):
    r = compiled("tiny_ne", "fsdp")
    m = r.memory
    assert m["peak"] == m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"] == r.peak_bytes
    assert r.plan is not None and r.plan["total"] > 0
    text = aot.format_report(r)
    assert "fits" in text and "roofline" in text and "Mosaic calls" in text
    js = r.to_json()
    assert "hlo" not in js and js["fits"] is True and js["collectives"] == r.collectives


def test_collective_and_shape_parsing():
    hlo = """
  %all-gather-start = (bf16[4,128]{1,0}, bf16[16,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %p), replica_groups={}
  %all-gather-done = bf16[16,128]{1,0} all-gather-done(%all-gather-start)
  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), to_apply=%add
  ROOT %rs = (f32[2,3]{1,0}, s32[5]{0}) reduce-scatter(f32[8,3]{1,0} %a, s32[20]{0} %b), dimensions={0}
"""
    got = aot.collectives(hlo)
    assert got == {"all-gather": {"count": 1, "bytes": 16 * 128 * 2}, "all-reduce": {"count": 1, "bytes": 32},
                   "reduce-scatter": {"count": 1, "bytes": 24 + 20}}
    assert aot.gathered_shapes(hlo) == [("bf16", (4, 128)), ("bf16", (16, 128))]
    assert aot.parse_oom("the total memory required for HLO temporaries (320.00G) exceeds available HBM "
                         "(95.74G).") == (320 * 2**30, int(95.74 * 2**30))


def run_cli(capsys, *args):
    status = cli.run(aot.main, list(args))
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("args,message", [
    (["--topology", "v9x:2x2"], "unknown TPU generation 'v9x'"),
    (["--topology", "v5p:2x2"], "a v5p topology is 3 chip counts"),
    (["--topology", "v5e:3x3"], "libtpu refuses it"),
    (["--topology", "v5e:2x2", "--mesh", "data=8"], "--mesh data=8 has 8 devices, but a slice of this topology has 4"),
    (["--topology", "v5e:2x2", "--mesh", "data=4", "--batch", "6"], "--batch 6 cannot be split over the 4 chips"),
    (["--topology", "v5e:2x2", "--batch", "0"], "--batch 0 must be >= 1"),  # never the config's batch instead
    (["--topology", "v5e:2x2", "--seq", "1"], "--seq 1 must be >= 2"),
    (["--topology", "v5e:2x2", "--slices", "0"], "--slices 0 must be >= 1"),
    (["--topology", "v5e:2x2", "--step", "verify", "--draft-tokens", "0"], "--draft-tokens 0 must be >= 1"),
    (["--topology", "v5e:2x2", "--batch", "two"], "argument --batch: invalid int value: 'two'"),
    (["--topology", "v5e:2x2", "model.d_model=wide"], "model.d_model"),
])
def test_cli_errors_are_one_line_before_any_compile(capsys, args, message):
    status, err = run_cli(capsys, "configs/train_tiny.yaml", *args)
    assert status == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_without_libtpu_names_the_extra(capsys, monkeypatch):
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
    status, err = run_cli(capsys, "configs/train_tiny.yaml", "--topology", "v5e:2x2")
    assert status == 1 and len(err) == 1 and "pip install -e '.[tpu]'" in err[0], err


def test_splash_attention_compiles_for_mla_head_sizes():
    """model.attention.kernel=auto is JAX's splash attention on TPU for long sequences; MLA's query/key head
    (nope + rope = 192) and value head (128) differ, which splash allows: forward and backward compile."""
    from ngram_jax.backend import compile_target
    from ngram_jax.layers.attention import attention_kernel, splash_causal_attention

    mesh = Mesh(np.array(devices("v5p:2x2x1")[:1]), ("x",))
    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=NamedSharding(mesh, P()))  # noqa: E731
    seg = jax.ShapeDtypeStruct((1, 1024), jnp.int32, sharding=NamedSharding(mesh, P()))

    def fwd_bwd(q, k, v, sg):
        out, vjp = jax.vjp(lambda q, k, v: splash_causal_attention(q, k, v, sg, 192 ** -0.5), q, k, v)
        return out, vjp(jnp.ones_like(out))

    with compile_target("tpu"):
        assert attention_kernel("auto", 4096) == "splash" and attention_kernel("auto", 512) == "xla"
        hlo = jax.jit(fwd_bwd).lower(sds(1, 1024, 2, 192), sds(1, 1024, 2, 192), sds(1, 1024, 2, 128),
                                     seg).compile().as_text()
    assert aot.kernel_calls(hlo, "splash") >= 2  # the forward kernel and the backward (dq, dkv) kernels


def test_plan_tool_reports_the_compilers_figure(capsys):
    from ngram_jax.tools.plan import main

    assert main(["configs/train_tiny.yaml", "--mesh", "data=4", "--batch", "16", "--seq", "128",
                 "--topology", "v5e:2x2"]) == 0
    out = capsys.readouterr().out
    assert "the estimate; the compiler's figure follows" in out
    assert re.search(r"compiled\s+[\d.]+ GiB per device \(v5e:2x2, libtpu [\d.]+: .* fits in 15.75 GiB; estimate "
                     r"[+-]\d+%\)", out), out


def documented_pod() -> str:
    (pod,) = re.findall(r"^aot-pod: (v5p:\d+x\d+x\d+)$", Path("docs/TPU.md").read_text(), re.M)
    return pod


def test_the_documented_pod_is_the_configs_pod():
    """docs/TPU.md names the smallest v5p slice where LongCat-Flash-Lite's training step fits (``aot-pod:``);
    configs/models/longcat_flash_lite.yaml carries the mesh, batch (>= 1M tokens per step) and remat that fit
    it, so that the AOT tool with only --topology compiles exactly that case (the slow test below)."""
    from ngram_jax.sharding import make_mesh

    cfg = load_config("configs/models/longcat_flash_lite.yaml")
    assert cfg.data.batch_size * cfg.data.seq_len >= 1 << 20 and cfg.model.remat == "block"
    mesh = make_mesh(cfg.mesh, devices(documented_pod()))
    assert mesh.size == math.prod(int(d) for d in documented_pod().split(":")[1].split("x"))
    assert mesh.shape["expert"] == 4 and cfg.data.batch_size % (mesh.shape["fsdp"] * mesh.shape["expert"]) == 0


@pytest.mark.slow  # about 17 minutes and 13 GB of memory on 2 cores: make test-all runs it
def test_longcat_flash_lite_fits_the_documented_pod(capsys):
    status, _ = run_cli(capsys, "configs/models/longcat_flash_lite.yaml", "--topology", documented_pod())
    assert status == 0
