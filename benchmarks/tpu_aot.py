"""TPU ahead-of-time compile benchmarks (docs/TPU.md): each case compiled by libtpu for its topology on this CPU
machine (``ngram_jax.tools.aot.compile_for_tpu``), one subprocess per case, results appended to a JSONL file.

    python benchmarks/tpu_aot.py                      # every case not yet in the results file
    python benchmarks/tpu_aot.py --only fl_pod fl_pod_xla --out docs/tpu/aot_results.jsonl
    python benchmarks/tpu_aot.py --list
    python benchmarks/tpu_aot.py --table              # markdown tables of the results
    python benchmarks/tpu_aot.py --table --doc docs/TPU.md   # ... written into the page's marked blocks

Cases: LongCat-Flash-Lite's training step on the documented pod (``aot-pod`` in docs/TPU.md; the mesh, batch
and remat in configs/models/longcat_flash_lite.yaml), with the xla gather instead of the kernel, and at
r = 39; its decode step at batch 1 to 64 and the speculative verify pass (K=3) on a 4-chip v5p slice in
bfloat16; the paper's study scales (configs/models/paper_*.yaml) and their parameter-equivalent MoE baselines
on v5e-8 and v6e-8. A case that does not fit is recorded with libtpu's out-of-memory figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FL = "configs/models/longcat_flash_lite.yaml"
POD = "v5p:4x4x4"  # docs/TPU.md aot-pod: the config's own mesh, batch and remat
SERVE = ["model.param_dtype=bfloat16"]  # inference weights in bfloat16
CASES: dict[str, dict] = {
    "fl_pod": {"config": FL, "topology": POD},
    "fl_pod_half": {"config": FL, "topology": "v5p:4x4x2"},  # half the chips: does it still fit?
    "fl_pod_xla": {"config": FL, "topology": POD, "overrides": ["model.ngram.kernel=xla"]},
    "fl_pod_r39": {"config": FL, "topology": POD, "overrides": ["model.ngram.ratio=39.0"]},
    **{f"fl_decode_b{b}": {"config": FL, "topology": "v5p:2x2x1", "mesh": "expert=4", "step": "decode", "batch": b,
                          "seq": 4096, "overrides": SERVE} for b in (1, 2, 4, 8, 16, 32, 64)},
    **{f"fl_decode_b64_8chips{x}": {"config": FL, "topology": "v5p:2x2x2", "mesh": "data=2,expert=4",
                                   "step": "decode", "batch": 64, "seq": 4096, "overrides": [*SERVE, *o]}
       for x, o in (("", []), ("_no_ne", ["model.ngram.enabled=false"]))},  # 4 chips do not hold batch 64
    **{f"fl_decode_b{b}_no_ne": {"config": FL, "topology": "v5p:2x2x1", "mesh": "expert=4", "step": "decode",
                                 "batch": b, "seq": 4096, "overrides": [*SERVE, "model.ngram.enabled=false"]}
       for b in (1, 64)},  # the same backbone without the N-gram Embedding: the NE share of the bytes
    **{f"fl_verify_k3_b{b}": {"config": FL, "topology": "v5p:2x2x1", "mesh": "expert=4", "step": "verify",
                             "batch": b, "seq": 4096, "draft_tokens": 3, "overrides": SERVE} for b in (1, 16)},
    **{f"{scale}_{kind}_{gen}": {"config": f"configs/models/paper_{scale}.yaml", "topology": f"{gen}:2x4",
                                 "mesh": "fsdp=8", "baseline": kind == "moe"}
       for scale in ("280m", "790m", "1p3b") for kind in ("ne", "moe") for gen in ("v5e", "v6e")},
    # the N-gram tables with row-wise Adagrad: no AdamW moments and no dense gradient for half the parameters
    **{f"{scale}_ne_{gen}_rowwise": {"config": f"configs/models/paper_{scale}.yaml", "topology": f"{gen}:2x4",
                                     "mesh": "fsdp=8", "overrides": ["train.table_optimizer=rowwise_adagrad"]}
       for scale in ("280m", "790m", "1p3b") for gen in ("v5e", "v6e")},
}


def run_case(name: str) -> dict:
    """Compile one case in this process; the report as JSON (``hlo`` dropped) plus the case."""
    from ngram_jax.budget import closed_form_budget, moe_baseline
    from ngram_jax.config import load_config
    from ngram_jax.tools.aot import compile_for_tpu, format_report

    case = CASES[name]
    cfg = load_config(ROOT / case["config"], case.get("overrides", []))
    if case.get("baseline"):
        cfg = moe_baseline(cfg)
    r = compile_for_tpu(cfg, case["topology"], mesh_spec=case.get("mesh"), step=case.get("step", "train"),
                        batch=case.get("batch"), seq=case.get("seq"), draft_tokens=case.get("draft_tokens", 3))
    print(format_report(r), file=sys.stderr, flush=True)
    b = closed_form_budget(cfg.model)
    return {"case": name, **case, "date": datetime.date.today().isoformat(), "total_params": b["total"],
            "activated_params": b["activated_max"], "ngram_params": b["ngram"], **r.to_json()}


def _gb(n) -> str:
    return f"{n / 1e9:,.1f}"


def _last(records: list[dict]) -> dict[str, dict]:
    """The last record of each case, in the order of CASES (cases no longer defined after them)."""
    last = {r["case"]: r for r in records}
    return {c: last[c] for c in [*CASES, *last] if c in last}


def tables(records: list[dict]) -> dict[str, str]:
    """Markdown tables of the results (the last record of each case): ``train`` steps, and ``decode`` for the
    decode and verify steps."""
    last = _last(records)
    lines = ["| case | config | chips | mesh | batch x seq | fits | peak GB / HBM | temporaries GB | FLOPs/chip "
             "| bytes/chip | roofline ms | tokens/s/chip | MFU bound | collective GB (AG/AR/RS/A2A) "
             "| Mosaic (gather) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in last.values() if r["step"] == "train"):
        c = r["collectives"]
        coll = "/".join(_gb(c.get(k, {}).get("bytes", 0)) for k in ("all-gather", "all-reduce", "reduce-scatter",
                                                                     "all-to-all"))
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1)
        fits = "yes" if r["fits"] else f"no (+{_gb(r['shortfall_bytes'])} GB)"
        perf = ("-",) * 5 if not r.get("roofline_s") else (
            f"{r['flops']:.3g}", f"{r['bytes_accessed']:.3g}", f"{r['roofline_s'] * 1e3:,.0f}",
            f"{r['tokens_per_s_per_chip']:,.0f}", f"{r['mfu_bound']:.1%}")
        lines.append(f"| {r['case']} | {r['config']} | {r['num_chips']} ({r['topology']}) | {mesh} | "
                     f"{r['batch']} x {r['seq']} | {fits} | {_gb(r['peak_bytes'])} / {_gb(r['hbm_bytes'])} | "
                     f"{_gb(r['memory'].get('temporaries', r['peak_bytes']))} | {' | '.join(perf[:4])} | {perf[4]} | "
                     f"{coll} | {r['mosaic_calls']} ({r['ngram_gather_calls']}) |")
    out = {"train": "\n".join(lines)}
    lines = ["| case | step | chips | batch | fits | peak GB | arguments GB | bytes/chip per step | "
             "roofline ms | tokens/s (all chips) | bytes per token |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in last.values() if r["step"] != "train"):
        per_step = r["batch"] * (1 if r["step"] == "decode" else r.get("draft_tokens", 3) + 1)
        head = f"| {r['case']} | {r['step']} | {r['num_chips']} | {r['batch']} | "
        if not r.get("roofline_s"):  # did not fit: libtpu's figure of what it needed, nothing measured
            lines.append(head + f"no (+{_gb(r['shortfall_bytes'])} GB) | {_gb(r['peak_bytes'])} "
                         "| - | - | - | - | - |")
            continue
        tok_s = r["tokens_per_s_per_chip"] * r["num_chips"]
        lines.append(head + f"{'yes' if r['fits'] else 'no'} | {_gb(r['peak_bytes'])} | "
                     f"{_gb(r['memory'].get('arguments', 0))} | {r['bytes_accessed']:.3g} | "
                     f"{r['roofline_s'] * 1e3:,.2f} | {tok_s:,.0f} | "
                     f"{r['bytes_accessed'] * r['num_chips'] / per_step / 1e9:,.2f} GB |")
    out["decode"] = "\n".join(lines)
    return out


def costs(records: list[dict]) -> str:
    """Chip-hours at the roofline of the compiled study scales: one 300B-token run of each, and each sweep of
    configs/paper at its gpu preset (its runs' training FLOPs at the MFU bound of the smallest compiled scale
    on that generation, paper_280m with NE, with the row-wise table optimizer where only that fits: the sweeps'
    models are smaller still, so the hours are a lower bound)."""
    from ngram_jax.study.runner import run_tokens
    from ngram_jax.study.sweep import expand
    from ngram_jax.tools.aot import CHIPS
    from ngram_jax.train.metrics import flops_per_token

    last = _last(records)
    study = [r for r in last.values() if r["config"].startswith("paper_")]  # the record names the config file's stem
    lines = ["| case | total params | activated | fits on 8 chips | tokens/s per chip | MFU bound "
             "| chip-hours for 300B tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in study:
        tps = r.get("tokens_per_s_per_chip")
        hours = f"{300e9 / tps / 3600:,.0f}" if tps else "-"
        lines.append(f"| {r['case']} | {r['total_params'] / 1e9:.2f}B | {r['activated_params'] / 1e6:.0f}M | "
                     f"{'yes' if r['fits'] else 'no, ' + _gb(r['peak_bytes']) + ' GB needed'} | "
                     + (f"{tps:,.0f} | {r['mfu_bound']:.1%} | {hours} |" if tps else "- | - | - |"))
    gens = sorted({r["topology"].split(":")[0] for r in study})
    head = " | ".join(f"{g} chip-hours" for g in gens)
    lines += ["", f"| sweep (gpu preset) | runs | tokens | training FLOPs | {head} |",
              "|---|---|---|---|" + "---|" * len(gens)]
    mfu = {}  # per generation: the dense-optimizer 280M case, else the row-wise one where only that fits
    for g in gens:
        ref = next((last[c] for c in (f"280m_ne_{g}", f"280m_ne_{g}_rowwise") if last.get(c, {}).get("fits")), None)
        mfu[g] = ref["mfu_bound"] if ref else None
    for path in sorted((ROOT / "configs/paper").glob("*.yaml")):
        sw = expand(path, scale="gpu")
        flops = sum(run_tokens(r.config) * flops_per_token(r.config, _activated(r.config)) for r in sw.runs)
        cells = [f"{flops / (mfu[g] * CHIPS[g].peak_flops) / 3600:,.1f}" if mfu[g] else "-" for g in gens]
        lines.append(f"| {sw.name} | {len(sw.runs)} | {sum(run_tokens(r.config) for r in sw.runs) / 1e9:.2f}B | "
                     f"{flops:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def blocks(records: list[dict]) -> dict[str, str]:
    """Every table of the results, by the docs/TPU.md block it fills: ``train``, ``decode``, ``study``."""
    return {**tables(records), "study": costs(records)}


def into_doc(page: str, parts: dict[str, str]) -> str:
    """``page`` with each of :func:`blocks` between its markers, ``<!-- KEY -->`` and ``<!-- /KEY -->``."""
    for key, block in parts.items():
        start, end = f"<!-- {key} -->", f"<!-- /{key} -->"
        if start not in page or end not in page:
            raise SystemExit(f"error: the page has no {start} ... {end} block")
        head, rest = page.split(start, 1)
        page = f"{head}{start}\n{block}\n{end}{rest.split(end, 1)[1]}"
    return page


def _activated(cfg) -> int:
    from ngram_jax.budget import closed_form_budget

    return closed_form_budget(cfg.model)["activated_max"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--out", default=str(ROOT / "docs/tpu/aot_results.jsonl"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--redo", action="store_true", help="compile cases already in --out again (appended)")
    ap.add_argument("--table", action="store_true", help="print the results as markdown tables")
    ap.add_argument("--doc", help="with --table: write the tables into this page between its <!-- train -->, "
                    "<!-- decode --> and <!-- study --> markers (docs/TPU.md)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the subprocess: compile one case, print its JSON
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return 0
    if args.list:
        for name, case in CASES.items():
            print(name, json.dumps(case))
        return 0
    out = Path(args.out)
    if args.table:
        records = [json.loads(x) for x in out.read_text().splitlines()]
        parts = blocks(records)
        if args.doc:
            Path(args.doc).write_text(into_doc(Path(args.doc).read_text(), parts))
        print("\n\n".join(parts.values()))
        return 0
    done = {json.loads(x)["case"] for x in out.read_text().splitlines()} if out.is_file() else set()
    names = args.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown case {unknown[0]}; see --list")
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for name in names:
        if name in done and not args.redo:
            continue
        p = subprocess.run([sys.executable, __file__, "--case", name], env=env, capture_output=True, text=True,
                           cwd=ROOT)
        if p.returncode != 0:
            print(f"{name}: failed\n{p.stderr[-3000:]}", file=sys.stderr, flush=True)
            continue
        rec = json.loads(p.stdout.splitlines()[-1])
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"{name}: fits={rec['fits']} peak {rec['peak_bytes'] / 1e9:.1f} GB, compiled in {rec['compile_s']:.0f} s",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
