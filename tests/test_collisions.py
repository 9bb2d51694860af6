"""Collision report: exact counts on a small case, and the paper's finding on Zipf tokens."""

import subprocess
import sys

import numpy as np
import pytest

from ngram_jax.tools.collisions import collision_report, expected_random_collisions, main, zipf_tokens


def test_counts_on_a_hand_checked_case():
    # V=10, N=2, r=0.3 -> M = 4: bigrams (x~_{t-1}, x_t) of [1 2 3 1 2]: (0,1) (1,2) (2,3) (3,1) (1,2)
    # distinct 4; ids (x_t + 10 x~) % 4 = 1, 12%4=0, 23%4=3, 31%4=3 -> 3 buckets, 1 collision
    (row,) = collision_report(np.array([1, 2, 3, 1, 2]), vocab_size=10, ratios=[0.3], max_n=2)
    assert (row.table_size, row.distinct, row.buckets_used, row.collisions) == (4, 4, 3, 1)
    assert row.expected_random == pytest.approx(4 - 4 * (1 - (3 / 4) ** 4))


def test_expected_random_collisions():
    assert expected_random_collisions(1, 1000) == pytest.approx(0.0)
    assert expected_random_collisions(1000, 1000) == pytest.approx(1000 - 1000 * (1 - (1 - 1e-3) ** 1000))


def test_integer_and_simple_fraction_ratios_collide_more():
    tokens = zipf_tokens(32768, 1.05, 60_000, seed=0)
    rows = collision_report(tokens, vocab_size=32768, ratios=[8, 8.37, 8.5], max_n=3)
    bigram = {r.ratio: r.vs_random for r in rows if r.order == 2}
    # 2-grams collide most at integer and half-integer multiples of V (paper section 3.2.2)
    assert bigram[8.0] > 1.8 and bigram[8.5] > 1.5
    assert 0.7 < bigram[8.37] < 1.2
    total = {ratio: sum(r.collisions for r in rows if r.ratio == ratio) for ratio in (8.0, 8.37, 8.5)}
    assert total[8.0] > 1.3 * total[8.37] and total[8.5] > 1.2 * total[8.37]


def test_cli_on_a_token_file(tmp_path, capsys):
    path = tmp_path / "tokens.npy"
    np.save(path, zipf_tokens(4096, 1.1, 5000, seed=1))
    assert main(["--tokens", str(path), "--vocab-size", "4096", "--ratios", "2,2.37", "--max-n", "3",
                 "--splits", "2"]) == 0
    out = capsys.readouterr().out
    assert "summary" in out and out.count("\n") > 8
    from ngram_jax import cli

    assert cli.run(main, ["--tokens", str(path), "--vocab-size", "100", "--ratios", "2"]) == 2  # ids >= V
    assert "outside [0, 100)" in capsys.readouterr().err


def test_cli_module_entry_point():
    res = subprocess.run([sys.executable, "-m", "ngram_jax.tools.collisions", "--zipf", "1024,1.05,3000",
                          "--ratios", "4,4.37", "--json"], capture_output=True, text=True, check=True)
    assert '"vs_random"' in res.stdout


def test_cli_on_a_prepared_corpus(tmp_path, capsys):
    """--data reads a prepared directory's documents (EOS-terminated, in file order) with its V and EOS."""
    import json

    from array_record.python.array_record_module import ArrayRecordReader

    from ngram_jax.data.corpus import bundled_corpus_files
    from ngram_jax.data.prepare import prepare
    from ngram_jax.tools.collisions import corpus_tokens

    meta = prepare(bundled_corpus_files()[:1], tmp_path / "d", train_bpe_vocab=300, max_doc_tokens=100_000)
    tokens, got = corpus_tokens(tmp_path / "d", "train")
    first = np.frombuffer(ArrayRecordReader(str(tmp_path / "d" / meta["splits"]["train"]["files"][0])).read([0])[0],
                          np.int32)
    assert got == meta and len(tokens) == meta["splits"]["train"]["tokens"] and tokens[len(first) - 1] == meta["eos_id"]
    assert np.array_equal(tokens[: len(first)], first)
    assert len(corpus_tokens(tmp_path / "d", "train", max_tokens=500)[0]) == 500
    assert main(["--data", str(tmp_path / "d"), "--max-tokens", "3000", "--ratios", "2,2.37", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    want = collision_report(tokens[:3000], vocab_size=300, ratios=[2, 2.37], max_n=3, eos_id=meta["eos_id"])
    assert [r["collisions"] for r in rows] == [r.collisions for r in want] and len(rows) == 4
