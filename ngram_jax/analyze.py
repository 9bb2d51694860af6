"""Checkpoint analysis: parameter budget, N-gram row usage and collisions, each n-gram order's share
of the fused embedding, expert load per layer; printed, saved as JSON and plotted (PNG).

    python -m ngram_jax.analyze runs/train_tiny [--text FILE] [--max-tokens 4096] [--out DIR]

LongCat-Flash-Lite's N-gram table holds 31.4B parameters, more than an analysis host's memory: the
token and N-gram tables are never loaded whole. Their rows are read lazily from the checkpoint with
tensorstore (training saves them in row chunks), only the rows the sample text needs; every other
parameter is read whole. Whole-table statistics (row norms of every row of every sub-table) stream the
tables in slabs of at most ``STREAM_BYTES``, and row reads take at most that much at a time, so a table
never has to fit in host memory (tested with a table 3x the memory limit: docs/EVALUATION.md).
``bytes_read`` reports what the lazy reads cost. From Python: ``analyze(run_dir)`` returns the report;
``LazyCheckpoint(run_dir)`` reads arrays, rows (``rows``) and slabs (``row_slabs``) of a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from ngram_jax import storage
from ngram_jax.budget import parameter_budget
from ngram_jax.checkpoint import Checkpointer, find_checkpoints, is_blocked
from ngram_jax.config import Config, from_dict
from ngram_jax.errors import DataError
from ngram_jax.model import build_model, default_positions
from ngram_jax.ngram.lookup import RowUsage, table_paths
from ngram_jax.tools.collisions import collision_report

STREAM_BYTES = 16 << 20  # whole-table statistics read the tables in slabs of at most this many bytes


class LazyCheckpoint:
    """Arrays of one saved training state, opened with tensorstore and read on demand."""

    def __init__(self, path: str | os.PathLike, step: int | None = None):
        ckpt = Checkpointer(find_checkpoints(path))
        try:
            self.step = ckpt.latest_step() if step is None else step
            if self.step is None:
                raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
            self.config: Config = from_dict(ckpt.read_meta(self.step)["config"])
        finally:
            ckpt.close()
        self.base = ckpt.directory / str(self.step) / "state"  # a local path or a URL
        self.bytes_read = 0  # whole arrays
        self.table_bytes_read = 0  # row chunks of lazily read tables
        self.stream_bytes_read = 0  # slabs of tables streamed whole (row_slabs)

    def model(self):
        """The checkpoint's model with every parameter read whole except the input embedding's tables and
        row-usage map, which are left empty (0 rows; the tied LM head keeps its table): for checkpoints
        whose tables do not fit in memory. Their rows come from :meth:`rows` and :meth:`row_slabs`."""
        cfg = self.config
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
        lazy_paths = {p for p in table_paths(abstract) if p[0] == "embed"}
        lazy_paths |= {tuple(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract.embed, RowUsage))}
        if cfg.model.tie_embeddings:
            lazy_paths.discard(("embed", "embedding"))
        graphdef, state = nnx.split(abstract)
        pure = nnx.to_pure_dict(state)

        def fill(path, leaf):
            names = tuple(str(getattr(p, "key", p)) for p in path)
            if names in lazy_paths or (names[0] == "embed" and names[1:] in lazy_paths):
                return jnp.zeros((0, *leaf.shape[1:]), leaf.dtype)  # never read by the trunk
            return jnp.asarray(self.read(names, leaf.shape), leaf.dtype)

        nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, pure))
        return nnx.merge(graphdef, state)

    def open(self, path: Sequence[str]) -> ts.TensorStore:
        key = ".".join(("model", *map(str, path)))
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": storage.kvstore(self.base), "path": key}}
        return ts.open(spec, read=True).result()

    def read(self, path: Sequence[str], shape: Sequence[int]) -> np.ndarray:
        """The whole array, of logical ``shape`` (arrays stored in row blocks are unblocked)."""
        arr = self.open(path)
        self.bytes_read += arr.size * arr.dtype.numpy_dtype.itemsize
        out = arr.read().result()
        return out.reshape(shape) if is_blocked(arr.shape, tuple(shape)) else out

    def _table(self, path: Sequence[str], ndim: int):
        """``(store, blocked, rows per chunk, rows, bytes per row)`` of a saved ``ndim``-D table; ``blocked``:
        stored as ``[R/c, c, ...]`` blocks, one chunk each."""
        arr = self.open(path)
        blocked = arr.ndim == ndim + 1
        chunk_rows = arr.shape[1] if blocked else arr.chunk_layout.read_chunk.shape[0]
        rows_total = arr.shape[0] * (arr.shape[1] if blocked else 1)
        row_bytes = int(np.prod(arr.shape[2 if blocked else 1 :])) * arr.dtype.numpy_dtype.itemsize
        return arr, blocked, chunk_rows, rows_total, row_bytes

    def rows(self, path: Sequence[str], ids: np.ndarray, ndim: int = 2, max_bytes: int = STREAM_BYTES
             ) -> np.ndarray:
        """``table[ids]`` of an ``ndim``-D table, reading only the chunks that hold ``ids``, at most
        ``max_bytes`` of chunks at a time (at least one chunk); counts the bytes of those chunks."""
        arr, blocked, chunk_rows, rows_total, row_bytes = self._table(path, ndim)
        shape = np.shape(ids)
        ids = np.asarray(ids).reshape(-1)
        of = ids // chunk_rows
        chunks = np.unique(of)
        rows_in_chunks = sum(min(chunk_rows, rows_total - c * chunk_rows) for c in chunks.tolist())
        self.table_bytes_read += rows_in_chunks * row_bytes
        out = np.empty((ids.size, *arr.shape[(2 if blocked else 1) :]), arr.dtype.numpy_dtype)
        order = np.argsort(of, kind="stable")
        sorted_of = of[order]
        per_read = max(1, max_bytes // max(chunk_rows * row_bytes, 1))  # chunks per tensorstore read
        for first in range(0, chunks.size, per_read):  # the ids in per_read consecutive touched chunks
            lo = np.searchsorted(sorted_of, chunks[first], side="left")
            hi = np.searchsorted(sorted_of, chunks[min(first + per_read, chunks.size) - 1], side="right")
            where = order[lo:hi]
            part = ids[where]
            out[where] = (arr[part // chunk_rows, part % chunk_rows] if blocked else arr[part]).read().result()
        return out.reshape(*shape, *out.shape[1:])

    def row_slabs(self, path: Sequence[str], ndim: int = 2, max_bytes: int = STREAM_BYTES
                  ) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, table[first_row : first_row + n])`` over the whole table, in slabs of whole storage
        chunks of at most ``max_bytes`` (at least one chunk): the table is never held whole. Counts the bytes."""
        arr, blocked, chunk_rows, rows_total, row_bytes = self._table(path, ndim)
        chunks_per_slab = max(1, max_bytes // max(chunk_rows * row_bytes, 1))
        step = chunks_per_slab * chunk_rows
        for start in range(0, rows_total, step):
            stop = min(start + step, rows_total)
            if blocked:  # [R/c, c, ...]: slabs are whole blocks
                out = arr[start // chunk_rows : -(-stop // chunk_rows)].read().result()
                out = out.reshape(-1, *out.shape[2:])[: stop - start]
            else:
                out = arr[start:stop].read().result()
            self.stream_bytes_read += (stop - start) * row_bytes
            yield start, out


NORM_BINS = np.logspace(-8, 4, 241)  # row-norm histogram edges (log-spaced, 20 per decade)


def row_norm_stats(lazy: LazyCheckpoint, path: Sequence[str], bounds: Sequence[tuple[str, int, int]],
                   max_bytes: int = STREAM_BYTES) -> list[dict]:
    """Row L2-norm statistics of each ``(name, first_row, end_row)`` range of a saved table, streamed in
    slabs (``LazyCheckpoint.row_slabs``): count, mean, std, max, rows that are all zero, and the 10/50/90th
    percentiles from a log-spaced histogram (``NORM_BINS``: about 12% relative resolution)."""
    acc = [{"count": 0, "sum": 0.0, "sumsq": 0.0, "max": 0.0, "zero": 0, "hist": np.zeros(len(NORM_BINS) + 1, np.int64)}
           for _ in bounds]
    for start, slab in lazy.row_slabs(path, max_bytes=max_bytes):
        flat = slab.reshape(slab.shape[0], -1)
        norms = np.concatenate([np.sqrt(np.einsum("ij,ij->i", b, b, dtype=np.float64))  # [n], float64 sums
                                for b in np.array_split(flat, -(-flat.shape[0] // 65536))])
        for a, (_, lo, hi) in zip(acc, bounds, strict=True):
            part = norms[max(lo - start, 0) : max(min(hi - start, len(norms)), 0)]
            if part.size:
                a["count"] += part.size
                a["sum"] += float(part.sum())
                a["sumsq"] += float(np.square(part).sum())
                a["max"] = max(a["max"], float(part.max()))
                a["zero"] += int((part == 0).sum())
                a["hist"] += np.bincount(np.searchsorted(NORM_BINS, part), minlength=len(NORM_BINS) + 1)
    out = []
    for a, (name, lo, hi) in zip(acc, bounds, strict=True):
        n = max(a["count"], 1)
        mean = a["sum"] / n
        cdf = np.cumsum(a["hist"]) / n
        edges = np.concatenate([[0.0], NORM_BINS])  # bin i holds norms in (edges[i], edges[i + 1]]

        def pct(q, cdf=cdf, edges=edges):
            i = int(np.searchsorted(cdf, q))
            return float(edges[min(i + 1, len(edges) - 1)])

        std = float(np.sqrt(max(a["sumsq"] / n - mean**2, 0.0)))
        out.append({"table": name, "rows": hi - lo, "mean": mean, "std": std,
                    "max": a["max"], "zero_rows": a["zero"], "p10": pct(0.1), "p50": pct(0.5), "p90": pct(0.9),
                    "hist": a["hist"].tolist()})
    return out


def sample_tokens(cfg: Config, text: str | None, max_tokens: int) -> np.ndarray:
    """int32 [B, L] from a text file (the run's tokenizer) or the run's held-out data."""
    from ngram_jax.data.pipeline import make_dataset

    seq = cfg.data.seq_len
    if text is not None:
        from ngram_jax.data.tokenizer import load_tokenizer

        tokenizer = storage.location(cfg.data.path, "data.path") / "tokenizer.json"
        sample = storage.read_text(text, "--text")
        ids = load_tokenizer(tokenizer).encode(sample).ids
        ids = np.asarray(ids[: max(seq, max_tokens // seq * seq)], np.int32)
        if ids.size and int(ids.max()) >= cfg.model.vocab_size:
            raise DataError(f"{tokenizer} (the run's data.path) gives token ids up to {int(ids.max())}, the model "
                            f"has model.vocab_size={cfg.model.vocab_size}: the run's data was not tokenized with it")
        if ids.size < seq:
            ids = np.pad(ids, (0, seq - ids.size), constant_values=cfg.model.eos_id or 0)
        return ids[: ids.size // seq * seq].reshape(-1, seq)
    ds = make_dataset(cfg.data.path, "heldout", seq_len=seq, batch_size=1, vocab_size=cfg.model.vocab_size, seed=0,
                      repeat=False)
    rows = []
    for batch in ds:
        rows.append(batch["inputs"][0])
        if len(rows) * seq >= max_tokens:
            break
    return np.stack(rows)


def analyze(path: str | os.PathLike, *, step: int | None = None, text: str | None = None, max_tokens: int = 4096,
            out: str | os.PathLike | None = None, plots: bool = True, row_norms: bool = True) -> dict:
    """The report (also saved as ``analysis.json``). ``row_norms=False`` skips the whole-table streamed
    statistics, which read every block of every table. ``path`` and ``out`` may be ``gs://`` / ``s3://``
    URLs (the table rows are then read lazily from the bucket)."""
    lazy = LazyCheckpoint(path, step)
    cfg, m = lazy.config, lazy.config.model
    budget = parameter_budget(cfg)
    report: dict = {"step": lazy.step, "budget": budget, "ngram_share": budget["ngram"] / budget["total"]}
    tokens = sample_tokens(cfg, text, max_tokens)  # [B, L]
    seg = np.ones_like(tokens)
    report["sample_tokens"] = int(tokens.size)

    model = lazy.model()  # tables are read row by row below
    embed = model.embed
    base = lazy.rows(("embed", "embedding"), np.unique(tokens))
    base_rows = dict(zip(np.unique(tokens).tolist(), base, strict=True))
    e0 = np.stack([base_rows[t] for t in tokens.ravel().tolist()]).reshape(*tokens.shape, -1)  # [B, L, D]
    fused = jnp.asarray(e0, jnp.dtype(m.dtype))
    if m.ngram.enabled:
        lay = embed.layout
        t = lay.num_tables
        flat = np.asarray(embed.row_ids(jnp.asarray(tokens)))  # [B, L, T]: the model's own n-gram ids
        uniq, inverse = np.unique(flat, return_inverse=True)
        rows = lazy.rows(("embed", "ngram_table"), uniq)[inverse.reshape(flat.shape)]  # [B, L, T, d_e]
        rows = jnp.asarray(rows, jnp.dtype(m.dtype))
        fused = embed.combine(fused, rows)  # the projected mean, as in the forward pass
        per_table = np.asarray(embed.project(rows), np.float64)  # [B, L, T, D]
        norm = np.linalg.norm(np.asarray(fused, np.float64), axis=-1).mean()
        report["embedding_share"] = {"token (1-gram)": float(np.linalg.norm(e0 / (1 + t), axis=-1).mean() / norm)}
        for n in range(2, lay.max_n + 1):
            part = per_table[:, :, (n - 2) * lay.splits : (n - 1) * lay.splits].sum(2) / (1 + t)
            report["embedding_share"][f"{n}-gram"] = float(np.linalg.norm(part, axis=-1).mean() / norm)
        ids = flat - np.asarray(lay.row_offsets)
        used = [len(np.unique(ids[..., i])) for i in range(t)]
        report["row_usage"] = [{"table": i, "order": lay.order_of(i), "size": lay.table_sizes[i], "rows_used": used[i],
                                "fraction": used[i] / lay.table_sizes[i]} for i in range(t)]
        report["collisions"] = [
            {"order": r.order, "split": r.split, "distinct": r.distinct, "buckets_used": r.buckets_used,
             "collisions": r.collisions, "rate": r.collisions / max(r.distinct, 1), "vs_random": r.vs_random}
            for r in collision_report(tokens, vocab_size=m.vocab_size, ratios=[m.ngram.ratio], max_n=m.ngram.max_n,
                                      splits=m.ngram.splits, eos_id=m.eos_id)]
        fused = embed.amplify(fused)
    report["table_bytes"] = {}
    for tpath in table_paths(model):
        if tpath[0] == "embed":
            arr = lazy.open(tpath)
            report["table_bytes"][tpath[-1]] = int(np.prod(arr.shape)) * arr.dtype.numpy_dtype.itemsize
    # whole-table statistics, streamed: the tables are never read whole
    report["row_norms"] = []
    if row_norms:
        report["row_norms"] = row_norm_stats(lazy, ("embed", "embedding"), [("token", 0, m.vocab_size)])
    if row_norms and m.ngram.enabled:
        lay = embed.layout
        bounds = [(f"{lay.order_of(i)}-gram/{i}", lay.row_offsets[i], lay.row_offsets[i] + lay.table_sizes[i])
                  for i in range(lay.num_tables)]
        report["row_norms"] += row_norm_stats(lazy, ("embed", "ngram_table"), bounds)
    if m.moe.num_experts:
        h = fused
        ple = None
        if model.ple is not None:  # per-layer tables are read whole by LazyCheckpoint.model
            ple = model.ple(tokens, segment_ids=seg)
        counts = []
        trunk = nnx.jit(lambda mdl, x, pos, pl: mdl.trunk(x, pos, None, pl))
        positions = default_positions(tokens[:1].shape, None)
        for i in range(tokens.shape[0]):  # one row at a time: the routing counts of each forward pass
            trunk(model, h[i : i + 1], positions, None if ple is None else ple[i : i + 1])
            counts.append(np.stack([np.asarray(b.moe.counts[...]) for b in model.blocks]))
        load = np.sum(counts, axis=0)  # [layers, E + Z]
        report["expert_load"] = load.tolist()
        real = load[:, : m.moe.num_experts].astype(float)
        report["expert_load_max_over_mean"] = (real.max(1) / np.maximum(real.mean(1), 1e-9)).tolist()
    report["bytes_read"] = {"table_rows": lazy.table_bytes_read, "table_stream": lazy.stream_bytes_read,
                            "other_parameters": lazy.bytes_read}
    out = storage.output_dir(out if out is not None else find_checkpoints(path).parent / "analysis", "--out")
    with storage.reported(out, "--out"):
        (out / "analysis.json").write_text(json.dumps(report, indent=1))
    if plots:
        report["plots"] = _plots(report, out)
    return report


def _plots(report: dict, out) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    if "embedding_share" in report:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(report["embedding_share"]), list(report["embedding_share"].values()))
        ax.set_ylabel("mean |part| / mean |fused|")
        ax.set_title("contribution to the fused embedding")
        files.append(_save(fig, out / "embedding_share.png"))
        fig, ax = plt.subplots(figsize=(5, 3))
        usage = report["row_usage"]
        ax.bar([f"{u['order']}g/{u['table']}" for u in usage], [u["fraction"] for u in usage])
        ax.set_ylabel("fraction of rows used by the sample")
        ax.set_title("N-gram table row usage")
        files.append(_save(fig, out / "row_usage.png"))
    if report.get("row_norms"):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        centers = np.sqrt(NORM_BINS[:-1] * NORM_BINS[1:])  # geometric bin centres of the inner bins
        for r in report["row_norms"]:
            h = np.asarray(r["hist"][1:-1], float)
            ax.plot(centers, h / max(r["rows"], 1), label=r["table"], lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("row L2 norm")
        ax.set_ylabel("fraction of rows per bin")
        ax.set_title("table row norms (every row, streamed)")
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "row_norms.png"))
    if "expert_load" in report:
        load = np.asarray(report["expert_load"], float)
        fig, ax = plt.subplots(figsize=(6, 1 + 0.5 * load.shape[0]))
        im = ax.imshow(load / load.sum(1, keepdims=True), aspect="auto", cmap="viridis")
        ax.set_xlabel("expert (real, then zero experts)")
        ax.set_ylabel("layer")
        ax.set_title("share of routed assignments")
        fig.colorbar(im, ax=ax)
        files.append(_save(fig, out / "expert_load.png"))
    return files


def _save(fig, path) -> str:
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.analyze", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a training run directory (or its checkpoints directory)")
    ap.add_argument("--step", type=int)
    ap.add_argument("--text", help="a text file to analyse (default: the run's held-out data)")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", help="output directory (default: RUN_DIR/analysis)")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--no-row-norms", action="store_true",
                    help="skip the row norms of every table row (they stream every block of every table)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error(f"--max-tokens {args.max_tokens} must be >= 1")
    if args.text is not None and not storage.check(args.text, "--text").is_file():
        from ngram_jax.errors import MissingInputError

        raise MissingInputError(f"--text {args.text}: no such file (give a text file to analyse, or leave --text "
                                "out to use the run's held-out data)")
    find_checkpoints(args.checkpoint)  # a missing run directory fails first
    r = analyze(args.checkpoint, step=args.step, text=args.text, max_tokens=args.max_tokens, out=args.out,
                plots=not args.no_plots, row_norms=not args.no_row_norms)
    b = r["budget"]
    print(f"step {r['step']}: {b['total']:,} parameters, N-gram share {r['ngram_share']:.1%}, activated "
          f"{b['activated_min']:,} to {b['activated_max']:,}")
    for name, share in r.get("embedding_share", {}).items():
        print(f"  {name:<16} {share:.3f} of the fused embedding norm")
    for c in r.get("collisions", []):
        print(f"  {c['order']}-gram table {c['split']}: {c['distinct']:,} distinct, collision rate {c['rate']:.4f} "
              f"({c['vs_random']:.2f}x random)")
    for n in r.get("row_norms", []):
        print(f"  {n['table']:<12} {n['rows']:>12,} rows: norm mean {n['mean']:.4g} (p10 {n['p10']:.3g}, p50 "
              f"{n['p50']:.3g}, p90 {n['p90']:.3g}, max {n['max']:.3g}), {n['zero_rows']:,} all-zero rows")
    for i, x in enumerate(r.get("expert_load_max_over_mean", [])):
        print(f"  layer {i}: expert load max/mean {x:.2f}")
    print(f"  read {r['bytes_read']['table_rows']:,} B of table row chunks for {r['sample_tokens']:,} sample tokens "
          f"(tables: " + ", ".join(f"{k} {v:,} B" for k, v in r["table_bytes"].items())
          + f"), {r['bytes_read']['table_stream']:,} B of tables streamed for the row norms, "
          f"{r['bytes_read']['other_parameters']:,} B of other parameters")
    for f in r.get("plots", []):
        print(f"  plot: {f}")
    return 0


if __name__ == "__main__":
    from ngram_jax import cli

    sys.exit(cli.run(main))
