"""The one n-gram lookup path: every kernel choice inside the model gives the reference loss and
gradients (Pallas in TPU interpret mode), on one device and on row-sharded meshes (no table
all-gather); row-wise table optimizers update exactly the rows read, by their formulas, with the
global-norm clipping of the full gradient; bad kernel names fail before compilation."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from test_sharding import collectives

from ngram_jax.config import ConfigError, load_config
from ngram_jax.kernels.ngram_gather.pallas_tpu import tpu_simulator
from ngram_jax.model import build_model
from ngram_jax.ngram import hashing
from ngram_jax.ngram.lookup import NgramTable, hashed_tables, resolve_kernel
from ngram_jax.sharding import create_sharded, make_mesh_from_spec, param_context
from ngram_jax.train.loop import train_step
from ngram_jax.train.state import build_train_state

SMALL = ["model.vocab_size=520", "model.eos_id=3", "model.d_model=64", "model.num_blocks=1", "model.ffn_dim=128",
         "model.moe.num_experts=4", "model.moe.num_zero_experts=2", "model.moe.expert_dim=32",
         "model.ngram.ratio=1.37", "model.ngram.row_multiple=8", "model.ple.row_multiple=8",
         "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
         "model.attention.v_head_dim=16", "model.attention.qk_rope_head_dim=8"]


def cfg_for(model="tiny_ne", *extra):
    return load_config(f"configs/models/{model}.yaml", overrides=SMALL + list(extra))


def make_batch(b=8, s=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(4, 520, (b, s + 1)).astype(np.int32)
    x[0, 5] = 3  # an EOS: history reset
    x[1, 2:10] = 7  # repeated n-grams: duplicate rows inside the batch
    x[2, :] = x[3, :]  # identical rows: every n-gram of the row twice
    seg = np.ones((b, s), np.int32)
    seg[4, 9:] = 2  # a packed second document
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    pos[4, 9:] -= 9
    mask = np.ones((b, s), np.float32)
    mask[4, 8] = 0
    return {"inputs": x[:, :-1], "targets": x[:, 1:], "segment_ids": seg, "positions": pos, "loss_mask": mask}


def loss_fn(model, batch):
    logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return (ce * batch["loss_mask"]).sum() / batch["loss_mask"].sum()


def loss_and_grads(cfg, batch, mesh=None, with_hlo=False):
    if mesh is None:
        with param_context():
            model = build_model(cfg, nnx.Rngs(0))
    else:
        model = create_sharded(lambda: build_model(cfg, nnx.Rngs(0)), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def f(p, r, b):
        return jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, r, copy=True), b))(p)

    with param_context(mesh):
        compiled = jax.jit(f).lower(params, rest, batch).compile()  # one compile: values and the HLO check
        loss, grads = compiled(params, rest, batch)
    flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    out = (float(loss), flat)
    return (*out, model, compiled.as_text()) if with_hlo else out


def assert_grads_close(got, want, rtol=1e-5):
    assert got.keys() == want.keys()
    for k, w in want.items():
        scale = max(1e-3, float(np.abs(w).max()))
        np.testing.assert_allclose(got[k], w, atol=rtol * scale, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def reference():
    batch = make_batch()
    return batch, {m: loss_and_grads(cfg_for(m, "model.ngram.kernel=reference", "model.ple.kernel=reference"), batch)
                   for m in ("tiny_ne", "tiny_plne")}


@pytest.mark.parametrize("model", ["tiny_ne", "tiny_plne"])
@pytest.mark.parametrize("kernel", ["xla", "pallas_tpu"])
def test_every_kernel_gives_the_reference_loss_and_gradients(reference, model, kernel):
    batch, ref = reference
    cfg = cfg_for(model, f"model.ngram.kernel={kernel}", f"model.ple.kernel={kernel}")
    if kernel == "pallas_tpu":
        with tpu_simulator():
            loss, grads = loss_and_grads(cfg, batch)
    else:
        loss, grads = loss_and_grads(cfg, batch)
    assert abs(loss - ref[model][0]) < 1e-5
    assert_grads_close(grads, ref[model][1])
    table = "embed/ngram_table" if model == "tiny_ne" else "ple/ngram_table"
    assert np.abs(grads[table]).sum() > 0


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=4", "data=4,fsdp=2"])
def test_kernel_on_row_sharded_meshes(reference, spec):
    """The model's kernel path inside shard_map on meshes 8, 2x4 and 4x2: reference loss and gradients,
    and no all-gather of a table in the compiled step."""
    batch, ref = reference
    cfg = cfg_for("tiny_ne", "model.ngram.kernel=xla")
    loss, grads, model, hlo = loss_and_grads(cfg, batch, make_mesh_from_spec(spec), with_hlo=True)
    assert abs(loss - ref["tiny_ne"][0]) < 1e-5
    assert_grads_close(grads, ref["tiny_ne"][1])
    forbidden = set()
    for table in (model.embed.ngram_table, model.embed.embedding):
        rows, cols = table.shape
        forbidden |= {(rows * j // 8, cols) for j in range(2, 9)}
    gathers = [shapes for op, shapes in collectives(hlo) if op == "all-gather"]
    assert gathers and not any(forbidden & set(s) for s in gathers)


def test_pallas_kernel_inside_shard_map_in_the_model(reference):
    """The Pallas TPU kernel (interpret mode) as the model runs it: one row shard per device, on 4 of the 8
    CPU devices (see ``check_interpret_mesh``: over all of them the simulator can deadlock)."""
    batch, ref = reference
    cfg = cfg_for("tiny_ne", "model.ngram.kernel=pallas_tpu")
    small = {k: v[:8, :8] for k, v in batch.items()}  # 64 tokens: 2 grid steps
    want, _ = loss_and_grads(cfg_for("tiny_ne", "model.ngram.kernel=reference"), small)
    with tpu_simulator():
        got, grads = loss_and_grads(cfg, small, make_mesh_from_spec("data=4", devices=jax.devices()[:4]))
    assert abs(got - want) < 1e-5
    assert np.abs(grads["embed/ngram_table"]).sum() > 0


def test_pallas_simulator_over_every_cpu_device_is_refused():
    """The simulator's deadlock pattern (shard_map over all CPU devices) is a clear error, not a hang."""
    cfg = cfg_for("tiny_ne", "model.ngram.kernel=pallas_tpu")
    small = {k: v[:8, :8] for k, v in make_batch().items()}
    with tpu_simulator():
        with pytest.raises(ValueError, match="deadlock.*fewer devices than the process has"):
            loss_and_grads(cfg, small, make_mesh_from_spec("data=8"))


def test_kernel_names_fail_before_compilation():
    with pytest.raises(ConfigError, match=r"model.ngram.kernel.*'auto', 'reference', 'xla', 'pallas_tpu'"):
        cfg_for("tiny_ne", "model.ngram.kernel=triton")
    cfg = cfg_for("tiny_plne", "model.ple.kernel=pallas_tpu")
    with pytest.raises(ValueError, match=r"model.ple.kernel='pallas_tpu': pallas_tpu compiles only for TPU .* set "
                                         r"model.ple.kernel=auto or xla"):
        build_model(cfg, nnx.Rngs(0))
    assert resolve_kernel("auto", backend="tpu") == "pallas_tpu"
    assert resolve_kernel("auto", backend="gpu") == resolve_kernel("auto", backend="cpu") == "xla"


def test_history_input_equals_segment_input():
    """Decoding's N-gram cache form (explicit history) gives the training form's logits."""
    cfg = cfg_for("tiny_plne", "model.ngram.enabled=true")
    batch = make_batch(8, 12)
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))
        want = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
        hist = hashing.history(batch["inputs"], model.history_length() + 1, cfg.model.eos_id, batch["segment_ids"])
        got = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"], history=hist)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Row-wise table optimizers


def dense_table_grads(model, batch):
    """The full gradient of each N-gram table (the dense path), for the oracle."""
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, NgramTable))(model, batch)
    return {"/".join(map(str, p[:-1])): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


@pytest.mark.parametrize("kind, spec", [("rowwise_adagrad", None), ("lazy_adam", None),
                                        pytest.param("rowwise_adagrad", "data=2,fsdp=4", marks=pytest.mark.slow)])
def test_rowwise_update_touches_exactly_the_rows_read(kind, spec):
    t_over = [f"train.table_optimizer={kind}", "train.grad_clip=1e9", "train.warmup_steps=1", "train.steps=100",
              "train.ngram_lr_multiplier=3.0", "train.ngram_weight_decay=0.1", "model.ple.kind=plne",
              "model.moe.num_experts=0", "model.moe.num_zero_experts=0"]  # no router bias: two equal steps
    cfg = load_config("configs/models/tiny_ne.yaml", overrides=SMALL + t_over)
    batch = make_batch()
    mesh = make_mesh_from_spec(spec) if spec else None
    model, opt = build_train_state(cfg, mesh)
    with param_context(mesh):
        step = nnx.jit(train_step)
        step(model, opt, batch)  # lr 0 at step 0: tables do not move, the optimizer state does
        w0 = {k: np.asarray(m.ngram_table[...]) for k, m in hashed_tables(model)}
        g = dense_table_grads(model, batch)  # the dense parameters did not move either
        step(model, opt, batch)
    lr = float(cfg.train.lr * 3.0 * optax.warmup_cosine_decay_schedule(0, 1, 1, 100, end_value=0.1)(1))
    for k, m in hashed_tables(model):
        w1 = np.asarray(m.ngram_table[...])
        read = np.unique(np.asarray(m.row_ids(batch["inputs"], segment_ids=batch["segment_ids"])))
        assert read.size < m.row_ids(batch["inputs"]).size  # duplicates were exercised
        untouched = np.setdiff1d(np.arange(w0[k].shape[0]), read)
        np.testing.assert_array_equal(w1[untouched], w0[k][untouched])  # bit-identical
        gk, w = g[k][read].astype(np.float64), w0[k][read].astype(np.float64)
        if kind == "rowwise_adagrad":
            acc = 2 * np.mean(gk**2, axis=-1, keepdims=True)  # two identical steps
            upd = gk / (np.sqrt(acc) + cfg.train.eps)
        else:
            b1, b2, eps = cfg.train.b1, cfg.train.b2, cfg.train.eps
            mom = (1 - b1) * gk * (1 + b1)
            nu = (1 - b2) * gk**2 * (1 + b2)
            upd = (mom / (1 - b1**2)) / (np.sqrt(nu / (1 - b2**2)) + eps)
        want = w - lr * (upd + 0.1 * w)
        np.testing.assert_allclose(w1[read], want, rtol=2e-4, atol=1e-6, err_msg=k)
        assert np.abs(w1[read] - w0[k][read]).max() > 1e-4


def test_sparse_gradient_norm_is_the_full_gradient_norm():
    batch = make_batch()
    norms = {}
    for kind in ("dense", "lazy_adam"):
        cfg = cfg_for("tiny_ne", f"train.table_optimizer={kind}")
        model, opt = build_train_state(cfg)
        with param_context():
            norms[kind] = float(nnx.jit(train_step)(model, opt, batch)["grad_norm"])
    assert abs(norms["dense"] - norms["lazy_adam"]) < 1e-5 * norms["dense"]
    assert norms["dense"] > 1.0  # above the clipping threshold: the clip scale is exercised


def test_step_does_not_differentiate_the_table_in_sparse_mode():
    """No [rows, width] table gradient in the sparse step's program: its size does not appear."""
    cfg = cfg_for("tiny_ne", "train.table_optimizer=rowwise_adagrad", "model.ngram.ratio=17.37")
    batch = make_batch()
    rows, width = build_model(cfg, nnx.Rngs(0)).embed.ngram_table.shape
    def table_sized_math(cfg):
        model, opt = build_train_state(cfg)
        with param_context():
            text = nnx.jit(train_step).lower(model, opt, batch).as_text()
        ops = ("add", "subtract", "multiply", "divide", "sqrt", "broadcast_in_dim", "select")
        return [ln for ln in text.splitlines() if f"tensor<{rows}x{width}xf32>" in ln.split("->")[-1]
                and any(f"stablehlo.{op} " in ln for op in ops)]

    assert table_sized_math(cfg) == []  # no dense gradient, no elementwise pass over the table
    assert len(table_sized_math(cfg_for("tiny_ne", "model.ngram.ratio=17.37"))) > 3  # the dense control


def test_rowwise_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    """The row-wise state is saved (in row chunks, found by type) and restored; training continues the same."""
    import orbax.checkpoint as ocp

    from ngram_jax.checkpoint import Checkpointer, row_chunked_paths
    from ngram_jax.train.state import train_state_target

    cfg = cfg_for("tiny_ne", "train.table_optimizer=lazy_adam", "train.warmup_steps=1")
    batch = make_batch()
    model, opt = build_train_state(cfg)
    with param_context():
        step = nnx.jit(train_step)
        for _ in range(2):
            step(model, opt, batch)
    chunked = row_chunked_paths(model, opt)
    assert ("opt", "tables", "embed", "mu") in chunked and ("model", "embed", "ngram_table") in chunked
    state = {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.mgr.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    ckpt.wait()
    model2, opt2 = build_train_state(cfg)
    target = train_state_target(model2, opt2, None, cfg.mesh.rules)
    restored = ckpt.mgr.restore(2, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    ckpt.close()
    for module, saved in ((model2, restored["model"]), (opt2, restored["opt"])):
        st = nnx.state(module)
        nnx.replace_by_pure_dict(st, saved)
        nnx.update(module, st)
    np.testing.assert_array_equal(np.asarray(opt2.tables["embed"].nu[...]), np.asarray(opt.tables["embed"].nu[...]))
    with param_context():
        a, b = step(model, opt, batch), step(model2, opt2, batch)
    assert float(a["loss"]) == float(b["loss"])
    np.testing.assert_array_equal(np.asarray(model2.embed.ngram_table[...]), np.asarray(model.embed.ngram_table[...]))
