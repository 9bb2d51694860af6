"""Speculative decoding vs plain decoding on models trained here (issue 12), greedy.

    python benchmarks/speculative.py [--target runs/spec_target_large --draft runs/draft_tiny runs/draft_small \\
        --batches 1 8 --prompt 32 --new 64 256 --num-draft 4 --thresholds 0.02 --repeats 5]
    python benchmarks/speculative.py --target runs/spec_target_mtp --draft --thresholds   # the MTP head

Prompts are held-out Shakespeare rows (the target's prepared data). For each batch size and number of new
tokens: plain decoding in the same jitted while_loop (one token per target pass, the baseline of every ratio)
and in a host loop over the jitted decode step (one dispatch per token); then every drafter (prompt_lookup,
one model drafter per ``--draft`` run, and the target's draft head: ngram or mtp, each with and without the
NE-embedding cache), without and with early rejection at each threshold (which needs the N-gram draft head).
Every speculative output is checked token for token against plain greedy decoding. All variants are compiled
first, then timed in ``--repeats`` interleaved rounds (each round runs every variant once), so that the
shared machine's load changes hit them alike. Per row: tokens/s (all rows' new tokens over the median
wall time), vs plain (the median over rounds of the per-round ratio to plain decoding), acceptance
(accepted / verified drafts), verified drafts per verification and accepted drafts per verification
(per row-step: tokens per target pass = that + 1). A line above each table gives the share of the
generated tokens that complete a 4-gram already in the prompt or the earlier output (what prompt lookup can
copy).
Per length a line ``speculative_speedup_new<N>=<best drafter at batch 1>``; the last line:
``speculative_speedup=<best drafter tokens/s / plain tokens/s at batch 1, over the lengths>``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from ngram_jax import speculative as S
from ngram_jax.budget import closed_form_budget
from ngram_jax.checkpoint import restore_model
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.generate import decode_step, frozen, left_pad, prefill


def held_out_prompts(cfg, n: int, length: int) -> list[list[int]]:
    it = iter(make_dataset(cfg.data.path, "heldout", seq_len=length, batch_size=n, vocab_size=cfg.model.vocab_size,
                           seed=0, repeat=False))
    batch = next(it)
    return [list(map(int, row[seg != 0])) for row, seg in zip(batch["inputs"], batch["segment_ids"], strict=True)]


def host_loop(target, prompts, new: int):
    """Plain greedy decoding with a host loop over the jitted decode step (as benchmarks/decode.py):
    prefill and step compiled once, one dispatch per token."""
    tokens, seg = left_pad(prompts)
    prefill_fn = frozen(prefill, target, static_argnums=(2,))
    step_fn = frozen(decode_step, target, donate_argnums=(1,))  # the KV cache updated in place, as generate does

    def run():
        logits, state = prefill_fn(jnp.asarray(tokens), jnp.asarray(seg), tokens.shape[1] + new)
        out = [jnp.argmax(logits, -1).astype(jnp.int32)]
        for _ in range(new - 1):
            logits, state = step_fn(out[-1], state)
            out.append(jnp.argmax(logits, -1).astype(jnp.int32))
        return np.stack([np.asarray(x) for x in out], axis=1).tolist()

    return run


def repeated_share(prompt: list[int], new: list[int], n: int = 4) -> float:
    """The share of ``new`` tokens that complete an n-gram already seen in ``prompt + new`` before them."""
    seq, seen, hits = list(prompt), set(), 0
    for j in range(n, len(seq) + 1):
        seen.add(tuple(seq[j - n : j]))
    for tok in new:
        seq.append(tok)
        gram = tuple(seq[-n:])  # shorter than n for the first tokens of a short prompt: never in seen
        hits += gram in seen
        seen.add(gram)
    return hits / max(len(new), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="runs/spec_target_large")
    ap.add_argument("--draft", nargs="*", default=["runs/draft_tiny", "runs/draft_small"],
                    help="draft models' runs, one model drafter each (none: no model drafter)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, nargs="+", default=[64, 256], help="new tokens per prompt (one table each)")
    ap.add_argument("--num-draft", type=int, default=4)
    ap.add_argument("--thresholds", type=float, nargs="*", default=[0.02])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    target, tcfg = restore_model(args.target)
    ta = closed_form_budget(tcfg.model)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.node()} {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}, jax {jax.__version__}; prompt {args.prompt}, new tokens {args.new}, "
          f"K={args.num_draft}, greedy, {args.repeats} interleaved rounds")
    print(f"# target {args.target}: {ta['activated_max']:,} activated / {ta['total']:,} total params, "
          f"model.draft_head={tcfg.model.draft_head} ({ta['draft']:,} params)")
    drafters = {"prompt_lookup": S.PromptLookup()}
    runs = [r for r in args.draft if r]  # `--draft` or `--draft ''`: no model drafter
    for run in runs:
        draft, dcfg = restore_model(run)
        da = closed_form_budget(dcfg.model)
        name = "model" if len(runs) == 1 else f"model {dcfg.name}"
        print(f"# {name}: {run}, {da['activated_max']:,} activated "
              f"({ta['activated_min'] / da['activated_max']:.1f}x fewer than the target)")
        drafters[name] = S.ModelDrafter(draft)
    head = tcfg.model.draft_head
    if head == "ngram":  # with and without the NE-embedding cache
        drafters["ngram"] = S.NgramDrafter(cache_embeddings=True)
        drafters["ngram_nocache"] = S.NgramDrafter(cache_embeddings=False)
    if head == "mtp":
        drafters["mtp"] = S.MTPDrafter(cache_embeddings=True)
        drafters["mtp_nocache"] = S.MTPDrafter(cache_embeddings=False)
    best_b1: dict[int, float] = {}
    for new in args.new:
        for b in args.batches:
            prompts = held_out_prompts(tcfg, b, args.prompt)
            best = run_table(target, prompts, new, b, drafters, head, args)
            if b == 1:
                best_b1[new] = best
    for new, best in best_b1.items():
        print(f"speculative_speedup_new{new}={best:.2f}")
    print(f"speculative_speedup={max(best_b1.values(), default=0.0):.2f}")


def run_table(target, prompts, new: int, b: int, drafters: dict, head: str, args) -> float:
    """One table: every variant compiled and checked, then timed in interleaved rounds; returns the best
    drafter's ratio to plain decoding."""
    compiled: dict = {}
    common = dict(stop_at_eos=False, compiled=compiled)
    variants = {"plain (jitted loop)": (partial(S.speculative_generate, target, prompts, new, num_draft=0,
                                                **common), None)}
    for name, drafter in drafters.items():
        for thr in [None, *args.thresholds]:
            if thr is not None and head != "ngram":
                continue
            label = name if thr is None else f"{name} early_reject={thr:g}"
            variants[label] = (partial(S.speculative_generate, target, prompts, new, drafter=drafter,
                                       num_draft=args.num_draft, early_reject=thr, **common), None)
    plain, _ = variants["plain (jitted loop)"][0]()  # compile every variant, check its output
    host_fn = host_loop(target, prompts, new)
    assert host_fn() == plain, "plain decoding in the jitted loop differs from the host loop"
    for label, (fn, _) in list(variants.items()):
        out, st = fn()
        assert out == plain, f"{label} differs from plain greedy decoding"
        variants[label] = (fn, st)
    variants["plain (host loop per token)"] = (host_fn, None)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):  # interleaved rounds: load changes hit every variant alike
        for label, (fn, _) in variants.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    total = sum(len(r) for r in plain)
    repeats = statistics.mean(repeated_share(p, r) for p, r in zip(prompts, plain, strict=True))
    print(f"# batch {b}, {new} new tokens: {repeats:.0%} of the greedy output completes a 4-gram seen before")
    base = times["plain (jitted loop)"]
    print(f"{'batch':>5} {'new':>4} {'decoder':<34} {'tokens/s':>9} {'vs plain':>8} {'accept':>7} "
          f"{'verified/step':>13} {'accepted/step':>13}")
    best = 0.0
    for label, (_, st) in variants.items():
        rate = total / statistics.median(times[label])
        ratio = statistics.median(p / t for p, t in zip(base, times[label], strict=True))  # per round
        line = f"{b:>5} {new:>4} {label:<34} {rate:>9.1f} {ratio:>8.2f}"
        if st is not None and st["proposed"]:
            row_steps = st["proposed"] / args.num_draft
            line += (f" {st['accepted'] / max(st['verified'], 1):>7.3f} {st['verified'] / row_steps:>13.2f} "
                     f"{st['accepted'] / row_steps:>13.2f}")
            best = max(best, ratio)
        print(line, flush=True)
    return best


if __name__ == "__main__":
    main()
