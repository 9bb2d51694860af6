"""grain input pipeline: ArrayRecord documents -> shuffled, repeated, per-process shards -> packed rows
with segment ids and positions -> next-token targets -> batches.

Every batch is a dict of numpy arrays, all [B, L]: ``inputs``, ``targets``, ``segment_ids`` (1, 2, ...
per document, 0 for padding), ``positions`` (restarting per document), ``loss_mask``. The model
computes the n-gram ids of the inputs itself. The iterator is deterministic for a seed and its state
(``get_state``/``set_state``) is checkpointed with the model.
"""

from __future__ import annotations

import bisect
from pathlib import Path

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordReader

from ngram_jax.data.prepare import read_metadata


class TokenSource(grain.sources.RandomAccessDataSource):
    """Documents of one split as int32 arrays; an id outside [0, V) raises naming file and position."""

    def __init__(self, data_dir: str | Path, split: str, vocab_size: int):
        meta = read_metadata(data_dir)
        if split not in meta["splits"]:
            raise ValueError(f"{data_dir}: no split {split!r} (have {', '.join(meta['splits'])})")
        self.files = [str(Path(data_dir) / f) for f in meta["splits"][split]["files"]]
        counts = [ArrayRecordReader(f).num_records() for f in self.files]
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
            raise ValueError(f"{self.files[f]}: record {index - self.starts[f]}, position {int(bad[0])}: token id "
                             f"{int(ids[bad[0]])} is outside the model vocabulary [0, {self.vocab_size})")
        return ids


class _Chunk(grain.experimental.FlatMapTransform):
    """Split documents longer than a packed row into row-sized pieces."""

    def __init__(self, length: int, max_pieces: int):
        self.length, self.max_fan_out = length, max_pieces

    def flat_map(self, ids):
        return [{"inputs": ids[start : start + self.length]} for start in range(0, len(ids), self.length)]


def _to_example(row: dict) -> dict:
    x, seg, pos = row["inputs"], row["inputs_segment_ids"], row["inputs_positions"]
    return {
        "inputs": x[:-1].astype(np.int32),
        "targets": x[1:].astype(np.int32),
        "segment_ids": seg[:-1].astype(np.int32),
        "positions": pos[:-1].astype(np.int32),
        "loss_mask": ((seg[1:] == seg[:-1]) & (seg[:-1] > 0)).astype(np.float32),
    }


def make_dataset(data_dir: str | Path, split: str, *, seq_len: int, batch_size: int, vocab_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1, repeat: bool = True) -> grain.IterDataset:
    """The pipeline as a grain ``IterDataset``; ``iter()`` it for a checkpointable iterator.

    ``batch_size`` is this process's share of the global batch.
    """
    src = TokenSource(data_dir, split, vocab_size)
    ds = grain.MapDataset.source(src)
    if repeat:
        ds = ds.seed(seed).shuffle().repeat(None)
    ds = ds[process_index::process_count]
    meta = read_metadata(data_dir)
    max_pieces = -(-int(meta.get("max_doc_tokens", 2048)) // (seq_len + 1)) + 1
    it = grain.experimental.FlatMapIterDataset(ds.to_iter_dataset(), _Chunk(seq_len + 1, max_pieces))
    it = grain.experimental.FirstFitPackIterDataset(it, length_struct={"inputs": seq_len + 1},
                                                    num_packing_bins=batch_size, seed=seed, shuffle_bins=repeat)
    it = it.map(_to_example).batch(batch_size, drop_remainder=repeat)
    return it
