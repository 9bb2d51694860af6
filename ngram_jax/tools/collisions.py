"""Collision report: how many distinct n-grams share a hash bucket, per order and table size.

    python -m ngram_jax.tools.collisions --zipf 32768,1.05,200000 --ratios 8,8.37,8.5
    python -m ngram_jax.tools.collisions --tokens tokens.npy --vocab-size 32768 --ratios 8,8.37
    python -m ngram_jax.tools.collisions --data data/study --max-tokens 5000000 --ratios 2,2.02,2.37,3

For every table ratio r, n-gram order n and hash k it hashes every position of the token stream
exactly as the model does (:func:`ngram_jax.ngram.hashing.ngram_ids`) and reports the distinct
n-grams, the buckets they use, the collisions (distinct - buckets used) and the ratio of those
collisions to what an ideal random hash into the same table would give. The paper (section 3.2.2)
finds table sizes near integer or simple-fraction multiples of V collide more, 2-grams most.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ngram_jax.ngram import hashing


@dataclass(frozen=True)
class CollisionRow:
    ratio: float
    order: int
    split: int
    table_size: int
    distinct: int
    buckets_used: int
    collisions: int
    expected_random: float  # collisions an ideal random hash would give

    @property
    def vs_random(self) -> float:
        return self.collisions / self.expected_random if self.expected_random > 0 else float("nan")


def expected_random_collisions(distinct: int, table_size: int) -> float:
    """E[distinct - buckets used] when ``distinct`` keys fall uniformly into ``table_size`` buckets."""
    used = table_size * -np.expm1(distinct * np.log1p(-1.0 / table_size))
    return float(distinct - used)


def zipf_tokens(vocab_size: int, exponent: float, count: int, seed: int = 0) -> np.ndarray:
    """i.i.d. tokens with P(id = k) proportional to (k + 1)^-exponent (id 0 most frequent)."""
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent
    return np.random.default_rng(seed).choice(vocab_size, size=count, p=p / p.sum()).astype(np.int32)


def corpus_tokens(data_dir, split: str = "train", max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
    """The documents of a prepared data directory's split, concatenated in file order (each ends with
    its EOS, which resets the n-gram history), up to ``max_tokens``; and the directory's metadata."""
    from array_record.python.array_record_module import ArrayRecordReader

    from ngram_jax import storage
    from ngram_jax.data.prepare import read_metadata
    from ngram_jax.errors import DataError

    meta = read_metadata(data_dir)
    if split not in meta["splits"]:
        raise DataError(f"{data_dir}: no split {split!r} (have {', '.join(meta['splits'])})")
    parts, total = [], 0
    for name in meta["splits"][split]["files"]:
        reader = ArrayRecordReader(storage.readable_file(storage.location(data_dir) / name))
        for rec in reader.read_all():
            ids = np.frombuffer(rec, np.int32)
            parts.append(ids)
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
        reader.close()
        if max_tokens is not None and total >= max_tokens:
            break
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    return (tokens[:max_tokens] if max_tokens is not None else tokens), meta


def collision_report(tokens: np.ndarray, *, vocab_size: int, ratios: Sequence[float], max_n: int = 3,
                     splits: int = 1, eos_id: int | None = None) -> list[CollisionRow]:
    """One row per (ratio, order, split). tokens: int [S] or [B, S] (rows are separate sequences)."""
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None, :]
    hashing.check_token_ids(tokens, vocab_size)
    hist = np.asarray(hashing.history(tokens.astype(np.int32), max_n, eos_id, None))  # [B, S, N-1]
    # n-gram keys as tuples (x_t, x~_{t-1}, ..., x~_{t-n+1}), zero history included
    windows = np.concatenate([tokens[..., None], hist], axis=-1).reshape(-1, max_n)  # [B*S, N]
    distinct_keys = {n: np.unique(windows[:, :n], axis=0) for n in range(2, max_n + 1)}
    rows = []
    for ratio in ratios:
        lay = hashing.make_layout(vocab_size, max_n, splits, ratio)
        for n in range(2, max_n + 1):
            keys = distinct_keys[n]  # [D, n]
            padded = np.zeros((len(keys), max_n - 1), np.int32)
            padded[:, : n - 1] = keys[:, 1:]  # orders above n see zeros; only order n is read below
            ids = np.asarray(hashing.ids_from_history(
                keys[:, 0].astype(np.int32), padded, vocab_size=vocab_size,
                table_sizes=lay.table_sizes, max_n=max_n))  # [D, T]
            for k in range(splits):
                idx = (n - 2) * splits + k
                used = len(np.unique(ids[:, idx]))
                m = lay.table_sizes[idx]
                rows.append(CollisionRow(float(ratio), n, k, m, len(keys), used, len(keys) - used,
                                         expected_random_collisions(len(keys), m)))
    return rows


def format_report(rows: Sequence[CollisionRow], vocab_size: int) -> str:
    head = (f"{'ratio':>8} {'n':>2} {'k':>2} {'table':>11} {'M/V':>9} {'distinct':>9} {'used':>9} "
            f"{'collisions':>10} {'random':>9} {'vs random':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.ratio:>8g} {r.order:>2} {r.split:>2} {r.table_size:>11,} "
                     f"{r.table_size / vocab_size:>9.4f} {r.distinct:>9,} {r.buckets_used:>9,} "
                     f"{r.collisions:>10,} {r.expected_random:>9.1f} {r.vs_random:>8.2f}x")
    lines.append("")
    lines.append("summary (all orders): ratio -> collisions / ideal random hash")
    for ratio in dict.fromkeys(r.ratio for r in rows):
        sel = [r for r in rows if r.ratio == ratio]
        got, exp = sum(r.collisions for r in sel), sum(r.expected_random for r in sel)
        lines.append(f"  {ratio:g}: {got:,} collisions vs {exp:,.0f} random ({got / exp:.2f}x)")
    return "\n".join(lines)


def _parse_zipf(text: str) -> tuple[int, float, int]:
    try:
        v, e, c = text.split(",")
        return int(v), float(e), int(c)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--zipf wants V,EXPONENT,COUNT (e.g. 32768,1.05,200000), got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.tools.collisions", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="a .npy file of integer token ids, shape [S] or [B, S]")
    src.add_argument("--zipf", type=_parse_zipf, help="synthetic i.i.d. Zipf tokens: V,EXPONENT,COUNT")
    src.add_argument("--data", help="a prepared data directory (python -m ngram_jax.data.prepare): its documents, "
                                    "with its vocabulary size and EOS")
    ap.add_argument("--split", default="train", help="--data: the split to read (default train)")
    ap.add_argument("--max-tokens", type=int, help="--data: read at most this many tokens")
    ap.add_argument("--ratios", required=True,
                    help="comma-separated table ratios r (sub-table size ~ r*V), e.g. 8,8.37,8.5")
    ap.add_argument("--vocab-size", type=int, help="V (required with --tokens; default: max id + 1)")
    ap.add_argument("--max-n", type=int, default=3, help="highest n-gram order N (default 3)")
    ap.add_argument("--splits", type=int, default=1, help="hashes per order K (default 1)")
    ap.add_argument("--eos-id", type=int, default=None, help="token that resets the history")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = ap.parse_args(argv)

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--ratios must be numbers separated by commas, got {args.ratios!r}")
    if args.zipf:
        vocab, exponent, count = args.zipf
        tokens = zipf_tokens(vocab, exponent, count, args.seed)
    elif args.data:
        tokens, meta = corpus_tokens(args.data, args.split, args.max_tokens)
        vocab = args.vocab_size or meta["vocab_size"]
        if args.eos_id is None:
            args.eos_id = meta["eos_id"]
    else:
        try:
            tokens = np.load(args.tokens)
        except (ValueError, OSError, EOFError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            from ngram_jax.errors import DataError

            raise DataError(f"--tokens {args.tokens}: not a .npy array of token ids ({err})") from None
        if not np.issubdtype(tokens.dtype, np.integer):
            ap.error(f"{args.tokens}: expected integer token ids, got dtype {tokens.dtype}")
        vocab = args.vocab_size or int(tokens.max()) + 1
    try:
        rows = collision_report(tokens, vocab_size=vocab, ratios=ratios, max_n=args.max_n,
                                splits=args.splits, eos_id=args.eos_id)
    except ValueError as err:  # ids outside [0, V), or an impossible table layout
        ap.error(str(err))
    if args.json:
        print(json.dumps([asdict(r) | {"vs_random": r.vs_random} for r in rows], indent=1))
    else:
        print(f"V={vocab}, {tokens.size:,} tokens, N={args.max_n}, K={args.splits}")
        print(format_report(rows, vocab))
    return 0


if __name__ == "__main__":
    from ngram_jax import cli

    sys.exit(cli.run(main))
