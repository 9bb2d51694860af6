"""Sharding on 8 simulated CPU devices: equal results on every mesh, tables split by rows, no
all-gather of a table, communication independent of table size, sharded init and optimizer state."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ngram_jax.config import AxisSizes, ConfigError, MeshConfig, load_config
from ngram_jax.model import build_model
from ngram_jax.sharding import (
    create_sharded,
    initialize_distributed,
    make_mesh,
    make_mesh_from_spec,
    param_context,
    per_device_bytes,
    replicated_params,
)

OVERRIDES = ["model.vocab_size=520", "model.d_model=64", "model.num_blocks=1", "model.ffn_dim=128",
             "model.moe.num_experts=8", "model.moe.num_zero_experts=2", "model.moe.expert_dim=32",
             "model.ngram.ratio=1.37", "model.ngram.row_multiple=8", "model.attention.q_lora_rank=32",
             "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
             "model.attention.v_head_dim=16", "model.attention.qk_rope_head_dim=8"]
MESHES = ["data=8", "data=2,fsdp=2,expert=2", "expert=8"]


def small_cfg(*extra):
    return load_config("configs/models/tiny_ne.yaml", overrides=OVERRIDES + list(extra))


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


@pytest.fixture(scope="module")
def tokens():
    t = np.random.default_rng(0).integers(2, 512, (8, 17)).astype(np.int32)
    t[1, 5] = small_cfg().model.eos_id  # an EOS (1: not the zero fill of histories)
    assert t[1, 5] != 0
    return t


@pytest.fixture(scope="module")
def reference(tokens):
    cfg = small_cfg()
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))
        loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model, tokens)
    return cfg, float(loss), grads


def compile_grad_hlo(model, mesh, tokens) -> str:
    with param_context(mesh):
        return nnx.jit(nnx.value_and_grad(loss_fn)).lower(model, tokens).compile().as_text()


@pytest.mark.parametrize("spec,chunked", [(m, False) for m in MESHES] + [("data=2,fsdp=2,expert=2", True)])
def test_model_forward_and_gradients_equal_single_device(spec, chunked, reference, tokens, monkeypatch):
    """chunked: a lookup over axes that split both rows and batch in chunks of one position at a time
    (row_sharded.LOOKUP_CHUNK_BYTES; a large batch's default), against the whole batch at once."""
    if chunked:
        from ngram_jax.ngram import row_sharded

        monkeypatch.setattr(row_sharded, "LOOKUP_CHUNK_BYTES", 1)
    cfg, want_loss, want_grads = reference
    mesh = make_mesh_from_spec(spec)
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    with param_context(mesh):
        step = nnx.jit(nnx.value_and_grad(loss_fn))
        loss, grads = step(model, tokens)
        if chunked:  # 16 positions per device, one per chunk: the lookups loop over them
            assert "while" in step.lower(model, tokens).as_text()
    assert abs(float(loss) - want_loss) < 1e-5
    flat_want = dict(nnx.to_flat_state(want_grads))
    for path, g in nnx.to_flat_state(grads):
        w = np.asarray(flat_want[path][...])
        scale = max(1e-3, float(np.abs(w).max()))
        np.testing.assert_allclose(np.asarray(g[...]), w, atol=1e-5 * scale, rtol=0,
                                   err_msg="/".join(map(str, path)))
    # the N-gram table and its gradient are split by rows over all 8 devices
    table, g_table = model.embed.ngram_table[...], grads["embed"]["ngram_table"][...]
    assert per_device_bytes(table) * 8 == table.nbytes
    assert per_device_bytes(g_table) * 8 == g_table.nbytes


SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str):
    """(op, [result shapes]) for every collective of a compiled HLO module."""
    out = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s(all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
                      r"(-start)?\(", line)
        if m:
            shapes = [tuple(int(d) for d in s.split(",") if d) for s in SHAPE.findall(m.group(1))]
            out.append((m.group(2), shapes))
    return out


def test_no_all_gather_of_a_table(tokens):
    cfg = small_cfg()
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    ops = collectives(compile_grad_hlo(model, mesh, tokens))
    assert any(op == "all-gather" for op, _ in ops)  # the parser sees the id all-gathers
    forbidden = set()  # every partial or full gather of a table: j of its 8 row shards
    for table in (model.embed.ngram_table, model.embed.embedding):
        rows, cols = table.shape
        forbidden |= {(rows * j // 8, cols) for j in range(2, 9)}
    for op, shapes in ops:
        if op == "all-gather":
            assert not forbidden & set(shapes), (op, shapes)


def collective_bytes(ratio: float, tokens) -> int:
    cfg = small_cfg(f"model.ngram.ratio={ratio}")
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    return sum(4 * int(np.prod(s)) for _, shapes in collectives(compile_grad_hlo(model, mesh, tokens))
               for s in shapes)


def test_communication_does_not_depend_on_table_size_on_2_devices(tokens):
    """The bytes of every collective of the N-gram lookup's forward and backward are the same for a table 7x
    larger: one NgramEmbedding on 2 devices whose fsdp axis splits the rows and the batch."""
    from ngram_jax.ngram.embedding import NgramEmbedding

    mesh = make_mesh_from_spec("fsdp=2", devices=jax.devices()[:2])

    def lookup_bytes(ratio: float) -> int:
        layer = create_sharded(lambda: NgramEmbedding(520, 64, max_n=3, splits=2, ratio=ratio, eos_id=1,
                                                      row_multiple=8, rngs=nnx.Rngs(0)), mesh)
        with param_context(mesh):
            hlo = nnx.jit(nnx.grad(lambda m, t: jnp.mean(m(t) ** 2))).lower(layer, tokens).compile().as_text()
        return sum(4 * int(np.prod(s)) for _, shapes in collectives(hlo) for s in shapes)

    assert lookup_bytes(1.37) == lookup_bytes(9.37) > 0


@pytest.mark.slow  # the large variant: 8 devices over data, fsdp and expert, with experts
def test_communication_does_not_depend_on_table_size(tokens):
    small, big = collective_bytes(1.37, tokens), collective_bytes(9.37, tokens)
    assert small == big > 0


def test_sharded_init_never_builds_a_full_table():
    cfg = small_cfg()
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    build = lambda: build_model(cfg, nnx.Rngs(0))  # noqa: E731
    with param_context(mesh):
        hlo = nnx.jit(build).lower().compile().as_text()
        abstract = nnx.eval_shape(build)
    rows, d_e = abstract.embed.ngram_table.shape
    assert f"f32[{rows},{d_e}]" not in hlo  # per-device program only ever holds row shards
    assert f"f32[{rows // 8},{d_e}]" in hlo


def test_optimizer_state_is_sharded_like_its_parameter():
    cfg = small_cfg()
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    with param_context(mesh):
        opt = nnx.jit(lambda m: nnx.Optimizer(m, optax.adamw(1e-3), wrt=nnx.Param))(model)
    table_sharding = model.embed.ngram_table[...].sharding
    moments = [v[...] for path, v in nnx.to_flat_state(nnx.state(opt.opt_state))
               if "ngram_table" in map(str, path)]
    assert len(moments) == 2  # mu and nu
    for m in moments:
        assert m.sharding.is_equivalent_to(table_sharding, 2)
        assert per_device_bytes(m) * 8 == m.nbytes


def test_no_large_parameter_left_replicated():
    cfg = small_cfg()
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    assert replicated_params(model, min_size=2048) == []


def test_mesh_that_does_not_divide_a_table_is_a_clear_error():
    cfg = small_cfg("model.ngram.row_multiple=1", "model.ngram.ratio=1.372")  # 4*floor(1.372*520) + 16 = 2868 rows
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    with pytest.raises(ConfigError, match=r"ngram_table dim 0 \(ngram_rows\) has size 2868, .*ngram.row_multiple"):
        create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)


def test_make_mesh_from_config():
    mesh = make_mesh(MeshConfig(ici=AxisSizes(data=-1, fsdp=2, expert=2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1, "expert": 2}
    with pytest.raises(ConfigError, match="multiply to 12"):
        make_mesh(MeshConfig(ici=AxisSizes(data=3, fsdp=2, expert=2)))
    with pytest.raises(ConfigError, match="unknown axis"):
        make_mesh_from_spec("model=8")
    cfg = load_config("configs/models/tiny_ne.yaml", ["mesh.ici.data=2", "mesh.ici.expert=-1"])
    assert dict(make_mesh(cfg.mesh).shape)["expert"] == 4
    assert not initialize_distributed()  # a single process: nothing to initialise


def test_plan_tool_for_longcat_flash_lite(capsys):
    from ngram_jax.tools.plan import main, plan_params

    assert main(["configs/models/longcat_flash_lite.yaml", "--mesh", "data=64,fsdp=4,expert=8", "--batch", "1024",
                 "--seq", "4096"]) == 0
    out = capsys.readouterr().out
    assert "68,563,471,360 parameters" in out and "2048 devices" in out
    for line in ("parameters", "optimizer state", "activations", "total"):
        assert re.search(rf"{line}\s+[\d,.]+ GiB per device", out)
    cfg = load_config("configs/models/longcat_flash_lite.yaml")
    table = next(p for p in plan_params(cfg, {"data": 64, "fsdp": 4, "tensor": 1, "expert": 8})
                 if p.path == "embed/ngram_table")
    assert table.shards == 2048 and table.bytes_per_device == 122_687_488 // 2048 * 256 * 4
    # without the padding the table cannot be split: the plan says so
    cfg = load_config("configs/models/longcat_flash_lite.yaml", ["model.ngram.row_multiple=1"])
    table = next(p for p in plan_params(cfg, {"data": 64, "fsdp": 4, "tensor": 1, "expert": 8})
                 if p.path == "embed/ngram_table")
    assert "not divisible by 2048" in table.problem


def test_a_batch_smaller_than_the_batch_shards_runs_on_every_device(tokens):
    """Decoding one or two sequences on a mesh of 8: the lookups and the expert-parallel MoE hold the whole
    (small) batch on every device; the logits equal one device's."""
    cfg = small_cfg()
    few = tokens[:2, :5]
    with param_context():
        want = np.asarray(build_model(cfg, nnx.Rngs(0))(few))
    mesh = make_mesh_from_spec("data=2,fsdp=2,expert=2")
    model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    with param_context(mesh):
        got = np.asarray(nnx.jit(lambda m, t: m(t))(model, few))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
