"""Sweep files (``configs/paper/*.yaml``): a base config and a grid (or list) of overrides, expanded into
named, validated runs before anything trains.

    name: ne_share                     # the sweep's name (results.jsonl records carry it)
    description: NE share of the total parameters at a fixed total
    base: ../models/tiny_ne.yaml       # relative to the sweep file
    seeds: [0, 1]                      # every run once per seed (sets `seed` and `data.seed`)
    set: {train.steps: 600}            # dotted overrides applied to every run
    runs:                              # optional variants, each with a name, its own overrides and
      - {name: ne, set: {model.ngram.enabled: true}}             # optionally its own grid ({}: one run)
      - {name: dense, set: {model.ngram.enabled: false}, grid: {}}
    grid: {model.ngram.ratio: [1.37, 4.37]}   # the Cartesian product of the values, for each variant
    fixed_total: {adjust: model.moe.num_experts, total: 3000000}  # hold total parameters by solving for
                                                                   # an integer key the total is linear in
    moe_baseline: true                 # add the parameter-equivalent MoE baseline of every NE run
    screen: moe_scaling                # one seed: a screen whose choice the named sweep confirms on >= 2 seeds
    baseline_set: {train.lr: 1.0e-2}   # overrides of the baselines only: an arm's own tuned learning rate
    scales:                            # --scale NAME: merged over the above (set, grid: by key; others replace)
      cpu: {set: {...}}
      gpu: {base: ../models/study_gpu.yaml, fixed_total: {...}}

Overrides apply in this order: ``set``, the scale's ``set``, the variant's ``set``, the grid values, the
seed, then the command line's ``--set``; then ``fixed_total``, then the MoE baseline is derived
(``ngram_jax.budget.moe_baseline``) and ``baseline_set`` applied to it. A baseline differs from its NE run
only in where the parameters go (:data:`BASELINE_DIFFERS_IN`) and in the keys an arm may tune on its own
(:data:`BASELINE_TUNABLE`): any other difference (embedding treatment, init, dtype, schedule, data, routing)
is refused at expansion, naming the key (docs/STUDY_GUIDE.md, "Both arms alike").
A run is named ``VARIANT-KEY=VALUE-...-sSEED`` (keys by their last
component); its ``group`` is the name without the seed (the runs a seed spread is taken over).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ngram_jax import storage
from ngram_jax.config import (
    Config,
    ConfigError,
    ConfigWarning,
    load_config,
    load_yaml,
    parse_override,
    replace,
    to_dict,
)

SWEEP_KEYS = ("name", "description", "findings", "base", "seeds", "set", "runs", "grid", "fixed_total",
              "moe_baseline", "baseline_set", "screen", "scales")
SCALE_KEYS = ("base", "set", "grid", "runs", "seeds", "fixed_total", "moe_baseline", "baseline_set")
# where the parameters go: the keys ngram_jax.budget.moe_baseline changes (and the run's own name and directory)
BASELINE_DIFFERS_IN = ("name", "train.run_dir", "model.ngram.enabled", "model.ple.kind", "model.moe.num_experts")
# what an arm may set on its own (baseline_set): its learning rate, tuned on the grid both arms share
BASELINE_TUNABLE = ("train.lr",)
RUN_KEYS = ("name", "set", "grid")
FIXED_TOTAL_KEYS = ("adjust", "total")


@dataclass(frozen=True)
class Run:
    name: str
    group: str  # the name without the seed
    seed: int
    overrides: dict[str, Any]  # everything applied over the base file, in order
    derived: dict[str, Any]  # keys set by fixed_total and the MoE baseline
    config: Config
    baseline_of: str | None = None  # the group of the NE run this MoE baseline matches
    variant: str = ""
    grid: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sweep:
    path: Path
    name: str
    scale: str
    description: str
    findings: tuple
    runs: tuple[Run, ...]
    screen: str | None = None  # a one-seed screen: the sweep (file stem in the same folder) confirming its choice


def _check_keys(where: str, data: Any, valid: Sequence[str]) -> dict:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    unknown = sorted(set(data) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(valid)}")
    return dict(data)


def _dotted(where: str, data: Any) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping of dotted config keys to values, got {data!r}")
    return {str(k): v for k, v in data.items()}


def read_sweep_file(path: str | Path, scale: str) -> dict:
    """The sweep file with the scale's section merged in; unknown keys are a :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    data = load_yaml(path, "sweep file") or {}
    data = _check_keys(str(path), data, SWEEP_KEYS)
    for key in ("name", "base"):
        if not isinstance(data.get(key), str):
            raise ConfigError(f"{path}: '{key}' is required (a string)")
    scales = data.pop("scales", None) or {}
    if not isinstance(scales, Mapping):
        raise ConfigError(f"{path}: 'scales' must map a scale name to its section")
    if scale not in scales:
        raise ConfigError(f"{path}: no scale {scale!r}; this sweep has: {', '.join(scales) or 'none'}")
    section = _check_keys(f"{path}: scales.{scale}", scales[scale] or {}, SCALE_KEYS)
    out = dict(data)
    out["set"] = {**_dotted(f"{path}: set", data.get("set")),
                  **_dotted(f"{path}: scales.{scale}.set", section.pop("set", None))}
    out["grid"] = {**_dotted(f"{path}: grid", data.get("grid")),
                   **_dotted(f"{path}: scales.{scale}.grid", section.pop("grid", None))}
    out.update(section)
    return out


def _value_text(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace(" ", "")


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _solve_total(cfg: Config, key: str, total: int) -> tuple[Config, int]:
    """The config with the integer ``key`` set so that the total parameter count is closest to ``total``
    (the total is linear in such a key: experts, expert or FFN width, blocks)."""
    from ngram_jax.budget import closed_form_budget

    def total_at(v: int) -> int:
        return closed_form_budget(replace(cfg, **{key: v}).model)["total"]

    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, part):
            raise ConfigError(f"fixed_total.adjust: unknown key {key}")
        node = getattr(node, part)
    if isinstance(node, bool) or not isinstance(node, int):
        raise ConfigError(f"fixed_total.adjust: {key} must be an integer key, it is {node!r}")
    v0 = max(node, 1)
    t0, slope = total_at(v0), total_at(v0 + 1) - total_at(v0)
    if slope <= 0:
        raise ConfigError(f"fixed_total: the total does not grow with {key}")
    v = round(v0 + (total - t0) / slope)
    if v < 1:
        raise ConfigError(f"fixed_total: reaching {total:,} parameters needs {key}={v} (< 1): the other "
                          f"parameters already hold {t0 - slope * v0:,}; raise fixed_total.total")
    try:
        return replace(cfg, **{key: v}), v
    except ConfigError as err:
        raise ConfigError(f"fixed_total: reaching {total:,} parameters needs {key}={v}, which is invalid ({err}); "
                          "change fixed_total.total") from None


def expand(path: str | Path, *, scale: str = "cpu", sets: Sequence[str] = (), out: str | Path = "runs/study") -> Sweep:
    """Expand a sweep file into validated runs; any invalid run is a :class:`ConfigError` naming it."""
    path = Path(path)
    spec = read_sweep_file(path, scale)
    name = spec["name"]
    base = (path.parent / spec["base"]).resolve()
    cli_sets = dict(parse_override(s) for s in sets)
    seeds = spec.get("seeds", [0])
    if not (isinstance(seeds, list) and seeds and all(type(s) is int for s in seeds)):
        raise ConfigError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    variants = spec.get("runs") or [{"name": "", "set": {}}]
    if not isinstance(variants, list):
        raise ConfigError(f"{path}: runs must be a list of {{name, set}} mappings")
    variants = [_check_keys(f"{path}: runs[{i}]", v, RUN_KEYS) for i, v in enumerate(variants)]
    grids = []  # the grid of each variant: its own, or the sweep's
    for v in variants:
        where = f"{path}: runs {v.get('name')}: grid" if "grid" in v else f"{path}: grid"
        grid = _dotted(where, v["grid"]) if "grid" in v else spec["grid"]
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{where}.{key} must be a non-empty list of values, got {values!r}")
        grids.append(grid)
    fixed = spec.get("fixed_total")
    if fixed is not None:
        fixed = _check_keys(f"{path}: fixed_total", fixed, FIXED_TOTAL_KEYS)
        if not isinstance(fixed.get("adjust"), str) or not isinstance(fixed.get("total"), int):
            raise ConfigError(f"{path}: fixed_total needs adjust (a dotted integer key) and total (an integer)")
    baseline_sets = _dotted(f"{path}: baseline_set", spec.get("baseline_set"))
    if baseline_sets and not spec.get("moe_baseline"):
        raise ConfigError(f"{path}: baseline_set sets keys of the MoE baselines, and moe_baseline is not true")
    short = _short_names(list(dict.fromkeys(k for g in grids for k in g)))
    try:
        base_cfg = load_config(base)
    except ConfigError as err:
        raise ConfigError(f"{path}: base {spec['base']}: {err}") from None

    runs: list[Run] = []
    points = [(variant, dict(zip(grid, values, strict=True)))
              for variant, grid in zip(variants, grids, strict=True)
              for values in itertools.product(*grid.values())]
    for variant, point in points:
        vname = str(variant.get("name") or "")
        group = "-".join([p for p in [vname] if p] + [f"{short[k]}={_value_text(v)}" for k, v in point.items()])
        group = group or name
        for seed in seeds:
            run_name = f"{group}-s{seed}"
            overrides = {**spec["set"], **_dotted(f"{path}: runs {vname}", variant.get("set")), **point,
                         "seed": seed, "data.seed": seed, **cli_sets}
            where = f"{path}: run {run_name}"
            try:
                with warnings.catch_warnings():
                    # sweeps probe the regions the paper warns about (NE > 50%, table ratios near k*V)
                    warnings.simplefilter("ignore", ConfigWarning)
                    cfg = replace(base_cfg, **overrides)
                    derived: dict[str, Any] = {}
                    if fixed is not None:
                        cfg, v = _solve_total(cfg, fixed["adjust"], fixed["total"])
                        derived[fixed["adjust"]] = v
                    cfg = _finish(cfg, run_name, out)
                    runs.append(Run(run_name, group, seed, overrides, derived, cfg, variant=vname, grid=point))
                    if spec.get("moe_baseline") and (cfg.model.ngram.enabled or cfg.model.ple.kind == "plne"):
                        b_name = f"{group}-moe-s{seed}"
                        where = f"{path}: run {b_name} (the MoE baseline of {run_name})"
                        b_cfg = _finish(fair_baseline(cfg, baseline_sets), b_name, out)
                        b_derived = {**derived, "model.ngram.enabled": False,
                                     "model.moe.num_experts": b_cfg.model.moe.num_experts, **baseline_sets}
                        if cfg.model.ple.kind == "plne":
                            b_derived["model.ple.kind"] = "ple"
                        runs.append(Run(b_name, f"{group}-moe", seed, overrides, b_derived, b_cfg, baseline_of=group,
                                        variant=vname, grid=point))
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from None
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{path}: runs share the name {dup[0]!r}: give each variant in 'runs' its own name")
    screen = spec.get("screen")
    if screen is not None and not (isinstance(screen, str) and (path.parent / f"{screen}.yaml").is_file()):
        raise ConfigError(f"{path}: screen must name the sweep file (in {path.parent}) that confirms this screen's "
                          f"choice on 2 or more seeds, got {screen!r}")
    return Sweep(path, name, scale, str(spec.get("description", "")), tuple(spec.get("findings") or ()),
                 tuple(runs), screen)


def fair_baseline(cfg: Config, baseline_sets: Mapping[str, Any] | None = None) -> Config:
    """The parameter-equivalent MoE baseline of an NE run (``ngram_jax.budget.moe_baseline``) with its own
    ``baseline_sets``, checked to differ from ``cfg`` only in :data:`BASELINE_DIFFERS_IN` and
    :data:`BASELINE_TUNABLE`: any other difference is a :class:`ConfigError` naming the key."""
    from ngram_jax.budget import moe_baseline
    from ngram_jax.checkpoint import config_differences

    b_cfg = moe_baseline(cfg)
    if baseline_sets:
        b_cfg = replace(b_cfg, **dict(baseline_sets))
    diffs = config_differences(to_dict(cfg), b_cfg, BASELINE_DIFFERS_IN + BASELINE_TUNABLE)
    if diffs:
        raise ConfigError("the MoE baseline would differ from its NE run in more than where the parameters go ("
                          + "; ".join(d.replace(": checkpoint", ": NE run").replace("-> requested", "-> baseline")
                                      for d in diffs[:3])
                          + f"); a baseline may set only {', '.join(BASELINE_TUNABLE)} on its own (baseline_set): "
                          "set everything else for both arms")
    return b_cfg


def _finish(cfg: Config, run_name: str, out: str | Path) -> Config:
    """Name the run, give it its directory, and run the budget checks (int32 table rows)."""
    from ngram_jax.budget import check_config

    run_dir = storage.location(out, "--out") / "runs" / run_name  # a local path or a URL
    cfg = replace(cfg, **{"name": run_name, "train.run_dir": str(run_dir)})
    return check_config(cfg)
