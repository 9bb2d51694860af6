"""Our training step vs transformers' LongcatFlashForCausalLM on PyTorch CPU, same model, one run.

    python benchmarks/vs_torch.py [--steps 12] [--shapes 8x128,8x256] [--models tiny_plain,tiny_ne] [--no-breakdown]

Both sides do a full update: next-token cross-entropy (plus the MoE auxiliary terms on our side, zero
for these configs), backward, global-norm clipping and AdamW with the config's hyper-parameters.
Ours is exactly the step ``train.py`` runs (``ngram_jax.train.loop.make_train_step``). For tiny_ne
the PyTorch model gets an N-gram Embedding written here in torch (the reference's formula, same
table sizes, hash and amplification), replacing its token embedding. Both use the machine's cores
(XLA's pool; ``torch.set_num_threads``, 2 by default). The variants run in interleaved rounds (one
step each per round) after two warm-up steps, so a noisy shared machine slows them alike; the
medians are reported. Then a per-component breakdown of our step (forward + backward of each part
alone, jitted on its own, same shapes): the N-gram / token embedding, attention, dense FFN, MoE,
the head + loss, and the optimizer update.

The last line is ``jax_over_torch=<our tokens/s / PyTorch tokens/s for tiny_plain at 8x128>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ngram_jax.config import ConfigWarning, load_config
from ngram_jax.train.loop import make_train_step, train_step
from ngram_jax.train.state import build_train_state

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"


def load(name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(CONFIGS / f"{name}.yaml")


def make_batch(b: int, s: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One packed row per sequence, no EOS inside (tokens 2..V-1), every target scored."""
    tok = np.random.default_rng(seed).integers(2, vocab, (b, s + 1)).astype(np.int32)
    return dict(inputs=tok[:, :-1], targets=tok[:, 1:], segment_ids=np.ones((b, s), np.int32),
                positions=np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
                loss_mask=np.ones((b, s), np.float32))


# ----------------------------------------------------------------------------------------------
# Ours


class JaxRun:
    def __init__(self, cfg, batch: dict):
        self.step = make_train_step(cfg, *build_train_state(cfg, None))
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def __call__(self) -> float:
        return float(self.step(self.batch)["loss"])


class NnxJitRun(JaxRun):
    """The same update through ``nnx.jit`` over the modules (what train.py ran before TrainStep): the
    difference to :class:`JaxRun` is nnx.jit's per-call graph traversal."""

    def __init__(self, cfg, batch: dict):
        self.model, self.opt = build_train_state(cfg, None)
        self.fn = nnx.jit(functools.partial(train_step, draft_head_weight=cfg.train.draft_head_weight),
                          donate_argnums=(0, 1))
        self.batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def __call__(self) -> float:
        return float(self.fn(self.model, self.opt, self.batch)["loss"])


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_ngram_embedding(cfg, torch):
    """The N-gram Embedding of the paper (section 3) in torch (int64 hashing), as the reference computes it."""
    from ngram_jax.ngram import hashing

    m, n = cfg.model, cfg.model.ngram
    sizes = hashing.table_sizes(m.vocab_size, n.max_n, n.splits, n.ratio)
    consts = torch.as_tensor(hashing.hash_constants(m.vocab_size, sizes, n.max_n))  # [T, N-1]
    t = len(sizes)
    d_e = m.d_model // t
    amp = math.sqrt(m.d_model) if m.embedding.amplification == "sqrt_d" else 1.0
    if m.embedding.amplification == "layernorm":
        raise ValueError("the torch N-gram Embedding here implements amplification none | sqrt_d")

    class NE(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(m.vocab_size, m.d_model)
            self.tables = torch.nn.ModuleList(torch.nn.Embedding(s, d_e) for s in sizes)
            self.proj = torch.nn.ModuleList(torch.nn.Linear(d_e, m.d_model, bias=False) for _ in sizes)
            for p in self.parameters():
                torch.nn.init.normal_(p, std=0.02)

        def forward(self, x):  # x [B, S] int64 (one segment per row: history zero before the start)
            prev = [torch.nn.functional.pad(x, (j, 0))[:, : x.shape[1]] for j in range(1, n.max_n)]
            out = self.embed(x)
            for idx, table in enumerate(self.tables):
                h = x.clone()
                for j in range(1, idx // n.splits + 2):
                    h = h + prev[j - 1] * consts[idx, j - 1]
                out = out + self.proj[idx](table(h % sizes[idx]))
            return out / (1 + t) * amp

    return NE()


class TorchRun:
    def __init__(self, cfg, batch: dict, threads: int):
        import torch
        import transformers

        from ngram_jax.convert.hf import config_to_hf

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        m = cfg.model
        plain = dataclasses.replace(m, ngram=dataclasses.replace(m.ngram, enabled=False)) if m.ngram.enabled else m
        model = transformers.LongcatFlashForCausalLM(transformers.LongcatFlashConfig(**config_to_hf(plain)))
        if m.ngram.enabled:
            model.model.embed_tokens = torch_ngram_embedding(cfg, torch)
        self.model = model.float().train()
        t = cfg.train
        decay = [p for n_, p in self.model.named_parameters() if p.ndim >= 2 and "embed" not in n_]
        rest = [p for n_, p in self.model.named_parameters() if not (p.ndim >= 2 and "embed" not in n_)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                      {"params": rest, "weight_decay": 0.0}], lr=t.lr, betas=(t.b1, t.b2), eps=t.eps)
        self.clip = t.grad_clip
        self.torch = torch
        self.inputs = torch.as_tensor(batch["inputs"]).long()
        self.targets = torch.as_tensor(batch["targets"]).long()

    def __call__(self) -> float:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(self.inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return float(loss)


# ----------------------------------------------------------------------------------------------
# Breakdown of our step


def _timed(fn, *args, repeats: int) -> float:
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _fwd_bwd(module, f):
    """jit(grad) of ``sum(f(module, x))`` w.r.t. the module's parameters and x."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)

    @jax.jit
    def run(params, rest, *xs):
        m = nnx.merge(graphdef, params, rest)
        g = nnx.grad(lambda m, *xs: jnp.sum(f(m, *xs).astype(jnp.float32)), argnums=nnx.DiffState(0, nnx.Param))
        return nnx.state(g(m, *xs))

    return lambda *xs: run(params, rest, *xs)


def breakdown(cfg, batch: dict, repeats: int) -> dict[str, float]:
    """Seconds per part of one step (forward + backward of each part on its own), and the whole step."""
    from ngram_jax.train.loss import linear_cross_entropy, softmax_cross_entropy

    model, opt = build_train_state(cfg, None)
    b = {k: jnp.asarray(v) for k, v in batch.items()}
    bsz, s = b["inputs"].shape
    x = jax.random.normal(jax.random.key(0), (bsz, s, cfg.model.d_model), jnp.dtype(cfg.model.dtype))
    pos, seg = b["positions"], b["segment_ids"]
    out: dict[str, float] = {}
    out["embedding"] = _timed(_fwd_bwd(model.embed, lambda m: m(b["inputs"], segment_ids=seg)), repeats=repeats)
    blocks = list(model.blocks)
    per = lambda name, f: sum(_timed(_fwd_bwd(mod, f), x, repeats=repeats)  # noqa: E731
                              for blk in blocks for mod in name(blk))
    out["attention"] = per(lambda blk: blk.attn, lambda m, x: m(x, pos, seg))
    out["dense_ffn"] = per(lambda blk: blk.ffn, lambda m, x: m(x))
    if blocks[0].moe is not None:
        out["moe"] = per(lambda blk: [blk.moe], lambda m, x: m(x, token_mask=seg != 0))
    out["norms"] = per(lambda blk: [*blk.attn_norm, *blk.ffn_norm], lambda m, x: m(x))

    def head_loss(ce):  # final norm, output head (or the tied embedding), float32 cross-entropy of the logits
        def f(m, x):
            logits = m.output(m.final_norm(x))
            return jnp.sum(ce(logits.astype(jnp.float32), b["targets"]))
        return f

    def chunked_head_loss(m, x):  # what the step runs: train.loss_chunks pieces, no [B, S, V] logits kept
        return linear_cross_entropy(m.final_norm(x), m.head_weight(), b["targets"], b["loss_mask"],
                                    cfg.train.loss_chunks)[0]

    out["head_loss"] = _timed(_fwd_bwd(model, chunked_head_loss), x, repeats=repeats)
    logits_ce = _timed(_fwd_bwd(model, head_loss(softmax_cross_entropy)), x, repeats=repeats)
    grads = nnx.state(model, opt.wrt)
    gd_opt, opt_state = nnx.split(opt)
    gd_model, model_state = nnx.split(model)

    @jax.jit
    def update(opt_state, model_state, grads):
        o, mdl = nnx.merge(gd_opt, opt_state), nnx.merge(gd_model, model_state)
        o.dense.update(mdl, grads)
        return nnx.state(o), nnx.state(mdl)

    out["optimizer"] = _timed(update, opt_state, model_state, grads, repeats=repeats)
    step = make_train_step(cfg, *build_train_state(cfg, None))
    out["whole step"] = _timed(lambda: step(b)["loss"], repeats=repeats)
    return out, logits_ce


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12, help="timed interleaved rounds (after 2 warm-up steps)")
    ap.add_argument("--shapes", default="8x128,8x256")
    ap.add_argument("--models", default="tiny_plain,tiny_ne")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--no-breakdown", action="store_true")
    args = ap.parse_args()
    import torch
    import transformers

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    names = args.models.split(",")
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} {platform.processor() or platform.machine()}, "
          f"{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, torch threads {args.threads}; {args.steps} interleaved rounds")
    runs = {}
    for name in names:
        cfg = load(name)
        for b, s in shapes:
            batch = make_batch(b, s, cfg.model.vocab_size)
            runs[(name, b, s, "jax")] = JaxRun(cfg, batch)
            runs[(name, b, s, "torch")] = TorchRun(cfg, batch, args.threads)
            if (name, b, s) == (names[0], *shapes[0]):
                runs[(name, b, s, "nnx.jit")] = NnxJitRun(cfg, batch)
    times: dict = {k: [] for k in runs}
    for run in runs.values():  # warm-up (compiles)
        run(), run()
    for _ in range(args.steps):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
    print(f"{'model':<12} {'tokens':>7} {'ours ms':>9} {'torch ms':>9} {'ours tok/s':>11} {'torch tok/s':>12} "
          f"{'ours/torch':>11}")
    ratio = {}
    for name in names:
        for b, s in shapes:
            j = statistics.median(times[(name, b, s, "jax")])
            t = statistics.median(times[(name, b, s, "torch")])
            ratio[(name, b, s)] = t / j
            print(f"{name:<12} {f'{b}x{s}':>7} {j * 1e3:>9.1f} {t * 1e3:>9.1f} {b * s / j:>11,.0f} "
                  f"{b * s / t:>12,.0f} {t / j:>10.2f}x")
    first = (names[0], *shapes[0])
    nj = statistics.median(times[(*first, "nnx.jit")])
    print(f"{first[0]} {first[1]}x{first[2]} through nnx.jit (before TrainStep): {nj * 1e3:.1f} ms, "
          f"TrainStep is {nj / statistics.median(times[(*first, 'jax')]):.2f}x faster")
    if not args.no_breakdown:
        for name in names:
            b, s = shapes[0]
            parts, logits_ce = breakdown(load(name), make_batch(b, s, load(name).model.vocab_size), args.steps)
            whole = parts.pop("whole step")
            print(f"\n# breakdown of our step, {name} {b}x{s} (each part forward+backward alone, ms; whole step "
                  f"{whole * 1e3:.1f} ms, parts sum {sum(parts.values()) * 1e3:.1f} ms)")
            for part, sec in parts.items():
                print(f"  {part:<10} {sec * 1e3:8.1f} ms  {sec / whole:6.1%}")
            print(f"  (head_loss as [B, S, V] logits, then the cross-entropy: {logits_ce * 1e3:.1f} ms)")
    print(f"jax_over_torch={ratio.get(('tiny_plain', 8, 128), ratio[first]):.3f}")


if __name__ == "__main__":
    main()
