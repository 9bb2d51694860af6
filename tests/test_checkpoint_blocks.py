"""Tables are stored in 32-row blocks (one tensorstore chunk each), without orbax's small-chunk warning,
and come back exactly, onto the same mesh, another mesh or one device; lazy row reads see the same rows."""

import logging

import grain
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from ngram_jax.analyze import LazyCheckpoint
from ngram_jax.checkpoint import TABLE_CHUNK_ROWS, Checkpointer, row_chunked_paths
from ngram_jax.config import load_config, to_dict
from ngram_jax.sharding import make_mesh_from_spec
from ngram_jax.train.state import build_train_state, train_state_target

SMALL = ["model.vocab_size=512", "model.eos_id=3", "model.d_model=64", "model.num_blocks=1", "model.ffn_dim=128",
         "model.moe.num_experts=0", "model.moe.num_zero_experts=0", "model.ngram.ratio=3.37",
         "model.ngram.row_multiple=8", "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16",
         "model.attention.qk_nope_head_dim=16", "model.attention.v_head_dim=16",
         "model.attention.qk_rope_head_dim=8", "train.table_optimizer=rowwise_adagrad"]


def save(cfg, mesh, directory, step=1):
    model, opt = build_train_state(cfg, mesh)
    ckpt = Checkpointer(directory)
    ckpt.save(step, {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))},
              iter(grain.MapDataset.range(4).to_iter_dataset()),
              {"config": to_dict(cfg), "step": step}, row_chunked_paths(model, opt))
    ckpt.close()
    return model, opt


def stored(directory, step, key):
    spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{directory}/{step}/state", "path": key}}
    return ts.open(spec, read=True).result()


def flat(tree):
    return {tuple(map(str, p)): np.asarray(v) for p, v in nnx.to_flat_state(tree)}


@pytest.mark.parametrize("save_spec, restore_spec", [(None, None), ("data=2,fsdp=4", "fsdp=8"),
                                                     ("fsdp=8", None)])
def test_tables_are_stored_in_row_blocks_and_restore_exactly(tmp_path, caplog, save_spec, restore_spec):
    rows = 128 if save_spec is None else 8 * TABLE_CHUNK_ROWS  # row_multiple: whole blocks on every shard
    cfg = load_config("configs/models/tiny_ne.yaml", overrides=SMALL + [f"model.ngram.row_multiple={rows}"])
    save_mesh = make_mesh_from_spec(save_spec) if save_spec else None
    with caplog.at_level(logging.WARNING):
        model, opt = save(cfg, save_mesh, tmp_path / "checkpoints")
    assert not [r for r in caplog.records if "target_byte_size" in r.getMessage()]

    table = model.embed.ngram_table[...]
    r, w = table.shape
    arr = stored(tmp_path / "checkpoints", 1, "model.embed.ngram_table")
    assert arr.shape == (r // TABLE_CHUNK_ROWS, TABLE_CHUNK_ROWS, w)
    assert tuple(arr.chunk_layout.read_chunk.shape) == (1, TABLE_CHUNK_ROWS, w)
    # the row-wise optimizer's per-row accumulator [R] is blocked too
    acc = stored(tmp_path / "checkpoints", 1, "opt.tables.embed.acc")
    assert acc.shape == (r // TABLE_CHUNK_ROWS, TABLE_CHUNK_ROWS)

    mesh = make_mesh_from_spec(restore_spec) if restore_spec else None
    model2, opt2 = build_train_state(cfg, mesh, abstract=True)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored = ckpt.restore(1, train_state_target(model2, opt2, mesh, cfg.mesh.rules))
    ckpt.close()
    for module, saved in ((model, restored["model"]), (opt, restored["opt"])):
        want = flat(nnx.state(module))
        st = nnx.state(module)
        nnx.replace_by_pure_dict(st, saved)
        got = flat(st)
        assert want.keys() == got.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
    if mesh is not None:
        assert restored["model"]["embed"]["ngram_table"].sharding.spec == \
            train_state_target(model2, opt2, mesh, cfg.mesh.rules)["model"]["embed"]["ngram_table"].sharding.spec

    ids = np.array([0, 1, 31, 32, 33, r - 1, 77, 77])
    lazy = LazyCheckpoint(tmp_path)
    np.testing.assert_array_equal(lazy.rows(("embed", "ngram_table"), ids), np.asarray(table)[ids])
    assert lazy.table_bytes_read == 4 * TABLE_CHUNK_ROWS * w * table.dtype.itemsize  # blocks 0, 1, 2, last
    np.testing.assert_array_equal(lazy.read(("embed", "ngram_table"), table.shape), np.asarray(table))


def test_a_table_whose_shards_do_not_hold_whole_blocks_is_stored_as_is(tmp_path, caplog):
    cfg = load_config("configs/models/tiny_ne.yaml", overrides=SMALL + ["model.ngram.row_multiple=8"])
    mesh = make_mesh_from_spec("fsdp=8")
    with caplog.at_level(logging.WARNING):
        model, opt = save(cfg, mesh, tmp_path / "checkpoints")
    assert not [r for r in caplog.records if "target_byte_size" in r.getMessage()]
    table = np.asarray(model.embed.ngram_table[...])
    assert table.shape[0] % (8 * TABLE_CHUNK_ROWS) != 0
    assert stored(tmp_path / "checkpoints", 1, "model.embed.ngram_table").shape == table.shape
    model2, opt2 = build_train_state(cfg, None, abstract=True)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored = ckpt.restore(1, train_state_target(model2, opt2, None, cfg.mesh.rules))
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["model"]["embed"]["ngram_table"]), table)
    ids = np.array([0, 5, table.shape[0] - 1])
    np.testing.assert_array_equal(LazyCheckpoint(tmp_path).rows(("embed", "ngram_table"), ids), table[ids])
