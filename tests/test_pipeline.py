"""Input pipeline: a document longer than a row trains on every target once, with its real positions
and the n-gram history of its real previous tokens."""

import json
from collections import Counter

import numpy as np
import pytest
from oracles import ngram_ids_reference

from ngram_jax.data.pipeline import HISTORY, make_dataset
from ngram_jax.data.prepare import prepare
from ngram_jax.data.tokenizer import EOS_TOKEN, load_tokenizer
from ngram_jax.ngram import hashing

WORDS = "the king and queen of france sent word to all the lords that a war was near and every town".split()


@pytest.fixture(scope="module")
def long_doc(tmp_path_factory):
    """One document of about 700 tokens (seq_len 32: more than 20 rows) and two short ones."""
    tmp = tmp_path_factory.mktemp("pipe")
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(WORDS, 900)), "a short one", "and another short document"]
    src = tmp / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([src], tmp / "data", train_bpe_vocab=300, heldout_fraction=1.0)
    tok = load_tokenizer(tmp / "data")
    docs = [np.asarray(tok.encode(t, add_special_tokens=False).ids + [tok.token_to_id(EOS_TOKEN)]) for t in texts]
    assert len(docs[0]) > 20 * 33
    return tmp / "data", docs, tok.token_to_id(EOS_TOKEN)


@pytest.mark.parametrize("seq_len, batch_size", [(32, 4), (12, 3)])
def test_every_target_of_a_long_document_once_per_epoch(long_doc, seq_len, batch_size):
    data, docs, eos = long_doc
    lay = hashing.make_layout(300, 4, 2, 1.37)
    ds = make_dataset(data, "heldout", seq_len=seq_len, batch_size=batch_size, vocab_size=300, seed=0, repeat=False)
    kw = dict(vocab_size=300, table_sizes=lay.table_sizes, max_n=4, splits=2, eos_id=eos)
    want_ids = [ngram_ids_reference(d[None], **kw)[0] for d in docs]  # each document hashed whole
    seen = Counter()
    for batch in ds:
        batch["ngram_ids"] = np.asarray(hashing.ngram_ids(batch["inputs"], segment_ids=batch["segment_ids"], **kw))
        for b in range(batch["inputs"].shape[0]):
            for t in np.flatnonzero(batch["loss_mask"][b]):
                x, y, p = int(batch["inputs"][b, t]), int(batch["targets"][b, t]), int(batch["positions"][b, t])
                seg = batch["segment_ids"][b] == batch["segment_ids"][b, t]  # the piece holding t: its document
                doc = next((i for i, d in enumerate(docs) if batch["positions"][b, seg].max() < len(d)
                            and (d[batch["positions"][b, seg]] == batch["inputs"][b, seg]).all()), None)
                assert doc is not None, f"row {b}: a piece whose positions are not its document's positions"
                assert (docs[doc][p], docs[doc][p + 1]) == (x, y)
                seen[(doc, p)] += 1
                # the real previous tokens are in the row, in the same segment, at consecutive positions
                h = min(p, HISTORY)
                assert t >= h and (batch["segment_ids"][b, t - h : t + 1] == batch["segment_ids"][b, t]).all()
                np.testing.assert_array_equal(batch["inputs"][b, t - h : t + 1], docs[doc][p - h : p + 1])
                np.testing.assert_array_equal(batch["positions"][b, t - h : t + 1], np.arange(p - h, p + 1))
                np.testing.assert_array_equal(batch["ngram_ids"][b, t], want_ids[doc][p])  # = whole-document ids
    want = Counter({(i, p): 1 for i, d in enumerate(docs) for p in range(len(d) - 1)})
    assert seen == want, (sorted(set(want) - set(seen))[:10], [k for k, v in seen.items() if v > 1][:10])


def test_prepare_keeps_every_target_when_it_splits_a_document(long_doc, tmp_path):
    """Records of a document longer than max_doc_tokens overlap by one token: no target is lost."""
    from array_record.python.array_record_module import ArrayRecordReader

    from ngram_jax.data.prepare import read_metadata

    data, docs, _ = long_doc
    src = tmp_path / "docs.jsonl"
    tok = load_tokenizer(data)
    src.write_text(json.dumps({"text": tok.decode(docs[0][:-1].tolist())}) + "\n")
    prepare([src], tmp_path / "split", tokenizer=data / "tokenizer.json", heldout_fraction=1.0, max_doc_tokens=50)
    meta = read_metadata(tmp_path / "split")
    records = []
    for f in meta["splits"]["heldout"]["files"]:
        reader = ArrayRecordReader(str(tmp_path / "split" / f))
        records += [np.frombuffer(r, np.int32) for r in reader.read_all()]
    assert len(records) > 10 and max(len(r) for r in records) <= 51
    np.testing.assert_array_equal(np.concatenate([records[0]] + [r[1:] for r in records[1:]]), docs[0])
    pairs = Counter((int(a), int(b)) for r in records for a, b in zip(r[:-1], r[1:], strict=True))
    assert pairs == Counter((int(a), int(b)) for a, b in zip(docs[0][:-1], docs[0][1:], strict=True))
