"""lm-evaluation-harness adapter (offline, a local task), and checkpoint analysis that reads a table
larger than the test allows itself only row by row."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax.budget import check_config
from ngram_jax.checkpoint import Checkpointer, row_chunked_paths
from ngram_jax.config import load_config, to_dict
from ngram_jax.data.corpus import bundled_corpus_files
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare
from ngram_jax.model import build_model

lm_eval = pytest.importorskip("lm_eval", reason="eval extra not installed: pip install -e '.[eval]'")

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.d_model=64", "model.num_blocks=1", "model.ffn_dim=128", "model.moe.expert_dim=32",
         "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
         "model.attention.v_head_dim=16", "model.attention.qk_rope_head_dim=8", "data.seq_len=32"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evaldata") / "plays"
    prepare(bundled_corpus_files()[:2], out, train_bpe_vocab=4096, heldout_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def adapter(data_dir):
    from ngram_jax.eval.lm_eval_adapter import NgramJaxLM

    cfg = load_config("configs/models/tiny_ne.yaml", SMALL + [f"data.path={data_dir}"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    return NgramJaxLM(model=model, config=cfg, batch_size=4)


class Req:
    def __init__(self, *args):
        self.args = args


def manual_logprob(adapter, context_ids, cont_ids, logits=None):
    """log p(cont | context) from one direct forward pass (``logits`` of ``context + cont[:-1]`` if given)."""
    ids = np.asarray([context_ids + cont_ids])
    if logits is None:
        logits = np.asarray(adapter.model(ids[:, :-1]), np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
        logits.max(-1, keepdims=True)
    n = len(cont_ids)
    return float(sum(logp[len(context_ids) - 1 + i, cont_ids[i]] for i in range(n)))


def test_loglikelihood_matches_a_direct_forward_pass(adapter):
    """The log-probability of each continuation is the direct forward pass's, and ``is_greedy`` is whether
    every continuation token is that pass's argmax: true for the model's own next token (when its text
    encodes back to that token), false for text the untrained model does not predict."""
    ctx = "ROMEO:"
    ctx_ids = adapter._encode(ctx)
    own = int(np.argmax(np.asarray(adapter.model(np.asarray([ctx_ids])), np.float64)[0, -1]))
    pairs = [(ctx, adapter.tok.decode([own])), ("To be, or not to be", ", that is the question")]
    got = adapter.loglikelihood([Req(c, x) for c, x in pairs])
    for (c, x), (lp, greedy) in zip(pairs, got, strict=True):
        c_ids, x_ids = adapter._encode(c), adapter._encode(x)
        logits = np.asarray(adapter.model(np.asarray([c_ids + x_ids])[:, :-1]), np.float64)[0]
        assert abs(lp - manual_logprob(adapter, c_ids, x_ids, logits)) < 1e-3
        want = all(int(np.argmax(logits[len(c_ids) - 1 + i])) == t for i, t in enumerate(x_ids))
        assert greedy == want, (c, x)
    assert got[0][1] == (adapter._encode(pairs[0][1]) == [own])  # true unless the token's text re-encodes otherwise
    assert not got[1][1]


def test_loglikelihood_rolling_and_generate_until(adapter):
    text = "Now is the winter of our discontent"
    (rolling,) = adapter.loglikelihood_rolling([Req(text)])
    ids = adapter._encode(text)
    assert abs(rolling - manual_logprob(adapter, [adapter.eos], ids)) < 1e-3
    (out,) = adapter.generate_until([Req("KING:", {"until": ["\n"], "max_gen_toks": 8})])
    assert isinstance(out, str) and "\n" not in out


def write_task(tmp_path: Path) -> Path:
    items = [{"question": f"Question {i}: the capital of the play is", "choices": [" Rome", " Verona", " Elsinore"],
              "answer": i % 3} for i in range(6)]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: ngram_jax_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n")
    return tmp_path


@pytest.mark.slow  # CI time (33 s): make test-all runs it
def test_local_multiple_choice_task_through_simple_evaluate(adapter, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model=adapter, tasks=["ngram_jax_tiny_mc"],
                                  task_manager=TaskManager(include_path=str(write_task(tmp_path))))
    acc = out["results"]["ngram_jax_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0


def save_model_checkpoint(cfg, data_dir, run_dir):
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
    ckpt = Checkpointer(run_dir / "checkpoints")
    it = iter(make_dataset(data_dir, "train", seq_len=32, batch_size=2, vocab_size=4096, seed=0))
    ckpt.save(1, {"model": nnx.to_pure_dict(nnx.state(model))}, it, {"config": to_dict(cfg), "step": 1},
              row_chunked_paths(model))
    ckpt.close()
    return model


def test_analysis_reads_only_the_rows_it_needs(data_dir, tmp_path):
    """A 42 MB N-gram table; the analysis may read at most a quarter of it."""
    from ngram_jax.analyze import analyze

    cfg = load_config("configs/models/tiny_ne.yaml", SMALL + [f"data.path={data_dir}", "model.ngram.ratio=40.37"])
    with pytest.warns(UserWarning, match="N-gram embeddings hold"):  # deliberately oversized
        check_config(cfg)
    model = save_model_checkpoint(cfg, data_dir, tmp_path / "run")
    table_bytes = model.embed.ngram_table[...].nbytes
    assert table_bytes > 40e6
    text = tmp_path / "sample.txt"
    text.write_text(bundled_corpus_files()[5].read_text(encoding="latin-1")[:3000])
    report = analyze(tmp_path / "run", text=str(text), max_tokens=256)
    assert report["table_bytes"]["ngram_table"] == table_bytes
    assert 0 < report["bytes_read"]["table_rows"] < table_bytes / 4
    print(f"table {table_bytes:,} B, row chunks read {report['bytes_read']['table_rows']:,} B")
    assert set(report["embedding_share"]) == {"token (1-gram)", "2-gram", "3-gram"}
    assert all(0 < u["fraction"] < 0.05 for u in report["row_usage"])
    assert {c["order"] for c in report["collisions"]} == {2, 3}
    load = np.asarray(report["expert_load"])
    assert load.shape == (1, cfg.model.moe.num_experts + cfg.model.moe.num_zero_experts)
    assert load.sum() == report["sample_tokens"] * cfg.model.moe.top_k
    for f in report["plots"]:
        assert Path(f).stat().st_size > 1000
    # row norms of every row, streamed in slabs, against numpy on the table in memory
    assert report["bytes_read"]["table_stream"] >= table_bytes
    table = np.asarray(model.embed.ngram_table[...], np.float64)
    lay = model.embed.layout
    stats = {r["table"]: r for r in report["row_norms"]}
    assert set(stats) == {"token"} | {f"{lay.order_of(i)}-gram/{i}" for i in range(lay.num_tables)}
    for i in range(lay.num_tables):
        lo = lay.row_offsets[i]
        norms = np.linalg.norm(table[lo : lo + lay.table_sizes[i]], axis=-1)
        r = stats[f"{lay.order_of(i)}-gram/{i}"]
        assert r["rows"] == norms.size and sum(r["hist"]) == norms.size
        np.testing.assert_allclose([r["mean"], r["std"], r["max"]], [norms.mean(), norms.std(), norms.max()], rtol=1e-6)
        assert r["zero_rows"] == int((norms == 0).sum())
        for q in (10, 50, 90):  # the histogram's upper bin edge: at most one bin (12%) above the exact value
            assert np.percentile(norms, q) <= r[f"p{q}"] <= 1.13 * np.percentile(norms, q)
    token = np.linalg.norm(np.asarray(model.embed.embedding[...], np.float64), axis=-1)
    np.testing.assert_allclose(stats["token"]["mean"], token.mean(), rtol=1e-6)


def test_analyze_cli(data_dir, tmp_path):
    cfg = load_config("configs/models/tiny_ne.yaml", SMALL + [f"data.path={data_dir}"])
    save_model_checkpoint(cfg, data_dir, tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    res = subprocess.run([sys.executable, "-m", "ngram_jax.analyze", str(tmp_path / "run"), "--max-tokens", "128",
                          "--no-row-norms"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "N-gram share" in res.stdout and "expert load max/mean" in res.stdout and "plot:" in res.stdout
    assert (tmp_path / "run" / "analysis" / "analysis.json").is_file()
    saved = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())
    assert saved["row_norms"] == [] and saved["bytes_read"]["table_stream"] == 0  # --no-row-norms streams nothing


@pytest.mark.slow  # writes and streams a 2.9 GB table (about 2 minutes): make test-all
def test_analysis_of_a_table_several_times_the_memory_limit(data_dir, tmp_path):
    """The whole analysis (row reads for a text, row usage, collisions, streamed row norms of every table)
    of a checkpoint whose N-gram table is 3x the data-segment limit (RLIMIT_DATA, which bounds the heap and
    every private writable mapping) imposed on the analysing process; under the same limit reading the table
    whole fails. The streamed statistics equal numpy's on the table in memory."""
    import gc
    import resource

    limit = 900 << 20
    cfg = load_config("configs/models/tiny_ne.yaml", SMALL + [f"data.path={data_dir}", "model.ngram.ratio=2750.37"])
    model = save_model_checkpoint(cfg, data_dir, tmp_path / "run")
    table = model.embed.ngram_table[...]
    lay, shape = model.embed.layout, table.shape
    assert table.nbytes >= 3 * limit
    ids = [0, 123_457, shape[0] // 2, shape[0] - 1]
    want_rows = np.asarray(table[np.asarray(ids)])
    want_head = np.asarray(model.lm_head.kernel[...], np.float64).sum()
    want = []  # (mean, max) of the row norms of each sub-table, in float64, 1M rows at a time
    for i in range(lay.num_tables):
        lo, n = lay.row_offsets[i], lay.table_sizes[i]
        norms = np.concatenate([np.linalg.norm(np.asarray(table[a : min(a + (1 << 20), lo + n)], np.float64), axis=-1)
                                for a in range(lo, lo + n, 1 << 20)])
        want.append((norms.mean(), norms.max()))
    del model, table, norms
    gc.collect()
    text = tmp_path / "sample.txt"
    text.write_text(bundled_corpus_files()[5].read_text(encoding="latin-1")[:3000])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}

    def limited(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)))

    whole = limited("-c", "import sys; from ngram_jax.analyze import LazyCheckpoint; "
                    f"LazyCheckpoint(sys.argv[1]).read(('embed', 'ngram_table'), {tuple(shape)})",
                    str(tmp_path / "run"))
    assert whole.returncode != 0  # the limit is real: the table does not fit under it
    res = limited("-m", "ngram_jax.analyze", str(tmp_path / "run"), "--text", str(text), "--max-tokens", "512")
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())
    assert report["bytes_read"]["table_stream"] >= 3 * limit
    assert {c["order"] for c in report["collisions"]} == {2, 3} and len(report["row_usage"]) == lay.num_tables
    stats = {r["table"]: r for r in report["row_norms"]}
    for i, (mean, top) in enumerate(want):
        r = stats[f"{lay.order_of(i)}-gram/{i}"]
        assert r["rows"] == lay.table_sizes[i]
        np.testing.assert_allclose([r["mean"], r["max"]], [mean, top], rtol=1e-6)
    assert (tmp_path / "run" / "analysis" / "row_norms.png").stat().st_size > 1000
    # from Python: the model without its tables, and table rows read lazily, under the same limit
    lazy = limited("-c", "import sys, json; import numpy as np; from ngram_jax.analyze import LazyCheckpoint; "
                   "lazy = LazyCheckpoint(sys.argv[1]); m = lazy.model(); "
                   f"print(json.dumps([lazy.rows(('embed', 'ngram_table'), {ids}).tolist(), "
                   "list(m.embed.ngram_table.shape), float(np.asarray(m.lm_head.kernel[...], np.float64).sum())]))",
                   str(tmp_path / "run"))
    assert lazy.returncode == 0, lazy.stderr[-3000:]
    rows, empty, head = json.loads(lazy.stdout.strip().splitlines()[-1])
    np.testing.assert_array_equal(np.asarray(rows, np.float32), want_rows)
    assert empty == [0, shape[1]]
    np.testing.assert_allclose(head, want_head, rtol=1e-12)  # the other parameters are read whole
