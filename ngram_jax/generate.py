"""``python -m ngram_jax.generate``: text from a checkpoint, plain or speculative decoding. The decoding
itself is :mod:`ngram_jax.decoding` (re-exported here) and :mod:`ngram_jax.speculative`.

    python -m ngram_jax.generate --checkpoint runs/train_tiny --prompt "ROMEO:" --max-new-tokens 60
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ngram_jax.decoding import (  # noqa: F401 - the decoding API, re-exported
    DecodeState,
    advance_history,
    decode_step,
    filter_logits,
    frozen,
    generate,
    init_kv,
    left_pad,
    prefill,
    prefill_history,
    reorder,
    sample,
)

DRAFT_CHOICES = ("prompt_lookup", "model", "ngram", "mtp")


def check_draft_config(target_cfg, draft_cfg, where: str) -> None:
    """A draft checkpoint must share the target's vocabulary and tokenizer (CheckpointError otherwise)."""
    from ngram_jax.errors import CheckpointError

    if draft_cfg.model.vocab_size != target_cfg.model.vocab_size or draft_cfg.model.eos_id != target_cfg.model.eos_id:
        raise CheckpointError(f"--draft-checkpoint {where}: vocabulary {draft_cfg.model.vocab_size} (eos "
                              f"{draft_cfg.model.eos_id}) differs from the target's {target_cfg.model.vocab_size} "
                              f"(eos {target_cfg.model.eos_id}); train the draft with the target's tokenizer")
    from ngram_jax.data.prepare import read_metadata

    def token_hash(cfg):
        try:
            return read_metadata(cfg.data.path).get("tokenizer_hash")
        except FileNotFoundError:
            return None

    a, b = token_hash(target_cfg), token_hash(draft_cfg)
    if a is not None and b is not None and a != b:
        raise CheckpointError(f"--draft-checkpoint {where}: trained with another tokenizer (hash {b}, data "
                              f"{draft_cfg.data.path}) than the target (hash {a}, data {target_cfg.data.path}); "
                              "train the draft on data prepared with the target's tokenizer")


def main(argv: Sequence[str] | None = None) -> int:
    from ngram_jax import cli

    ap = cli.ArgumentParser(prog="python -m ngram_jax.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a run directory (or its checkpoints directory)")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--tokenizer", help="tokenizer.json (default: the one beside the run's training data)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top-k", type=int, default=40)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    spec = ap.add_argument_group("speculative decoding (greedy output equals plain greedy decoding)")
    spec.add_argument("--draft", choices=DRAFT_CHOICES, help="drafter: prompt_lookup (training-free), model "
                      "(a smaller checkpoint with the same tokenizer, --draft-checkpoint), ngram (the target's "
                      "N-gram Embedding through its draft head, model.draft_head=ngram) or mtp (the target's "
                      "one-block MTP / NEXTN head on its last hidden state, model.draft_head=mtp)")
    spec.add_argument("--draft-checkpoint", help="run directory of the draft model (--draft model)")
    spec.add_argument("--num-draft", type=int, default=4, help="K, draft tokens per verification pass")
    spec.add_argument("--early-reject", type=float, default=None, metavar="THRESHOLD",
                      help="drop draft tokens whose probability under the target's N-gram draft head is below "
                      "THRESHOLD (truncating the draft) before verification")
    spec.add_argument("--max-len", type=int, default=None,
                      help="positions of the decoding state (KV cache, token table); default: what the request needs")
    spec.add_argument("--stats", action="store_true", help="print acceptance rate, accepted tokens per verification "
                      "and tokens/s (with the drafter's calls and proposed / accepted tokens)")
    args = ap.parse_args(argv)
    if args.draft is None and (args.draft_checkpoint or args.stats or args.max_len is not None
                               or args.early_reject is not None):
        ap.error("--draft-checkpoint, --early-reject, --max-len and --stats need --draft")
    if args.early_reject is not None and not 0 < args.early_reject < 1:
        ap.error(f"--early-reject {args.early_reject} must be in (0, 1) (a probability threshold)")
    if args.draft == "model" and not args.draft_checkpoint:
        ap.error("--draft model needs --draft-checkpoint RUN (a smaller run trained with the same tokenizer)")
    if args.draft_checkpoint and args.draft != "model":
        ap.error(f"--draft-checkpoint is only used with --draft model, not --draft {args.draft}")
    if args.draft is not None and args.num_draft < 1:
        ap.error(f"--num-draft {args.num_draft} must be >= 1 (draft tokens per verification)")
    if args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0:
        ap.error(f"--temperature {args.temperature} must be >= 0 (0: greedy)")
    if args.top_k < 0:
        ap.error(f"--top-k {args.top_k} must be >= 0 (0: no top-k filter)")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p {args.top_p} must be in (0, 1]")
    if not args.prompt:
        ap.error("--prompt is empty: give at least one character to continue")
    from ngram_jax import storage
    from ngram_jax.checkpoint import find_checkpoints, restore_model
    from ngram_jax.data.prepare import check_tokenizer
    from ngram_jax.data.tokenizer import load_tokenizer

    find_checkpoints(args.checkpoint, "--checkpoint")  # a missing run directory fails before JAX starts restoring
    if args.draft_checkpoint:
        find_checkpoints(args.draft_checkpoint, "--draft-checkpoint")
    if args.tokenizer is not None:
        tok = load_tokenizer(args.tokenizer)
    if args.draft is not None:  # every check before any weights are read or anything compiles
        from ngram_jax.checkpoint import read_config

        cfg = read_config(args.checkpoint, args.step)
        if (args.draft == "ngram" or args.early_reject is not None) and cfg.model.draft_head != "ngram":
            from ngram_jax.errors import UsageError

            what = "--draft ngram" if args.draft == "ngram" else "--early-reject"
            raise UsageError(f"{what} needs the target's N-gram draft head, and {args.checkpoint} was trained "
                             f"with model.draft_head={cfg.model.draft_head}; train it with model.draft_head=ngram")
        if args.draft == "mtp" and cfg.model.draft_head != "mtp":
            from ngram_jax.errors import UsageError

            raise UsageError(f"--draft mtp needs the target's MTP draft head, and {args.checkpoint} was trained "
                             f"with model.draft_head={cfg.model.draft_head}; train it with model.draft_head=mtp "
                             "(e.g. configs/spec_target_mtp.yaml)")
        if args.draft_checkpoint:
            check_draft_config(cfg, read_config(args.draft_checkpoint), args.draft_checkpoint)
        if args.tokenizer is None:
            tok = load_tokenizer(storage.location(cfg.data.path, "data.path") / "tokenizer.json")
        from ngram_jax.speculative import check_request

        max_new = check_request([len(tok.encode(args.prompt, add_special_tokens=False).ids)], args.max_new_tokens,
                                args.num_draft, args.max_len)
    model, cfg = restore_model(args.checkpoint, args.step)
    data = storage.location(cfg.data.path, "data.path")
    if args.tokenizer is None:
        tok = load_tokenizer(data / "tokenizer.json")
    elif (data / "metadata.json").is_file():
        check_tokenizer(tok, cfg.data.path, what=f"--tokenizer {args.tokenizer}")
    if tok.get_vocab_size() > cfg.model.vocab_size:
        from ngram_jax.errors import DataError

        raise DataError(f"--tokenizer {args.tokenizer}: {tok.get_vocab_size()} tokens, more than the model's "
                        f"vocabulary (model.vocab_size={cfg.model.vocab_size}); use the run's tokenizer")
    ids = tok.encode(args.prompt, add_special_tokens=False).ids
    if args.draft is not None:
        import time

        from ngram_jax import speculative as spec_mod

        draft_model = restore_model(args.draft_checkpoint)[0] if args.draft_checkpoint else None
        drafter = spec_mod.make_drafter(args.draft, model, draft_model)
        kw = dict(drafter=drafter, num_draft=args.num_draft, temperature=args.temperature, top_k=args.top_k,
                  top_p=args.top_p, seed=args.seed, max_len=args.max_len, early_reject=args.early_reject,
                  compiled={})
        spec_mod.speculative_generate(model, [ids], max_new, **kw)  # compiles (not timed)
        t0 = time.perf_counter()
        (new,), st = spec_mod.speculative_generate(model, [ids], max_new, **kw)
        seconds = time.perf_counter() - t0
        print(args.prompt + tok.decode(new))
        if args.stats:
            print(spec_mod.format_stats(st, len(new), seconds, args.draft, args.num_draft))
        return 0
    (new,) = generate(model, [ids], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed)
    print(args.prompt + tok.decode(new))
    return 0


if __name__ == "__main__":
    from ngram_jax import cli

    sys.exit(cli.run(main))
