"""Run a study sweep, or report on one.

    python -m ngram_jax.study configs/paper/ne_vs_moe.yaml [--out DIR] [--scale cpu|gpu]
                              [--set key=value ...] [--only RUN ...] [--max-runs N] [--list]
    python -m ngram_jax.study report DIR [DIR ...] [--doc docs/STUDY.md --conclusions FILE]

A sweep file (``configs/paper/*.yaml``, see ``ngram_jax/study/sweep.py``) names a base config and a grid
(or list) of overrides. Every run is expanded and validated, and the data checked, before anything
trains. Finished runs are appended to DIR/results.jsonl (default DIR: runs/study/SWEEP-SCALE) and
skipped on a rerun; an interrupted run resumes from its last checkpoint. ``--set`` applies an override
to every run (e.g. train.steps=10 for a smoke run); ``--only`` trains just the runs it names (shell-style
patterns: ``--only 'hi-*'``), in the order given; ``--max-runs`` stops after N runs; ``--list``
prints the runs with their parameter counts and trains nothing. ``report`` writes DIR/report.md and
PNG plots from DIR/results.jsonl; ``--doc`` also joins every DIR's tables and plots and a file of written
conclusions into one document (docs/STUDY.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ngram_jax import cli


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "report":
        ap = cli.ArgumentParser(prog="python -m ngram_jax.study report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        ap.add_argument("dirs", nargs="+", metavar="DIR", help="sweep output directories (holding results.jsonl)")
        ap.add_argument("--doc", help="also write one document over all DIRs (e.g. docs/STUDY.md)")
        ap.add_argument("--conclusions", help="--doc: a markdown file of written conclusions appended to it")
        args = ap.parse_args(argv[1:])
        if args.conclusions and not args.doc:
            ap.error("--conclusions needs --doc")
        from ngram_jax.study.report import write_document, write_report

        for d in args.dirs:
            path, figures = write_report(d)
            print(f"wrote {path} and {len(figures)} plots")
        if args.doc:
            print(f"wrote {write_document(args.dirs, args.doc, args.conclusions)}")
        return 0
    ap = cli.ArgumentParser(prog="python -m ngram_jax.study", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep", help="a sweep file, e.g. configs/paper/ne_vs_moe.yaml (or 'report DIR')")
    ap.add_argument("--out", help="output directory (default runs/study/SWEEP-SCALE)")
    ap.add_argument("--scale", default="cpu", help="the sweep's size preset: cpu (default) or gpu")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (repeatable), e.g. --set train.steps=10")
    ap.add_argument("--only", nargs="+", metavar="RUN",
                    help="train only these runs, in this order (names or shell patterns, e.g. 'hi-*')")
    ap.add_argument("--max-runs", type=int, help="stop after this many runs")
    ap.add_argument("--list", action="store_true", help="print the expanded runs and train nothing")
    args = ap.parse_args(argv)
    if args.max_runs is not None and args.max_runs < 1:
        ap.error(f"--max-runs {args.max_runs} must be >= 1")
    from ngram_jax import storage
    from ngram_jax.study.sweep import expand, read_sweep_file

    name = read_sweep_file(args.sweep, args.scale)["name"]
    out = storage.location(args.out or f"runs/study/{name}-{args.scale}", "--out")  # a local path or a URL
    sweep = expand(args.sweep, scale=args.scale, sets=args.sets, out=out)
    from ngram_jax.study import runner

    if args.list:
        print("\n".join(runner.list_runs(sweep)))
        return 0
    written = runner.run_sweep(sweep, out, max_runs=args.max_runs, only=args.only)
    print(f"{out / runner.RESULTS}: {len(written)} runs recorded by this call")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
