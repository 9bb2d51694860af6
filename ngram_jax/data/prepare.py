"""Tokenize text into ArrayRecord shards (train and held-out) with a metadata file.

    python -m ngram_jax.data.prepare --input a.txt b.jsonl --train-bpe 4096 --out data/my_corpus
    python -m ngram_jax.data.prepare --input docs.jsonl --tokenizer path/to/tokenizer.json --out data/x
    python -m ngram_jax.data.prepare --bundled --train-bpe 4096 --out data/shakespeare

Each record is one document (or a piece of at most ``--max-doc-tokens`` + 1 tokens of one) as int32
bytes, ending with the EOS token. Consecutive pieces of a document share one token (the last of a
piece is the first of the next), so every next-token target of the document is in exactly one record;
the n-gram history and positions restart at such a record boundary (rare: raise ``--max-doc-tokens``;
the pipeline itself splits long records into rows without a reset). ``metadata.json`` records the
tokenizer hash, vocabulary size, EOS id, and record and token counts per split; ``tokenizer.json`` is
copied beside it. The output directory appears atomically, complete or not at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ngram_jax.data import corpus
from ngram_jax.data.tokenizer import eos_id, load_tokenizer, tokenizer_hash, train_bpe


def prepare(inputs: Sequence[str | Path], out: str | Path, *, tokenizer: str | Path | None = None,
            train_bpe_vocab: int | None = None, heldout_fraction: float = 0.02, seed: int = 0,
            doc_chars: int = 4000, max_doc_tokens: int = 2048, records_per_shard: int = 4096) -> dict:
    """Write ``out/{train,heldout}-NNNNN.array_record``, ``out/tokenizer.json``, ``out/metadata.json``."""
    out = Path(out)
    if (tokenizer is None) == (train_bpe_vocab is None):
        raise ValueError("give exactly one of tokenizer (a tokenizer.json) or train_bpe_vocab")
    docs: list[tuple[str, int, str]] = []  # (file, index in file, text)
    for path in inputs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input not found: {path}")
        docs += [(str(path), i, text) for i, text in enumerate(corpus.documents(path, doc_chars))]
    eval_only = heldout_fraction >= 1.0  # everything held out (evaluation data)
    if len(docs) < (1 if eval_only else 2):
        raise ValueError(f"need at least 2 documents to split train/held-out, got {len(docs)}")
    tok = load_tokenizer(tokenizer) if tokenizer is not None else train_bpe((d[2] for d in docs), train_bpe_vocab)
    vocab, eos = tok.get_vocab_size(), eos_id(tok)

    rng = np.random.default_rng(seed)
    heldout = rng.random(len(docs)) < heldout_fraction
    heldout[rng.integers(len(docs))] = True  # at least one held-out document
    if heldout.all() and not eval_only:
        heldout[0] = False
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"tokenizer_hash": tokenizer_hash(tok), "vocab_size": vocab, "eos_id": eos,
            "sources": sorted({d[0] for d in docs}), "max_doc_tokens": max_doc_tokens, "splits": {}}
    for split, mask in (("train", ~heldout), ("heldout", heldout)):
        texts = [d for d, h in zip(docs, mask, strict=True) if h]
        encodings = tok.encode_batch([t[2] for t in texts], add_special_tokens=False)
        files, n_records, n_tokens, writer = [], 0, 0, None
        for (src, index, _), enc in zip(texts, encodings, strict=True):
            ids = np.asarray(enc.ids + [eos], np.int64)
            bad = np.flatnonzero((ids < 0) | (ids >= vocab))
            if bad.size:
                raise ValueError(f"{src}: document {index}, token position {int(bad[0])}: id {int(ids[bad[0]])} "
                                 f"is outside the vocabulary [0, {vocab})")
            for start in range(0, max(len(ids) - 1, 1), max_doc_tokens):  # pieces overlap by one token
                if writer is None or n_records % records_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    files.append(f"{split}-{len(files):05d}.array_record")
                    writer = ArrayRecordWriter(str(tmp / files[-1]), "group_size:1")
                writer.write(ids[start : start + max_doc_tokens + 1].astype(np.int32).tobytes())
                n_records += 1
            n_tokens += len(ids)
        if writer is not None:
            writer.close()
        meta["splits"][split] = {"files": files, "records": n_records, "tokens": n_tokens, "documents": len(texts)}
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def read_metadata(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{data_dir}: no metadata.json; prepare the data with python -m ngram_jax.data.prepare")
    return json.loads(path.read_text())


def ensure_bundled(out: str | Path, vocab_size: int) -> dict:
    """Prepare the bundled Shakespeare corpus into ``out`` unless it is already there."""
    try:
        meta = read_metadata(out)
        if meta["vocab_size"] == vocab_size:
            return meta
    except FileNotFoundError:
        pass
    return prepare(corpus.bundled_corpus_files(), out, train_bpe_vocab=vocab_size)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ngram_jax.data.prepare", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help=".txt or .jsonl ({'text': ...} per line) files")
    ap.add_argument("--bundled", action="store_true", help="use the bundled Shakespeare corpus")
    tk = ap.add_mutually_exclusive_group(required=True)
    tk.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (or a directory holding one)")
    tk.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    ap.add_argument("--out", required=True)
    ap.add_argument("--heldout-fraction", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-doc-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    inputs = list(args.input) + ([str(p) for p in corpus.bundled_corpus_files()] if args.bundled else [])
    if not inputs:
        ap.error("give --input files or --bundled")
    try:
        meta = prepare(inputs, args.out, tokenizer=args.tokenizer, train_bpe_vocab=args.train_bpe,
                       heldout_fraction=args.heldout_fraction, seed=args.seed, max_doc_tokens=args.max_doc_tokens)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    s = meta["splits"]
    print(f"{args.out}: vocab {meta['vocab_size']}, eos {meta['eos_id']}, train {s['train']['tokens']:,} tokens "
          f"in {s['train']['records']:,} records, held-out {s['heldout']['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
