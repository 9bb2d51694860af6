"""``python -m ngram_jax.study report DIR``: DIR/report.md (a markdown table per run group with the seed
spread, and NE vs MoE-baseline calls) and PNG plots from DIR/results.jsonl.

A run group is one configuration over its seeds. Its spread is the range (max - min) of the held-out
loss over the seeds. Two groups differ only when their mean losses differ by more than the larger of
their spreads; otherwise the comparison is a tie. With one seed there is no spread and no call.

The paired call compares the same seeds: runs of one seed share the data order (``data.seed``) and the
initialisation seed, and much of the seed spread is common to every group (a seed with harder batches is
worse in all of them). Per seed it takes the difference of the two groups' losses; the call is a side only
when every seed shared by both groups (at least 2) gives that side, else a tie.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ngram_jax import storage
from ngram_jax.errors import DataError, MissingInputError
from ngram_jax.study.runner import RESULTS


@dataclass
class Group:
    name: str
    records: list[dict] = field(default_factory=list)

    def values(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.records if r.get(key) is not None], np.float64)

    def mean(self, key: str = "eval_loss") -> float:
        v = self.values(key)
        return float(v.mean()) if v.size else float("nan")

    @property
    def spread(self) -> float | None:
        v = self.values("eval_loss")
        return float(v.max() - v.min()) if v.size >= 2 else None

    def first(self, key: str):
        return self.records[0].get(key)


def load_records(out: str | Path) -> list[dict]:
    path = storage.location(out, "DIR") / RESULTS
    if not path.is_file():
        raise MissingInputError(f"no {RESULTS} in {out} (run python -m ngram_jax.study SWEEP.yaml --out {out})")
    records = []
    text = storage.read_text(path, "DIR", f"a {RESULTS} of python -m ngram_jax.study")
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                rec["name"], rec["sweep"], rec["eval_loss"], rec["group"]  # noqa: B018 - presence check
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno}: not a results record of python -m ngram_jax.study") from None
            records.append(rec)
    if not records:
        raise DataError(f"{path} holds no finished runs")
    sweeps = sorted({(r["sweep"], r.get("scale")) for r in records}, key=str)
    if len(sweeps) > 1:
        raise DataError(f"{path} mixes sweeps {sweeps}: one sweep per results file")
    return records


def groups_of(records: list[dict]) -> list[Group]:
    by: dict[str, Group] = {}
    for r in records:
        by.setdefault(r["group"], Group(r["group"])).records.append(r)
    return sorted(by.values(), key=lambda g: (g.first("total_params"), g.name))


def compare(a: Group, b: Group) -> tuple[str, float]:
    """(verdict, a - b in mean loss): 'a better', 'b better', 'tie', or 'no call (1 seed)'."""
    delta = a.mean() - b.mean()
    spreads = [s for s in (a.spread, b.spread) if s is not None]
    if len(spreads) < 2:
        return "no call (1 seed)", delta
    noise = max(spreads)
    if abs(delta) <= noise:
        return "tie", delta
    return ("a better" if delta < 0 else "b better"), delta


def paired(a: Group, b: Group) -> tuple[str, float, int]:
    """(verdict, mean over shared seeds of a - b, shared seeds): 'a better' / 'b better' when every shared
    seed agrees, 'tie' when they disagree (or a difference is 0), 'no call' with fewer than 2 shared seeds."""
    by_seed = lambda g: {r["seed"]: r["eval_loss"] for r in g.records}  # noqa: E731
    return paired_losses(by_seed(a), by_seed(b))


def paired_losses(la: dict[int, float], lb: dict[int, float]) -> tuple[str, float, int]:
    """``paired`` of two {seed: loss} maps (final losses, or the losses at one point of a curve)."""
    diffs = np.array([la[s] - lb[s] for s in sorted(la.keys() & lb.keys())], np.float64)
    if diffs.size < 2:
        return "no call", float(diffs.mean()) if diffs.size else float("nan"), int(diffs.size)
    if (diffs < 0).all():
        return "a better", float(diffs.mean()), int(diffs.size)
    if (diffs > 0).all():
        return "b better", float(diffs.mean()), int(diffs.size)
    return "tie", float(diffs.mean()), int(diffs.size)


def _fmt_paired(a: Group, b: Group, sides: tuple[str, str]) -> str:
    verdict, delta, n = paired(a, b)
    if verdict == "no call":
        return "no call"
    word = {"a better": sides[0], "b better": sides[1]}.get(verdict, "tie")
    return f"{word} ({delta:+.4f}, {n} seeds)"


def _fmt_spread(g: Group) -> str:
    return "-" if g.spread is None else f"{g.spread:.4f}"


def baseline_pairs(groups: list[Group]) -> list[tuple[Group, Group]]:
    """(NE group, its parameter-equivalent MoE baseline group) for every baseline in the results."""
    by_name = {g.name: g for g in groups}
    return [(by_name[g.first("baseline_of")], g) for g in groups
            if g.first("baseline_of") and g.first("baseline_of") in by_name]


def curves(g: Group) -> tuple[list[int], dict[int, np.ndarray]]:
    """(token counts, {seed: held-out losses at them}) of a group's ``eval_curve`` records (the token counts
    every seed recorded)."""
    by_seed = {r["seed"]: dict((int(t), float(v)) for t, v in r["eval_curve"]) for r in g.records
               if r.get("eval_curve")}
    if not by_seed:
        return [], {}
    tokens = sorted(set.intersection(*(set(c) for c in by_seed.values())))
    return tokens, {s: np.array([c[t] for t in tokens]) for s, c in sorted(by_seed.items())}


def paired_curve(ne: Group, moe: Group) -> tuple[list[int], dict[int, np.ndarray]]:
    """(token counts, {seed: NE - MoE held-out loss at them}) over the seeds and points both groups share."""
    t_ne, c_ne = curves(ne)
    t_moe, c_moe = curves(moe)
    tokens = sorted(set(t_ne) & set(t_moe))
    seeds = sorted(c_ne.keys() & c_moe.keys())
    pick = lambda ts, c: c[[ts.index(t) for t in tokens]]  # noqa: E731
    return tokens, {s: pick(t_ne, c_ne[s]) - pick(t_moe, c_moe[s]) for s in seeds}


def sign_change(tokens: list[int], diffs: dict[int, np.ndarray]) -> tuple[int | None, str]:
    """Where the paired difference NE - MoE changes sign on every seed: the first token count from which
    every seed, at every later point, has the sign opposite to the one every seed had at the first point.
    Returns (that token count or None, a sentence saying what the curves show)."""
    if len(diffs) < 2 or not tokens:
        return None, "fewer than 2 seeds with curves: no call"
    d = np.stack(list(diffs.values()))  # [seeds, points]
    side = lambda v: "NE better" if v < 0 else "MoE better"  # noqa: E731
    first = np.sign(d[:, 0])
    if not (first == first[0]).all() or first[0] == 0:
        start = "the seeds disagree at the first point"
        ref = np.sign(d[:, 0].mean())
    else:
        start = f"{side(first[0])} at {tokens[0]:,} tokens on every seed"
        ref = first[0]
    flipped = (np.sign(d) == -ref).all(axis=0)  # [points]: every seed on the other side
    for i in range(len(tokens)):
        if flipped[i:].all() and ref != 0:
            return tokens[i], (f"{start}; from {tokens[i]:,} tokens on, {side(-ref)} on every seed (paired "
                               f"difference {d[:, -1].mean():+.4f} at {tokens[-1]:,})")
    last = np.sign(d[:, -1])
    end = (f"{side(last[0])} on every seed" if (last == last[0]).all() and last[0] != 0 else "the seeds disagree")
    return None, (f"{start}; no sign change on every seed up to {tokens[-1]:,} tokens (at the last point: {end}, "
                  f"paired difference {d[:, -1].mean():+.4f})")


def curve_markdown(groups: list[Group]) -> list[str]:
    """Per NE / MoE-baseline pair with curves: the held-out loss at each token count and the paired difference."""
    lines = []
    for ne, moe in baseline_pairs(groups):
        tokens, diffs = paired_curve(ne, moe)
        if not tokens:
            continue
        (t_ne, c_ne), (t_moe, c_moe) = curves(ne), curves(moe)
        _, sentence = sign_change(tokens, diffs)
        lines += ["", f"### Loss vs tokens: {ne.name} against {moe.name}", "",
                  f"Total/activated {ne.first('total_over_activated'):.1f} (NE) and "
                  f"{moe.first('total_over_activated'):.1f} (MoE); in the paper's counting "
                  f"{_num(ne.first('transformer_ratio'), '.1f')} and {_num(moe.first('transformer_ratio'), '.1f')}. "
                  f"Sign: {sentence}.", "",
                  "| tokens | NE loss (seed range) | MoE loss (seed range) | paired NE - MoE (per seed) |",
                  "|---|---|---|---|"]
        for j, t in enumerate(tokens):
            a = np.array([c[t_ne.index(t)] for c in c_ne.values()])
            b = np.array([c[t_moe.index(t)] for c in c_moe.values()])
            per_seed = ", ".join(f"{v[j]:+.4f}" for v in diffs.values())
            lines.append(f"| {t:,} | {a.mean():.4f} ({a.min():.4f}-{a.max():.4f}) | {b.mean():.4f} "
                         f"({b.min():.4f}-{b.max():.4f}) | {np.mean([v[j] for v in diffs.values()]):+.4f} "
                         f"({per_seed}) |")
    return lines


def group_curves(groups: list[Group]) -> tuple[list[int], dict[str, dict[int, np.ndarray]]]:
    """(token counts, {group: {seed: held-out losses}}) of the groups with curves that are not in an NE /
    MoE-baseline pair (e.g. the NE shares of ``ne_share_tokens``), over the token counts all of them share."""
    in_pairs = {g.name for pair in baseline_pairs(groups) for g in pair}
    cs = {g.name: curves(g) for g in groups if g.name not in in_pairs}
    cs = {name: c for name, c in cs.items() if c[0]}
    if len(cs) < 2:
        return [], {}
    tokens = sorted(set.intersection(*(set(ts) for ts, _ in cs.values())))
    return tokens, {name: {s: v[[ts.index(t) for t in tokens]] for s, v in by_seed.items()}
                    for name, (ts, by_seed) in cs.items()}


def group_curve_markdown(groups: list[Group]) -> list[str]:
    """The loss of each group at each token count, the best group there and its paired call against the rest,
    and the groups' order at the first and the last point."""
    tokens, cs = group_curves(groups)
    if not tokens:
        return []
    names = list(cs)
    lines = ["", "### Loss vs tokens by group", "",
             "Mean held-out loss over seeds (seed range). Best: the lowest mean; \"on every seed\" when it is lower "
             "than each other group on every shared seed, else the groups it does not beat on every seed.", "",
             "| tokens | " + " | ".join(names) + " | best |", "|---|" + "---|" * (len(names) + 1)]
    orders = []
    for j, t in enumerate(tokens):
        losses = {n: {s: float(v[j]) for s, v in cs[n].items()} for n in names}  # {group: {seed: loss at t}}
        ranked = sorted(names, key=lambda n: np.mean(list(losses[n].values())))
        best = ranked[0]
        not_beaten = [n for n in ranked[1:] if paired_losses(losses[best], losses[n])[0] != "a better"]
        cells = [f"{np.mean(list(losses[n].values())):.4f} ({min(losses[n].values()):.4f}-"
                 f"{max(losses[n].values()):.4f})" for n in names]
        call = f"{best}, on every seed" if not not_beaten else f"{best} (not on every seed against " \
            f"{', '.join(not_beaten)})"
        lines.append(f"| {t:,} | " + " | ".join(cells) + f" | {call} |")
        orders.append(" < ".join(ranked))
    lines += ["", f"Order by mean loss at {tokens[0]:,} tokens: {orders[0]}; at {tokens[-1]:,}: {orders[-1]}."]
    return lines


def _num(v, fmt: str) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)


def routing_markdown(groups: list[Group]) -> list[str]:
    """Per MoE group: what its routing did on the held-out batches (``eval.routing.routing_report``) and what
    its experts contribute (the held-out loss without the MoE branch, less the loss with it)."""
    rows = [g for g in groups if any(r.get("routing") for r in g.records)]
    if not rows:
        return []
    lines = ["", "## Routing", "",
             "Held-out batches of the final checkpoint, mean over seeds. Experts' share: held-out loss without the "
             "MoE branch minus with it (what the routed experts contribute). Dropped: real-expert assignments "
             "capacity dispatch dropped. Routed mass: the sum of a token's routed weights. Bias-changed: assignments "
             "not among the router's own top-k. Load: max/mean assignments of the real experts.", "",
             "| group | experts | held-out loss | without MoE | experts' share | dropped | routed mass | "
             "bias-changed | load max/mean |", "|---|---|---|---|---|---|---|---|---|"]
    for g in rows:
        rs = [r["routing"] for r in g.records if r.get("routing")]
        mean = lambda k, rs=rs: float(np.mean([x[k] for x in rs]))  # noqa: E731
        experts = (g.first("config") or {}).get("model", {}).get("moe", {}).get("num_experts")
        lines.append(f"| {g.name} | {_num(experts, ',')} | {g.mean():.4f} | {mean('eval_loss_without_moe'):.4f} | "
                     f"{mean('eval_loss_without_moe') - g.mean():+.4f} | {mean('dropped_fraction'):.1%} | "
                     f"{mean('routed_mass'):.3f} | {mean('bias_changed_fraction'):.1%} | "
                     f"{mean('expert_load_max_over_mean'):.2f} |")
    return lines


EXPERTS_KEY = "model.moe.num_experts"


def experts_markdown(groups: list[Group]) -> list[str]:
    """For sweeps with a grid over the number of experts: per variant, the held-out loss at each E and the step
    from the previous E (paired per seed where there are 2 or more), and whether the loss falls at every step
    (fine-grained MoE scaling: it should, with diminishing steps)."""
    by_variant: dict[str, list[Group]] = {}
    for g in groups:
        if EXPERTS_KEY in (g.first("grid") or {}):
            by_variant.setdefault(g.first("variant") or "", []).append(g)
    lines = []
    for variant, sel in by_variant.items():
        sel = sorted(sel, key=lambda g: g.first("grid")[EXPERTS_KEY])
        if len(sel) < 2:
            continue
        lines += ["", f"### Loss vs number of experts{f': {variant}' if variant else ''}", "",
                  "| experts | total params | activated | held-out loss (seed range) | step from previous E "
                  "| paired step |", "|---|---|---|---|---|---|"]
        steps = []
        for i, g in enumerate(sel):
            v = g.values("eval_loss")
            step = paired_step = "-"
            if i:
                d = g.mean() - sel[i - 1].mean()
                steps.append(d)
                step = f"{d:+.4f}"
                paired_step = _fmt_paired(g, sel[i - 1], ("lower", "higher"))
            lines.append(f"| {g.first('grid')[EXPERTS_KEY]:,} | {g.first('total_params'):,} | "
                         f"{g.first('activated_params'):,} | {g.mean():.4f} ({v.min():.4f}-{v.max():.4f}) | {step} | "
                         f"{paired_step} |")
        falls = all(d < 0 for d in steps)
        diminishing = falls and all(abs(b) <= abs(a) for a, b in zip(steps, steps[1:], strict=False))
        verdict = ("falls at every step, with diminishing steps" if diminishing else "falls at every step"
                   if falls else "does not fall at every step (" + ", ".join(
                       f"{sel[i + 1].first('grid')[EXPERTS_KEY]:,}: {d:+.4f}" for i, d in enumerate(steps)
                       if d >= 0) + ")")
        lines += ["", f"The mean held-out loss {verdict}."]
    return lines


def speed_markdown(groups: list[Group]) -> list[str]:
    """Training tokens/s of each group on the machine that ran it (to size a rerun)."""
    rows = [g for g in groups if g.values("train_tokens_per_s").size]
    if not rows:
        return []
    lines = ["", "## Training speed", "", "Median training tokens/s of each run's logged windows (`metrics.jsonl`), "
             "mean over seeds, on the machine that ran the sweep; wall time per run includes evaluations.", "",
             "| group | total params | tokens/s | wall s per run | tokens per run |", "|---|---|---|---|---|"]
    for g in rows:
        lines.append(f"| {g.name} | {g.first('total_params'):,} | {g.mean('train_tokens_per_s'):,.0f} | "
                     f"{g.mean('wall_s'):,.0f} | {g.first('tokens'):,} |")
    return lines


def markdown(records: list[dict]) -> str:
    groups = groups_of(records)
    sweep, scale = records[0]["sweep"], records[0].get("scale")
    best = min(groups, key=lambda g: g.mean())
    lines = [f"# Sweep `{sweep}` (scale {scale})", "",
             f"{len(records)} finished runs in {len(groups)} groups. Spread: max - min held-out loss over seeds; "
             "a difference within the larger spread is a tie. Paired: the per-seed loss differences (same data "
             "order and seed), a side only when every shared seed agrees.", "",
             "Total/activated: as counted here (embedding and LM head included) and in the paper's counting "
             "(the transformer's: without the token table, the table rows read and the LM head; "
             "`ngram_jax.budget`).", "",
             "| group | seeds | total params | activated | total/act. | paper's | NE share | tokens | held-out loss "
             "| spread | bits/byte | emb. norm | attn-out norm | vs best | paired vs best |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for g in groups:
        verdict, delta = compare(g, best)
        vs = "best" if g is best else {"tie": f"tie ({delta:+.4f})", "b better": f"worse ({delta:+.4f})",
                                       "a better": f"better ({delta:+.4f})"}.get(verdict, f"{delta:+.4f}, no call")
        lines.append(
            f"| {g.name} | {len(g.records)} | {g.first('total_params'):,} | {g.first('activated_params'):,} | "
            f"{_num(g.first('total_over_activated'), '.1f')} | {_num(g.first('transformer_ratio'), '.1f')} | "
            f"{g.first('ngram_share'):.1%} | {g.first('tokens'):,} | {g.mean():.4f} | {_fmt_spread(g)} | "
            f"{g.mean('eval_bits_per_byte'):.4f} | {g.mean('embedding_norm'):.3g} | "
            f"{g.mean('attention_out_norm'):.3g} | {vs} | "
            f"{'best' if g is best else _fmt_paired(g, best, ('better', 'worse'))} |")
    pairs = baseline_pairs(groups)
    if pairs:
        lines += ["", "## NE vs its parameter-equivalent MoE baseline", "",
                  "| NE group | NE loss | MoE loss | NE - MoE | total NE / MoE | activated NE / MoE | call "
                  "| paired call |",
                  "|---|---|---|---|---|---|---|---|"]
        for ne, moe in pairs:
            verdict, delta = compare(ne, moe)
            call = {"a better": "NE better", "b better": "MoE better"}.get(verdict, verdict)
            lines.append(f"| {ne.name} | {ne.mean():.4f} | {moe.mean():.4f} | {delta:+.4f} | "
                         f"{ne.first('total_params'):,} / {moe.first('total_params'):,} | "
                         f"{ne.first('activated_params'):,} / {moe.first('activated_params'):,} | {call} | "
                         f"{_fmt_paired(ne, moe, ('NE better', 'MoE better'))} |")
    lines += (experts_markdown(groups) + routing_markdown(groups) + curve_markdown(groups)
              + group_curve_markdown(groups) + speed_markdown(groups))
    return "\n".join(lines) + "\n"


def _kind(g: Group) -> str:
    if g.first("baseline_of"):
        return "MoE baseline"
    return "NE" if (g.first("ngram_share") or 0) > 0 else "no NE"


def plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = groups_of(records)
    written = []
    sweep = f"{records[0]['sweep']} ({records[0].get('scale')})"

    def save(fig, name: str) -> None:
        fig.tight_layout()
        storage.write_figure(fig, out / name, dpi=110)
        plt.close(fig)
        written.append(out / name)

    def scatter(xkey: str, xlabel: str, fname: str, logx: bool):
        fig, ax = plt.subplots(figsize=(6, 4))
        variants = list(dict.fromkeys(g.first("variant") for g in groups))
        markers = "osD^v<>p*h"
        colors = {"NE": "C1", "MoE baseline": "C0", "no NE": "C2"}  # one colour per kind, a marker per variant
        for kind in dict.fromkeys(_kind(g) for g in groups):
            for vi, variant in enumerate(variants):  # one series per kind and variant (e.g. width), lines joined
                sel = sorted([g for g in groups if _kind(g) == kind and g.first("variant") == variant],
                             key=lambda g: g.first(xkey))
                if not sel:
                    continue
                x = [g.first(xkey) for g in sel]
                y = [g.mean() for g in sel]
                lo = [g.mean() - g.values("eval_loss").min() for g in sel]
                hi = [g.values("eval_loss").max() - g.mean() for g in sel]
                label = kind if len(variants) < 2 else f"{kind}, {variant}"
                ax.errorbar(x, y, yerr=[lo, hi], fmt=markers[vi % len(markers)] + "-", capsize=3, label=label,
                            color=colors[kind], alpha=0.85)
        if logx:
            ax.set_xscale("log")
        ax.set_title(f"{sweep}: held-out loss vs {xlabel}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("held-out loss (nats/token), bars: seed range")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, fname)

    scatter("total_params", "total parameters", "loss_vs_total_params.png", True)
    if all(g.first("total_over_activated") for g in groups):  # the paper's sparsity axis (finding 1)
        scatter("total_over_activated", "total / activated parameters", "loss_vs_total_over_activated.png", True)
    if any((g.first("ngram_share") or 0) > 0 for g in groups):
        scatter("ngram_share", "N-gram Embedding share of total parameters", "loss_vs_ngram_share.png", False)
    # one plot per grid key with several numeric values: loss against it, a line per other setting
    grid_keys = list(dict.fromkeys(k for r in records for k in (r.get("grid") or {})))
    for key in grid_keys:
        vals = {r["grid"].get(key) for r in records if key in (r.get("grid") or {})}
        if len(vals) < 2 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in vals):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        lines: dict[str, list[Group]] = {}
        for g in groups:
            grid = g.first("grid") or {}
            if key not in grid:  # e.g. the 0% point of ne_share: on the share plot only
                continue
            rest = {k: v for k, v in grid.items() if k != key}
            label = ", ".join([x for x in [g.first("variant"), _kind(g)] if x]
                              + [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in rest.items()])
            lines.setdefault(label, []).append(g)
        for i, (label, sel) in enumerate(lines.items()):
            sel = sorted(sel, key=lambda g: g.first("grid")[key])
            x = [g.first("grid")[key] for g in sel]
            y = [g.mean() for g in sel]
            err = [[g.mean() - g.values("eval_loss").min() for g in sel],
                   [g.values("eval_loss").max() - g.mean() for g in sel]]
            ax.errorbar(x, y, yerr=err, marker="osD^v<>p*h"[i // 10 % 10], capsize=3, label=label)  # 10 colours
        if min(vals) > 0 and max(vals) >= 10 * min(vals):  # e.g. experts 4 .. 1024
            ax.set_xscale("log")
        ax.set_title(f"{sweep}: held-out loss vs {key}", fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel("held-out loss (nats/token), bars: seed range")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, f"loss_vs_{key.replace('.', '_')}.png")
    for ne, moe in baseline_pairs(groups):  # loss vs tokens: seed bands, and the paired difference per seed
        tokens, diffs = paired_curve(ne, moe)
        if not tokens:
            continue
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
        for g, kind in ((ne, "NE"), (moe, "MoE baseline")):
            ts, by_seed = curves(g)
            c = np.stack(list(by_seed.values()))
            color = {"NE": "C1", "MoE baseline": "C0"}[kind]
            seeds = f"{len(by_seed)} seed" + ("s" if len(by_seed) > 1 else "")
            ax.plot(ts, c.mean(0), "o-", color=color, label=f"{kind} ({g.name}, {seeds})")
            ax.fill_between(ts, c.min(0), c.max(0), color=color, alpha=0.25)
        for seed, d in diffs.items():
            bx.plot(tokens, d, "o-", label=f"seed {seed}")
        bx.axhline(0, color="k", lw=0.8)
        cross, _ = sign_change(tokens, diffs)
        if cross is not None:
            bx.axvline(cross, color="C3", ls="--", label=f"sign change on every seed: {cross:,}")
        for a, title, ylabel in ((ax, "held-out loss vs tokens (band: seed range)", "held-out loss (nats/token)"),
                                 (bx, "paired difference NE - MoE per seed", "NE - MoE (nats/token)")):
            a.set_xscale("log")
            a.set_xlabel("training tokens")
            a.set_ylabel(ylabel)
            a.set_title(f"{sweep}, {ne.name}: {title}", fontsize=8)
            a.grid(alpha=0.3)
            a.legend(fontsize=7)
        save(fig, f"curve_{ne.name}.png")
    tokens, cs = group_curves(groups)
    if tokens:  # loss vs tokens of every group that is not in an NE / MoE-baseline pair, seed range as a band
        fig, ax = plt.subplots(figsize=(7, 4))
        share_of = {g.name: g.first("ngram_share") or 0.0 for g in groups}
        for i, (name, by_seed) in enumerate(cs.items()):
            c = np.stack(list(by_seed.values()))  # [seeds, points]
            share = share_of[name]
            ax.plot(tokens, c.mean(0), "o-", color=f"C{i}", label=f"{name} ({share:.0%} NE, {len(by_seed)} seeds)")
            ax.fill_between(tokens, c.min(0), c.max(0), color=f"C{i}", alpha=0.2)
        ax.set_xscale("log")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("held-out loss (nats/token)")
        ax.set_title(f"{sweep}: held-out loss vs tokens (band: seed range)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "curves.png")
    if all(g.first("embedding_norm") is not None for g in groups):
        fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(groups)), 4))
        x = np.arange(len(groups))
        ax.bar(x - 0.2, [g.mean("embedding_norm") for g in groups], 0.4, label="input embedding")
        ax.bar(x + 0.2, [g.mean("attention_out_norm") for g in groups], 0.4, label="first attention output")
        ax.set_xticks(x, [g.name for g in groups], rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("mean L2 norm per token")
        ax.set_title(f"{sweep}: input embedding and first attention output norms", fontsize=9)
        ax.legend()
        save(fig, "activation_norms.png")
    return written


def write_report(out: str | Path) -> tuple[Path, list[Path]]:
    out = storage.location(out, "DIR")  # a local path or a gs:// / s3:// URL
    records = load_records(out)
    figures = plots(records, out)
    text = markdown(records) + "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    path = out / "report.md"
    path.write_text(text)
    return path, figures


def write_document(dirs: list[str | Path], doc: str | Path, conclusions: str | Path | None = None) -> Path:
    """One markdown document (e.g. docs/STUDY.md) from several sweeps' results: each sweep's tables and
    plots (linked relative to the document), then the written conclusions file, if any."""
    doc = Path(doc)
    parts = ["# Study results", "",
             "Generated by `python -m ngram_jax.study report " + " ".join(map(str, dirs)) + f" --doc {doc}`"
             + (f" from the results and {conclusions}" if conclusions else "") + ".", ""]
    for d in dirs:
        _, figures = write_report(d)
        text = markdown(load_records(d)).replace("# Sweep", "## Sweep", 1)
        links = [f"![{f.stem}]({os.path.relpath(f.resolve(), doc.resolve().parent)})" for f in figures]
        parts += [text, *links, ""]
    if conclusions is not None:
        path = Path(conclusions)
        if not path.is_file():
            raise MissingInputError(f"conclusions file not found: {path}")
        parts += ["## Conclusions", "", storage.read_text(path, "--conclusions", "a Markdown file")]
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(parts))
    return doc
