"""Tables are stored in 32-row blocks (one tensorstore chunk each; longer blocks for large tables), without
orbax's small-chunk warning, and come back exactly, onto the same mesh, another mesh or one device; lazy row
reads see the same rows."""

import logging

import grain
import numpy as np
import pytest
import tensorstore as ts
from flax import nnx

from ngram_jax.analyze import LazyCheckpoint
from ngram_jax.checkpoint import MAX_TABLE_BLOCKS, TABLE_CHUNK_ROWS, Checkpointer, block_rows, blocks, row_chunked_paths
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


def test_block_rows_bounds_the_blocks_of_large_tables():
    """The rows per block against a brute-force search: the smallest multiple of TABLE_CHUNK_ROWS that
    divides every shard's rows into whole blocks, at most MAX_TABLE_BLOCKS of them in all."""
    def brute(rows, shards):
        ok = [c for c in range(TABLE_CHUNK_ROWS, rows // shards + 1, TABLE_CHUNK_ROWS) if (rows // shards) % c == 0
              and rows % shards == 0]
        small = [c for c in ok if rows // c <= MAX_TABLE_BLOCKS]
        return (small or ok[-1:] or [None])[0]

    assert block_rows(128) == TABLE_CHUNK_ROWS and block_rows(100) is None and block_rows(256, 16) is None
    assert block_rows(MAX_TABLE_BLOCKS * TABLE_CHUNK_ROWS) == TABLE_CHUNK_ROWS
    assert block_rows(MAX_TABLE_BLOCKS * TABLE_CHUNK_ROWS * 3) == 3 * TABLE_CHUNK_ROWS
    rng = np.random.default_rng(0)
    for _ in range(40):
        shards = int(rng.choice([1, 2, 8]))
        rows = TABLE_CHUNK_ROWS * shards * int(rng.integers(1, 40_000))
        c = block_rows(rows, shards)
        assert c == brute(rows, shards), (rows, shards)
        assert (rows // shards) % c == 0 and (rows // c <= MAX_TABLE_BLOCKS or c == rows // shards)
    assert block_rows(MAX_TABLE_BLOCKS * TABLE_CHUNK_ROWS * 8, 8) == 8 * TABLE_CHUNK_ROWS
    assert block_rows(256, 8) == TABLE_CHUNK_ROWS


@pytest.mark.parametrize("save_spec", [None, "fsdp=8"])
def test_large_tables_get_longer_blocks_and_read_back(tmp_path, monkeypatch, save_spec):
    """A table of more than MAX_TABLE_BLOCKS 32-row blocks (here the bound is lowered to 4) is stored in at
    most that many longer blocks (at least one per row shard); restores, lazy row reads and the streamed
    slabs see the same rows."""
    monkeypatch.setattr(blocks, "MAX_TABLE_BLOCKS", 4)
    cfg = load_config("configs/models/tiny_ne.yaml", overrides=SMALL + ["model.ngram.row_multiple=256"])
    model, opt = save(cfg, make_mesh_from_spec(save_spec) if save_spec else None, tmp_path / "checkpoints")
    table = np.asarray(model.embed.ngram_table[...])
    r, w = table.shape
    shards = 8 if save_spec else 1
    c = block_rows(r, shards)
    assert c > TABLE_CHUNK_ROWS and r // c <= max(4, shards)
    arr = stored(tmp_path / "checkpoints", 1, "model.embed.ngram_table")
    assert arr.shape == (r // c, c, w) and tuple(arr.chunk_layout.read_chunk.shape) == (1, c, w)
    assert stored(tmp_path / "checkpoints", 1, "opt.tables.embed.acc").shape == (r // c, c)

    model2, opt2 = build_train_state(cfg, None, abstract=True)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored = ckpt.restore(1, train_state_target(model2, opt2, None, cfg.mesh.rules))
    ckpt.close()
    np.testing.assert_array_equal(np.asarray(restored["model"]["embed"]["ngram_table"]), table)
    lazy = LazyCheckpoint(tmp_path)
    ids = np.array([0, c - 1, c, r - 1])
    np.testing.assert_array_equal(lazy.rows(("embed", "ngram_table"), ids), table[ids])
    assert lazy.table_bytes_read == 3 * c * w * table.dtype.itemsize  # blocks 0, 1 and the last
    shuffled = np.array([[r - 1, 0], [c, c - 1], [0, r - 1]])  # one block per read, ids in any order and shape
    np.testing.assert_array_equal(lazy.rows(("embed", "ngram_table"), shuffled, max_bytes=1), table[shuffled])
    slabs = list(lazy.row_slabs(("embed", "ngram_table"), max_bytes=1))  # one block per slab
    assert [s for s, _ in slabs] == list(range(0, r, c))
    np.testing.assert_array_equal(np.concatenate([x for _, x in slabs]), table)
