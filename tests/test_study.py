"""The study runner (python -m ngram_jax.study): sweep expansion and validation before training, bad
input, results skip/resume, the report's seed-spread calls, and every configs/paper sweep."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ngram_jax.budget import closed_form_budget, moe_baseline
from ngram_jax.config import ConfigError
from ngram_jax.data.corpus import bundled_corpus_files
from ngram_jax.data.prepare import prepare
from ngram_jax.data.study_corpus import MIN_TRAIN_TOKENS
from ngram_jax.errors import DataError
from ngram_jax.study import report, runner
from ngram_jax.study.sweep import expand

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model.vocab_size": 512, "model.d_model": 32, "model.num_blocks": 1, "model.ffn_dim": 64,
        "model.moe.num_experts": 4, "model.moe.num_zero_experts": 0, "model.moe.expert_dim": 16,
        "model.attention.num_heads": 2, "model.attention.q_lora_rank": 16, "model.attention.kv_lora_rank": 8,
        "model.attention.qk_nope_head_dim": 8, "model.attention.v_head_dim": 8,
        "model.attention.qk_rope_head_dim": 4, "model.ngram.row_multiple": 1, "data.seq_len": 16,
        "data.batch_size": 4, "data.bundled": False, "train.steps": 2, "train.warmup_steps": 1,
        "train.eval_batches": 1, "train.progress": False, "train.checkpoint_every": 2}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "plays"
    prepare(bundled_corpus_files()[:2], out, train_bpe_vocab=512, heldout_fraction=0.1)
    return out


def sweep_file(tmp_path, data_dir=None, name="tiny", **spec) -> Path:
    body = {"name": name, "base": str(ROOT / "configs/models/tiny_ne.yaml"), "seeds": [0],
            "set": {**TINY, "data.path": str(data_dir or tmp_path / "none")}, "scales": {"cpu": {}}, **spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_expand_names_overrides_baselines_and_fixed_total(tmp_path):
    path = sweep_file(tmp_path, seeds=[0, 1], moe_baseline=True,
                      runs=[{"name": "ne", "set": {"model.ngram.enabled": True}},
                            {"name": "plain", "set": {"model.ngram.enabled": False}}],
                      grid={"model.moe.top_k": [1, 2]},
                      scales={"cpu": {"set": {"train.steps": 7, "train.lr": 0.5}},
                              "gpu": {"grid": {"model.moe.top_k": [3]}}})
    sw = expand(path, sets=["train.lr=0.25"], out=tmp_path / "o")
    names = [r.name for r in sw.runs]
    assert names[:3] == ["ne-top_k=1-s0", "ne-top_k=1-moe-s0", "ne-top_k=1-s1"]
    assert len(names) == 2 * 2 * 2 + 2 * 2  # NE runs get a baseline each, plain runs do not
    by = {r.name: r for r in sw.runs}
    ne, moe = by["ne-top_k=2-s1"], by["ne-top_k=2-moe-s1"]
    assert ne.config.train.steps == 7 and ne.config.train.lr == 0.25  # scale set, then --set wins
    assert ne.config.seed == 1 == ne.config.data.seed and ne.group == "ne-top_k=2"
    assert ne.config.train.run_dir == str(tmp_path / "o/runs/ne-top_k=2-s1")
    assert moe.baseline_of == "ne-top_k=2" and not moe.config.model.ngram.enabled
    assert moe.config.model == moe_baseline(ne.config).model
    assert [r.config.model.moe.top_k for r in expand(path, scale="gpu").runs] == [3] * 6
    # fixed_total: the integer key is solved so that every run has (about) the target total
    path = sweep_file(tmp_path, name="fixed", grid={"model.ngram.ratio": [0.37, 2.37]},
                      runs=[{"name": "plain", "set": {"model.ngram.enabled": False}, "grid": {}},  # its own grid
                            {"name": "ne", "set": {"model.ngram.enabled": True}}],
                      fixed_total={"adjust": "model.moe.num_experts", "total": 1_000_000})
    runs = expand(path).runs
    assert [r.name for r in runs] == ["plain-s0", "ne-ratio=0.37-s0", "ne-ratio=2.37-s0"]
    per_expert = 3 * 32 * 16 + 32
    for r in runs:
        assert abs(closed_form_budget(r.config.model)["total"] - 1_000_000) <= per_expert / 2
    e = [r.derived["model.moe.num_experts"] for r in runs]
    assert e[0] > e[1] > e[2]  # the more N-gram parameters, the fewer experts


def test_baseline_differs_only_where_the_parameters_go(tmp_path):
    """A baseline shares its NE run's embedding treatment, init, dtype, schedule, data and routing; it may set
    only its own learning rate (baseline_set). Any other baseline_set key is refused at expansion, naming the
    key and both values."""
    path = sweep_file(tmp_path, moe_baseline=True, set={**TINY, "data.path": str(tmp_path),
                                                         "model.embedding.amplification": "sqrt_d"},
                      baseline_set={"train.lr": 0.01})
    ne, moe = expand(path).runs
    assert moe.config.model.embedding == ne.config.model.embedding
    assert moe.config.model.embedding.amplification == "sqrt_d" and moe.config.train.lr == 0.01
    assert moe.derived["train.lr"] == 0.01
    for key, value, shown in (("model.embedding.amplification", "none", "'sqrt_d' -> baseline 'none'"),
                              ("model.embedding.init_std", 0.5, "0.02 -> baseline 0.5"),
                              ("train.schedule", "constant", "'cosine' -> baseline 'constant'"),
                              ("model.moe.normalize_topk", True, "False -> baseline True")):
        path = sweep_file(tmp_path, moe_baseline=True, baseline_set={key: value})
        with pytest.raises(ConfigError, match=rf"run tiny-moe-s0 .*differ from its NE run .*{key}: NE run {shown}"):
            expand(path)
    with pytest.raises(ConfigError, match="baseline_set sets keys of the MoE baselines, and moe_baseline is not"):
        expand(sweep_file(tmp_path, baseline_set={"train.lr": 0.01}))


@pytest.mark.parametrize("spec, match", [
    ({"grdi": {"seed": [1]}}, r"unknown key 'grdi'; valid keys: name, description"),
    ({"grid": {"model.ngram.max_nn": [3]}}, r"run max_nn=3-s0: unknown key model.ngram.max_nn"),
    ({"grid": {"model.ngram.splits": [2, 3]}}, r"run splits=3-s0: model.ngram: model.d_model=32 must be divisible"),
    ({"grid": {"model.ngram.splits": 2}}, r"grid.model.ngram.splits must be a non-empty list"),
    ({"scales": {"gpu": {}}}, r"no scale 'cpu'; this sweep has: gpu"),
    ({"runs": [{"name": "a", "set": {}, "extra": 1}]}, r"runs\[0\]: unknown key 'extra'"),
    ({"screen": "no_such_sweep"}, r"screen must name the sweep file .* confirms this screen's choice on 2 or more"),
    ({"fixed_total": {"adjust": "model.moe.num_experts", "total": 1000}},
     r"run tiny-s0: fixed_total: reaching 1,000 parameters needs model.moe.num_experts="),
])
def test_bad_sweep_files_name_the_run_and_key(tmp_path, spec, match):
    with pytest.raises(ConfigError, match=match) as err:
        expand(sweep_file(tmp_path, **spec))
    assert str(err.value).count("tiny.yaml") == 1  # said once


def test_data_checks_and_foreign_results_before_training(tmp_path, data_dir):
    sw = expand(sweep_file(tmp_path, data_dir, set={**TINY, "data.path": str(data_dir), "train.steps": 100_000}))
    with pytest.raises(DataError, match=r"run tiny-s0: trains on 6,400,000 tokens .* has [\d,]+ training tokens"):
        runner.check_data(sw)
    sw = expand(sweep_file(tmp_path, data_dir, set={**TINY, "data.path": str(data_dir), "model.vocab_size": 1024}))
    with pytest.raises(ConfigError, match="run tiny-s0: .* vocab_size 512, the model has model.vocab_size=1024"):
        runner.check_data(sw)
    sw = expand(sweep_file(tmp_path, data_dir))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / runner.RESULTS).write_text(json.dumps({"sweep": "other", "scale": "cpu", "name": "x"}) + "\n")
    with pytest.raises(DataError, match="holds results of sweep 'other'"):
        runner.run_sweep(sw, tmp_path / "o", train_fn=lambda cfg: pytest.fail("trained"))


def test_only_selects_runs_in_its_order(tmp_path, data_dir):
    sw = expand(sweep_file(tmp_path, data_dir, seeds=[0, 1], moe_baseline=True,
                           runs=[{"name": "lo", "set": {"model.ngram.ratio": 1.37}},
                                 {"name": "hi", "set": {"model.ngram.ratio": 2.37}}]), out=tmp_path / "o")
    pick = runner.select_runs(sw.runs, ["hi-*s0", "lo-s1", "hi-moe-s0"])  # a repeat is kept once
    assert [r.name for r in pick] == ["hi-s0", "hi-moe-s0", "lo-s1"]
    assert runner.select_runs(sw.runs, None) == list(sw.runs)
    with pytest.raises(ConfigError, match=r"--only 'mid-\*' matches no run of this sweep; its runs: lo-s0, lo-moe-s0"):
        runner.select_runs(sw.runs, ["mid-*"])
    trained = []

    def train_fn(cfg):  # the first run trained is the first one --only names
        trained.append(cfg.train.run_dir)
        raise Stop

    with pytest.raises(Stop):
        runner.run_sweep(sw, tmp_path / "o", only=["hi-moe-s1", "lo-*"], train_fn=train_fn, log=lambda m: None)
    assert trained == [str(tmp_path / "o/runs/hi-moe-s1")]


def cli(*args):
    return [sys.executable, "-m", "ngram_jax.study", *map(str, args)]


def one_device_env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return env | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


class Stop(Exception):
    pass


def test_run_records_skips_finished_and_refuses_changed_config(tmp_path, data_dir):
    path = sweep_file(tmp_path, data_dir, moe_baseline=True, grid={"model.ngram.ratio": [1.37]})
    sw = expand(path, out=tmp_path / "o")
    assert [r.name for r in sw.runs] == ["ratio=1.37-s0", "ratio=1.37-moe-s0"]
    p = subprocess.run(cli(path, "--out", tmp_path / "o", "--max-runs", "1"), env=one_device_env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "--max-runs 1: stopping with 1 runs left" in p.stderr, p.stdout + p.stderr
    (rec,) = [json.loads(x) for x in (tmp_path / "o" / runner.RESULTS).read_text().splitlines()]
    for key in ("name", "overrides", "eval_loss", "total_params", "activated_params", "ngram_params", "tokens", "seed",
                "eval_bits_per_byte", "embedding_norm", "attention_out_norm", "total_over_activated",
                "transformer_ratio", "routing"):
        assert key in rec
    assert rec["routing"]["dropped_fraction"] >= 0 and "eval_loss_without_moe" in rec["routing"]
    b = closed_form_budget(sw.runs[0].config.model)
    assert (rec["total_params"], rec["ngram_params"], rec["tokens"]) == (b["total"], b["ngram"], 2 * 4 * 16)
    assert 0 < rec["eval_loss"] < 10 and rec["embedding_norm"] > 0
    assert rec["name"] == "ratio=1.37-s0" and rec["sweep"] == "tiny" and rec["overrides"]["model.ngram.ratio"] == 1.37
    seen = []

    def spy(cfg):
        seen.append(cfg.name)
        raise Stop

    with pytest.raises(Stop):  # the finished run is skipped: the next one is the baseline
        runner.run_sweep(sw, tmp_path / "o", train_fn=spy, log=lambda m: None)
    assert seen == ["ratio=1.37-moe-s0"]
    results = tmp_path / "o" / runner.RESULTS
    good = results.read_text()
    results.write_text(good + good[:50])  # a record cut short by a kill is dropped: that run reruns
    assert list(runner.read_results(tmp_path / "o", sw)) == ["ratio=1.37-s0"] and results.read_text() == good
    results.write_text(good + "{oops}\n" + good)
    with pytest.raises(DataError, match=r"results.jsonl:2: not a results record"):
        runner.read_results(tmp_path / "o", sw)
    results.write_text(good)
    changed = expand(path, out=tmp_path / "o", sets=["train.lr=0.5"])
    with pytest.raises(DataError, match=r"run ratio=1.37-s0 was recorded with another configuration \(train.lr"):
        runner.run_sweep(changed, tmp_path / "o", train_fn=spy, log=lambda m: None)


def test_routing_report_measures_the_experts_and_the_loss_without_them(data_dir):
    """The diagnostics every MoE run's record carries (runner.evaluate_run): routing over the held-out batches
    as the layers counted it, and the held-out loss with the MoE branch removed, which differs from the
    model's own; the model itself keeps its MoE branch."""
    from flax import nnx

    from ngram_jax.config import load_config
    from ngram_jax.eval.perplexity import evaluate
    from ngram_jax.eval.routing import moe_layers, routing_report
    from ngram_jax.model import build_model

    overrides = [f"{k}={json.dumps(v)}" for k, v in {**TINY, "data.path": str(data_dir)}.items()]
    cfg = load_config(ROOT / "configs/models/tiny_ne.yaml", overrides + ["model.moe.dispatch=capacity",
                                                                         "model.moe.capacity_factor=0.5"])
    with nnx.use_eager_sharding(False):
        model = build_model(cfg, nnx.Rngs(0))
        for layer in moe_layers(model):  # an MoE branch worth removing: experts of a visible scale
            for w in (layer.gate, layer.up, layer.down):
                w[...] = w[...] * 20
        rep = routing_report(model, data_dir, seq_len=16, batch_size=4, max_batches=3)
        full = evaluate(model, data_dir, seq_len=16, batch_size=4, max_batches=3)["loss"]
    assert set(rep) == {"expert_load_max_over_mean", "dropped_fraction", "routed_mass", "bias_changed_fraction",
                        "zero_expert_fraction", "eval_loss_without_moe"}
    assert 0 < rep["dropped_fraction"] < 1  # capacity factor 0.5: half the slots a balanced load needs
    assert rep["bias_changed_fraction"] == 0 and rep["expert_load_max_over_mean"] >= 1  # a zero bias changes nothing
    assert 0 < rep["routed_mass"] < 1 and abs(rep["eval_loss_without_moe"] - full) > 1e-3
    assert all(b.moe is not None for b in model.blocks)


def _records(groups):
    recs = []
    for group, losses, extra in groups:
        for seed, loss in enumerate(losses):
            recs.append({"sweep": "s", "scale": "cpu", "name": f"{group}-s{seed}", "group": group, "seed": seed,
                         "eval_loss": loss, "eval_bits_per_byte": loss / 3, "total_params": 1000, "tokens": 10,
                         "activated_params": 500, "ngram_share": 0.3, "total_over_activated": 2.0,
                         "grid": {"model.ngram.ratio": 1.0},
                         "embedding_norm": 1.0, "attention_out_norm": 10.0, "baseline_of": None, **extra})
    return recs


def test_paired_call_needs_every_shared_seed_on_one_side():
    """A difference smaller than the seed spread but the same on every seed is a paired call; seeds that
    disagree are a tie; fewer than 2 shared seeds give no call."""
    groups = {g.name: g for g in report.groups_of(_records([
        ("x", [3.00, 3.30, 3.10], {}), ("y", [3.02, 3.33, 3.11], {}), ("z", [3.01, 3.29, 3.12], {}),
        ("w", [2.0], {})]))}
    assert report.compare(groups["x"], groups["y"])[0] == "tie"  # 0.02 within the 0.3 spread
    verdict, delta, n = report.paired(groups["x"], groups["y"])
    assert verdict == "a better" and n == 3 and np.isclose(delta, -0.02)
    assert report.paired(groups["y"], groups["x"])[0] == "b better"
    assert report.paired(groups["x"], groups["z"])[0] == "tie"  # -0.01, +0.01, -0.02
    assert report.paired(groups["x"], groups["w"])[:1] == ("no call",)


def _report_of(out, recs) -> tuple[str, list]:
    """Write recs as out's results file and report on it: (report.md text, plot paths)."""
    (out / runner.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in recs))
    path, figures = report.write_report(out)
    return path.read_text(), figures


def test_report_calls_ties_within_the_seed_spread(tmp_path):
    recs = _records([
        ("a", [3.00, 3.04], {}), ("a-moe", [3.02, 3.04], {"baseline_of": "a", "ngram_share": 0.0}),
        ("b", [3.00, 3.01], {"grid": {"model.ngram.ratio": 2.0}}),
        ("b-moe", [3.10, 3.11], {"baseline_of": "b", "ngram_share": 0.0, "grid": {"model.ngram.ratio": 2.0}}),
        ("c", [2.90], {"grid": {"model.ngram.ratio": 3.0}}),
        ("plain", [3.2], {"grid": {}, "ngram_share": 0.0}),  # ne_share's 0% point: in no grid-key plot
    ])
    text, figures = _report_of(tmp_path, recs)
    # a: 0.01 within spread 0.04, and the seeds disagree (-0.02, 0.00): a tie both ways
    assert "| a | 3.0200 | 3.0300 | -0.0100 | 1,000 / 1,000 | 500 / 500 | tie | tie (-0.0100, 2 seeds) |" in text
    assert ("| b | 3.0050 | 3.1050 | -0.1000 | 1,000 / 1,000 | 500 / 500 | NE better | NE better (-0.1000, 2 seeds) |"
            in text)
    assert "| c | 1 |" in text and "| best |" in text
    assert {p.name for p in figures} >= {"loss_vs_total_params.png", "loss_vs_ngram_share.png",
                                         "loss_vs_total_over_activated.png",
                                         "loss_vs_model_ngram_ratio.png", "activation_norms.png"}
    assert all(p.stat().st_size > 1000 for p in figures)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / runner.RESULTS).write_text(json.dumps({**recs[0], "sweep": "second"}) + "\n")
    (tmp_path / "c.md").write_text("NE wins at this scale (made-up text for the test).\n")
    doc = report.write_document([tmp_path, tmp_path / "b"], tmp_path / "docs/STUDY.md", tmp_path / "c.md")
    body = doc.read_text()
    assert "## Sweep `s`" in body and "## Sweep `second`" in body and body.endswith("(made-up text for the test).\n")
    assert "](../loss_vs_total_params.png)" in body and "](../b/loss_vs_total_params.png)" in body
    mixed = recs + [{**recs[0], "sweep": "other"}]
    (tmp_path / runner.RESULTS).write_text("".join(json.dumps(r) + "\n" for r in mixed))
    with pytest.raises(DataError, match="mixes sweeps"):
        report.load_records(tmp_path)


PAPER = sorted((ROOT / "configs/paper").glob("*.yaml"))


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_sweeps_expand_and_validate(path):
    cpu, gpu = expand(path, scale="cpu"), expand(path, scale="gpu")
    for sw, lo, hi in ((cpu, 0.2e6, 30e6), (gpu, 40e6, 350e6)):
        if sw.screen:  # a one-seed screen: the sweep it names confirms its choice over >= 2 seeds
            assert len({r.seed for r in expand(path.parent / f"{sw.screen}.yaml", scale=sw.scale).runs}) >= 2
        else:
            assert sw.runs and len({r.seed for r in sw.runs}) >= 2  # every comparison over >= 2 seeds
        for r in sw.runs:
            total = closed_form_budget(r.config.model)["total"]
            assert lo <= total <= hi, (sw.scale, r.name, total)
            assert runner.run_tokens(r.config) <= MIN_TRAIN_TOKENS  # fits the study corpus (no repeated epoch)
        for r in sw.runs:
            if r.baseline_of:
                ne = next(x for x in sw.runs if x.group == r.baseline_of and x.seed == r.seed)
                a, b = closed_form_budget(ne.config.model)["total"], closed_form_budget(r.config.model)["total"]
                assert abs(a - b) / a < 0.02, (r.name, a, b)


def test_cli_bad_input_is_one_line(tmp_path):
    bad = sweep_file(tmp_path, grid={"model.ngram.max_nn": [3]})
    p = subprocess.run(cli(bad, "--list"), capture_output=True, text=True, env=one_device_env(), cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: ") and "run max_nn=3-s0: unknown key model.ngram.max_nn" in p.stderr


@pytest.mark.slow
def test_killed_runner_resumes_from_the_last_checkpoint(tmp_path, data_dir):
    """SIGKILL during the first run after its step-2 checkpoint; the rerun resumes it and finishes both."""
    path = sweep_file(tmp_path, data_dir, moe_baseline=True, grid={"model.ngram.ratio": [1.37]},
                      set={**TINY, "data.path": str(data_dir), "train.steps": 40, "train.checkpoint_every": 2})
    env = one_device_env()
    cmd = cli(path, "--out", tmp_path / "o")
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = tmp_path / "o/runs/ratio=1.37-s0/checkpoints"
    deadline = time.time() + 400
    while not (ckpts.is_dir() and any(c.name.isdigit() and int(c.name) >= 2 for c in ckpts.iterdir())):
        assert p.poll() is None and time.time() < deadline, p.communicate()[0]
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "o" / runner.RESULTS).exists()
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed" in out.stdout + out.stderr
    recs = [json.loads(x) for x in (tmp_path / "o" / runner.RESULTS).read_text().splitlines()]
    assert [r["name"] for r in recs] == ["ratio=1.37-s0", "ratio=1.37-moe-s0"]
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert "2 finished, 0 to go" in again.stderr and "0 runs recorded" in again.stdout


CURVE = {**TINY, "train.schedule": "constant", "train.steps": 4, "train.eval_at_tokens": [64, 128, 256],
         "data.batch_size": 8, "data.seq_len": 8, "model.ngram.row_multiple": 8}  # 8 test devices: 64 tokens a step


@pytest.mark.parametrize("change,match", [
    ({"train.eval_at_tokens": [64, 512]}, r"512 tokens is beyond the run's end .* 4 x 8 x 8 = 256 tokens"),
    ({"train.schedule": "cosine"}, r"comparable only under train.schedule=constant"),
    ({"train.eval_at_tokens": [65, 100]}, r"fall on the steps \[2, 2\]"),
    ({"train.eval_at_tokens": [128, 64]}, r"positive and increasing"),
])
def test_a_bad_curve_is_refused_before_training(tmp_path, change, match):
    path = sweep_file(tmp_path, set={**CURVE, **change})
    with pytest.raises(ConfigError, match=match):
        expand(path)


def test_curve_points_are_recorded_and_checked_on_resume(tmp_path, data_dir):
    """A run evaluates (and checkpoints) at each curve point; its record carries eval_curve and its training
    speed; a run directory missing a point it resumes past, or a record of another curve, is refused."""
    path = sweep_file(tmp_path, data_dir, set={**CURVE, "data.path": str(data_dir)})
    sw = expand(path, out=tmp_path / "o")
    assert runner.curve_steps(sw.runs[0].config) == [(1, 64), (2, 128), (4, 256)]
    assert runner.curve_steps(expand(path, sets=["train.eval_at_tokens=[64,100]"]).runs[0].config) == [
        (1, 64), (2, 128)]  # 100 tokens: the first step that reaches them
    (rec,) = runner.run_sweep(sw, tmp_path / "o", log=lambda m: None)
    curve = rec["eval_curve"]
    assert [p[0] for p in curve] == [64, 128, 256] and all(0 < p[1] < 10 for p in curve)
    assert abs(curve[-1][1] - rec["eval_loss"]) < 1e-4  # the last point is the run's final evaluation
    assert rec["train_tokens_per_s"] > 0
    run_dir = Path(sw.runs[0].config.train.run_dir)
    assert {int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()} >= {2, 4}

    results = tmp_path / "o" / runner.RESULTS
    good = results.read_text()
    results.write_text(json.dumps({**rec, "eval_curve": curve[:2]}) + "\n")
    with pytest.raises(DataError, match=r"recorded its curve at \[64, 128\] tokens, its config asks for "
                                        r"\[64, 128, 256\]"):
        runner.read_results(tmp_path / "o", sw)
    results.unlink()
    metrics = run_dir / "metrics.jsonl"
    lines = [x for x in metrics.read_text().splitlines() if json.loads(x)["step"] != 2]
    metrics.write_text("".join(x + "\n" for x in lines))  # the point at step 2 lost (another curve, or lost metrics)
    with pytest.raises(DataError, match=r"resumes from step 4, but its metrics.jsonl has no held-out loss at step 2 "
                                        r"\(128 tokens\)"):
        runner.run_sweep(sw, tmp_path / "o", train_fn=lambda cfg: pytest.fail("trained"), log=lambda m: None)
    results.write_text(good)


def test_sign_change_of_the_paired_curve():
    t = [1, 2, 4, 8]
    flips = {0: np.array([0.2, 0.1, -0.01, -0.05]), 1: np.array([0.3, -0.1, -0.02, -0.04])}
    cross, text = report.sign_change(t, flips)
    assert cross == 4 and "MoE better at 1 tokens on every seed; from 4 tokens on, NE better on every seed" in text
    cross, text = report.sign_change(t, {0: np.array([0.2, 0.1, -0.01, 0.01]), 1: flips[1]})  # seed 0 flips back
    assert cross is None and "no sign change on every seed up to 8 tokens" in text and "the seeds disagree" in text
    assert report.sign_change(t, {0: flips[0]}) == (None, "fewer than 2 seeds with curves: no call")


def test_report_draws_the_loss_vs_tokens_curves(tmp_path):
    tokens = [100, 200, 400]
    ne = {0: [5.0, 4.0, 3.0], 1: [5.1, 4.1, 3.1]}
    moe = {0: [4.9, 4.0, 3.2], 1: [5.0, 4.2, 3.15]}  # NE - MoE: +0.1/+0.1, 0/-0.1, -0.2/-0.05
    recs = _records([("a", [3.0, 3.1], {}), ("a-moe", [3.2, 3.15], {"baseline_of": "a", "ngram_share": 0.0})])
    for r in recs:
        curve = (moe if r["baseline_of"] else ne)[r["seed"]]
        r.update(eval_curve=[[t, v] for t, v in zip(tokens, curve, strict=True)], train_tokens_per_s=1234.0,
                 wall_s=10.0)
    text, figures = _report_of(tmp_path, recs)
    assert "### Loss vs tokens: a against a-moe" in text
    assert "from 400 tokens on, NE better on every seed" in text
    assert "| 200 | 4.0500 (4.0000-4.1000) | 4.1000 (4.0000-4.2000) | -0.0500 (+0.0000, -0.1000) |" in text
    assert "| a | 1,000 | 1,234 | 10 | 10 |" in text  # training speed
    assert (tmp_path / "curve_a.png") in figures and (tmp_path / "curve_a.png").stat().st_size > 1000


def test_report_draws_loss_vs_tokens_curves_of_groups_without_a_baseline(tmp_path):
    """A sweep of NE settings (no MoE baseline) with curves: per point each group's loss, the best group and
    whether it is best on every seed, the order at the first and last point, and a plot of all the curves."""
    tokens = [100, 200, 400]
    curve = {("a", 0): [5.0, 4.0, 3.0], ("a", 1): [5.2, 4.1, 3.1],
             ("b", 0): [4.9, 4.05, 3.2], ("b", 1): [5.1, 4.0, 3.3]}  # b ahead at 100, seeds split at 200, a at 400
    recs = _records([("a", [3.0, 3.1], {}), ("b", [3.2, 3.3], {})])
    for r in recs:
        r["eval_curve"] = [[t, v] for t, v in zip(tokens, curve[r["group"], r["seed"]], strict=True)]
    text, figures = _report_of(tmp_path, recs)
    assert "### Loss vs tokens by group" in text
    assert "| 100 | 5.1000 (5.0000-5.2000) | 5.0000 (4.9000-5.1000) | b, on every seed |" in text
    assert "| 200 | 4.0500 (4.0000-4.1000) | 4.0250 (4.0000-4.0500) | b (not on every seed against a) |" in text
    assert "| 400 | 3.0500 (3.0000-3.1000) | 3.2500 (3.2000-3.3000) | a, on every seed |" in text
    assert "Order by mean loss at 100 tokens: b < a; at 400: a < b." in text
    assert (tmp_path / "curves.png") in figures and (tmp_path / "curves.png").stat().st_size > 1000
    assert "Loss vs tokens:" not in text.replace("Loss vs tokens by group", "")  # no NE / MoE pair here


def test_report_says_whether_the_loss_falls_with_the_number_of_experts():
    """The experts table of a sweep over model.moe.num_experts: the step from each E to the next, paired per seed,
    and the verdict (falls with diminishing steps / falls / does not fall, naming where); the routing table shows
    the experts' share of the loss."""
    def group(e, losses, variant="v"):
        return [{"sweep": "s", "scale": "cpu", "name": f"{variant}-e={e}-s{i}", "group": f"{variant}-e={e}", "seed": i,
                 "variant": variant, "grid": {"model.moe.num_experts": e}, "eval_loss": v, "total_params": 1000 * e,
                 "activated_params": 500, "ngram_share": 0.0, "tokens": 10, "baseline_of": None,
                 "routing": {"eval_loss_without_moe": v + 0.25, "dropped_fraction": 0.0, "routed_mass": 1.0,
                             "bias_changed_fraction": 0.1, "expert_load_max_over_mean": 1.5}}
                for i, v in enumerate(losses)]

    good = group(4, [4.0, 4.1]) + group(16, [3.8, 3.9]) + group(64, [3.7, 3.85])
    text = report.markdown(good)
    assert "### Loss vs number of experts: v" in text and "falls at every step, with diminishing steps" in text
    assert "| 16 | 16,000 | 500 | 3.8500 (3.8000-3.9000) | -0.2000 | lower (-0.2000, 2 seeds) |" in text
    assert "| v-e=4 | - | 4.0500 | 4.3000 | +0.2500 | 0.0% | 1.000 | 10.0% | 1.50 |" in text
    bad = group(4, [4.0, 4.1]) + group(16, [3.8, 3.9]) + group(64, [3.9, 3.95])
    assert "does not fall at every step (64: +0.0750)" in report.markdown(bad)
