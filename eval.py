"""Evaluate a checkpoint: ``python eval.py --checkpoint RUN_DIR [--data DIR_OR_TEXT] [--batches N]``.

Held-out loss, perplexity and bits per byte, on the run's prepared held-out split (default), another
prepared directory, or a raw .txt/.jsonl file. ``--hf-checkpoint DIR`` evaluates a Hugging Face
LongCat-Flash(-Lite) checkpoint instead (give --data and --tokenizer). Results are written as
``eval_results.json`` next to the checkpoint. ``--tasks a,b`` also runs lm-evaluation-harness tasks
through the in-process ``ngram_jax`` adapter (``--include-path`` for local task YAMLs).
``--checkpoint``, ``--data`` and ``--tokenizer`` may be ``gs://`` or ``s3://`` URLs.
"""

import argparse
import json
import sys

from ngram_jax import cli, storage
from ngram_jax.errors import MissingInputError, UsageError


def run_tasks(model, cfg, tokenizer, tasks, task_manager, limit, batch_size) -> dict:
    import lm_eval

    from ngram_jax.eval.lm_eval_adapter import NgramJaxLM

    lm = NgramJaxLM(model=model, config=cfg, tokenizer=str(tokenizer), batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
            for task, metrics in out["results"].items()}


def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python eval.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a training run directory (or its checkpoints directory)")
    src.add_argument("--hf-checkpoint", help="a Hugging Face LongCat-Flash(-Lite) directory")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--data", help="prepared data directory or a raw .txt/.jsonl file (default: the run's data)")
    ap.add_argument("--tokenizer", help="tokenizer.json for raw text (default: the one of the run's data)")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--batches", type=int, default=None, help="evaluate at most this many batches")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--tasks", help="comma-separated lm-evaluation-harness tasks")
    ap.add_argument("--include-path", help="a directory of extra lm-eval task YAMLs")
    ap.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    args = ap.parse_args(argv)
    for name in ("batches", "batch_size", "seq_len", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} {value} must be >= 1")
    if args.hf_checkpoint and not args.data:
        ap.error("--hf-checkpoint needs --data (and --tokenizer for raw text)")
    for flag, value in (("--checkpoint", args.checkpoint), ("--hf-checkpoint", args.hf_checkpoint),
                        ("--data", args.data), ("--tokenizer", args.tokenizer)):
        if value is not None:
            path = storage.check(value, flag)  # a gs:// or s3:// bucket: reachable and there
            with storage.reported(path, flag):
                if not path.exists():
                    raise MissingInputError(f"{flag} {value}: no such file or directory")
    tasks = args.tasks.split(",") if args.tasks else []
    if tasks:  # task names are checked before any model is read
        try:
            from ngram_jax.eval.lm_eval_adapter import task_manager
        except ImportError as err:
            raise UsageError(f"--tasks needs lm-evaluation-harness ({err}): pip install -e '.[eval]'") from None
        manager = task_manager(tasks, args.include_path)
    from ngram_jax.eval.perplexity import evaluate

    if args.checkpoint:
        from ngram_jax.checkpoint import find_checkpoints, restore_model

        model, cfg = restore_model(args.checkpoint, args.step)
        out_dir = find_checkpoints(args.checkpoint, "--checkpoint").parent
        data = args.data or cfg.data.path
        tokenizer = args.tokenizer or storage.location(cfg.data.path, "data.path") / "tokenizer.json"
        batch_size, seq_len = args.batch_size or cfg.data.batch_size, args.seq_len or cfg.data.seq_len
    else:
        from ngram_jax.convert.hf import load_hf_checkpoint

        model, cfg = load_hf_checkpoint(args.hf_checkpoint)
        out_dir, data, tokenizer = storage.location(args.hf_checkpoint), args.data, args.tokenizer
        batch_size, seq_len = args.batch_size or 8, args.seq_len or 512
    # prepared data: checked against the model (and --tokenizer) before any compilation
    if storage.location(data, "--data").is_dir():
        from ngram_jax.data.prepare import check_tokenizer, read_metadata
        from ngram_jax.data.tokenizer import load_tokenizer
        from ngram_jax.errors import DataError

        meta = read_metadata(data)
        if meta["vocab_size"] != cfg.model.vocab_size:
            raise DataError(f"{data} was tokenized with vocab_size {meta['vocab_size']}, the model has "
                            f"{cfg.model.vocab_size}; give --data prepared with the model's tokenizer")
        if args.tokenizer:
            check_tokenizer(load_tokenizer(args.tokenizer), data)
    result = evaluate(model, data, seq_len=seq_len, batch_size=batch_size, tokenizer=tokenizer,
                      split=args.split, max_batches=args.batches)
    if tasks:
        result["tasks"] = run_tasks(model, cfg, tokenizer, tasks, manager, args.limit, batch_size)
    result.update(data=str(data), split=args.split, batch_size=batch_size, seq_len=seq_len)
    with storage.reported(out_dir, "--checkpoint"):
        (out_dir / "eval_results.json").write_text(json.dumps(result, indent=1))
    for task, metrics in result.get("tasks", {}).items():
        print(f"{task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  bits/byte {result['bits_per_byte']:.4f}"
          f"  ({result['tokens']:,} tokens) -> {out_dir / 'eval_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
