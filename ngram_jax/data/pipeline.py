"""grain input pipeline: ArrayRecord documents -> shuffled, repeated, per-process shards -> packed rows
with segment ids and positions -> next-token targets -> batches.

Every batch is a dict of numpy arrays, all [B, L]: ``inputs``, ``targets``, ``segment_ids`` (1, 2, ...
per packed piece, 0 for padding), ``positions`` (each token's position in its document), ``loss_mask``.
The model computes the n-gram ids of the inputs itself. The iterator is deterministic for a seed and
its state (``get_state``/``set_state``) is checkpointed with the model.

Documents longer than a row (L + 1 tokens) are cut into pieces that train on every target exactly
once (:class:`_Chunk`): a continuation piece repeats the ``HISTORY`` tokens before its first scored
target as context (their targets are masked out of the loss, they were scored in the previous
piece), so the n-gram history of every scored token is its real previous tokens (orders N <= 9)
without any model input beyond the row, and positions continue through the document. What a row
cannot give a continuation piece is attention to more than those ``HISTORY`` tokens of the earlier
document.
"""

from __future__ import annotations

import bisect
import os

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from ngram_jax import storage
from ngram_jax.data.prepare import read_metadata
from ngram_jax.errors import DataError


def _num_records(path: str) -> int:
    """Records in an array_record shard; a shard that does not read (truncated, damaged, not array_record)
    is a DataError naming it."""
    reader = ArrayRecordReader(path)
    ok, n = reader.ok(), reader.num_records()
    try:
        reader.close()
    except RuntimeError:  # array_record reports a damaged file here, without a message
        ok = False
    if not ok:
        raise DataError(f"{path}: not a readable array_record shard (truncated or damaged); prepare the data "
                        "again with python -m ngram_jax.data.prepare")
    return n


class TokenSource(grain.sources.RandomAccessDataSource):
    """Documents of one split as int32 arrays; an id outside [0, V) raises naming file and position."""

    def __init__(self, data_dir: str | os.PathLike, split: str, vocab_size: int):
        meta = read_metadata(data_dir)
        if split not in meta["splits"]:
            raise DataError(f"{data_dir}: no split {split!r} (have {', '.join(meta['splits'])})")
        directory = storage.location(data_dir, "data directory")
        # gs:// shards are read where they are, s3:// ones from a local copy (storage.readable_file)
        self.files = [storage.readable_file(directory / f) for f in meta["splits"][split]["files"]]
        with storage.reported(directory, "data directory"):
            counts = [_num_records(f) for f in self.files]
        self.starts = list(np.cumsum([0] + counts))
        self.vocab_size = vocab_size
        self._src = grain.sources.ArrayRecordDataSource(self.files)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        ids = np.frombuffer(self._src[index], np.int32)
        bad = np.flatnonzero((ids < 0) | (ids >= self.vocab_size))
        if bad.size:
            f = bisect.bisect_right(self.starts, index) - 1
            raise DataError(f"{self.files[f]}: record {index - self.starts[f]}, position {int(bad[0])}: token id "
                            f"{int(ids[bad[0]])} is outside the model vocabulary [0, {self.vocab_size}); prepare "
                            "the data again with the model's tokenizer")
        return ids


HISTORY = 8  # context tokens repeated at the start of a continuation piece (n-gram orders up to 9)


class _Chunk(grain.experimental.FlatMapTransform):
    """A document -> pieces of at most ``length`` tokens (a packed row) that score every target once.

    Piece 0 is tokens ``[0, length)``. With ``s`` the last token of the previous piece, the next
    piece is ``[s - h, s - h + length)``: its first ``h`` tokens are the real context before ``s``
    and the token ``s`` itself is its first scored input. Each piece carries ``positions`` (the
    tokens' positions in the document) and ``scored`` (1 on a token whose prediction trains here).
    """

    def __init__(self, length: int, history: int = HISTORY):
        self.length = length
        self.history = max(0, min(history, length - 2))  # >= 1 new target per piece
        self.max_fan_out = 1  # set by make_dataset from the longest record

    def flat_map(self, ids):
        n, pieces, s = len(ids), [], 0
        while True:
            a = max(0, s - self.history)
            b = min(a + self.length, n)
            index = np.arange(a, b, dtype=np.int32)
            pieces.append({"inputs": ids[a:b], "positions": index, "scored": (index > s).astype(np.int32)})
            if b >= n:
                return pieces
            s = b - 1

    def pieces(self, n: int) -> int:
        """How many pieces a document of ``n`` tokens gives."""
        if n <= self.length:
            return 1
        return 1 + -(-(n - self.length) // (self.length - 1 - self.history))


def _to_example(row: dict) -> dict:
    x, seg, pos, scored = row["inputs"], row["inputs_segment_ids"], row["positions"], row["scored"]
    return {
        "inputs": x[:-1].astype(np.int32),
        "targets": x[1:].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] > 0) & (scored[1:] > 0)).astype(np.float32),
    }


def make_dataset(data_dir: str | os.PathLike, split: str, *, seq_len: int, batch_size: int, vocab_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, repeat: bool = True) -> grain.IterDataset:
    """The pipeline as a grain ``IterDataset``; ``iter()`` it for a checkpointable iterator.

    ``batch_size`` is this process's share of the global batch. Every process builds the same global
    batches (``batch_size * process_count`` rows) and keeps its block of rows, so the data a step
    sees does not depend on the number of processes: a multi-process run trains exactly as one
    process with the same global mesh (the token pipeline is cheap next to the model step).
    """
    src = TokenSource(data_dir, split, vocab_size)
    ds = grain.MapDataset.source(src)
    if repeat:
        ds = ds.seed(seed).shuffle().repeat(None)
    local, batch_size = batch_size, batch_size * process_count
    meta = read_metadata(data_dir)
    chunk = _Chunk(seq_len + 1)
    chunk.max_fan_out = chunk.pieces(int(meta.get("max_doc_tokens", 2048)) + 1)  # records hold up to that + 1
    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), chunk)
    row = seq_len + 1
    it = grain.experimental.FirstFitPackIterDataset(it, length_struct={"inputs": row, "positions": row, "scored": row},
                                                    num_packing_bins=batch_size, seed=seed, shuffle_bins=repeat)
    it = it.map(_to_example).batch(batch_size, drop_remainder=repeat)
    if process_count > 1:
        lo = process_index * local
        it = it.map(lambda b: {k: v[lo : lo + local] for k, v in b.items()})
    return it
