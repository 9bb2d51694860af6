"""Training end to end: loss falls on real text, exact resume after SIGKILL, SIGTERM saves, NaN stops,
config mismatch is refused, an interrupted save is ignored, restore onto another mesh."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax.checkpoint import Checkpointer, restore_model
from ngram_jax.config import load_config
from ngram_jax.data.corpus import bundled_corpus_files
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare
from ngram_jax.sharding import make_mesh_from_spec, param_context
from ngram_jax.train.loss import eval_step

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.d_model=64", "model.num_blocks=1", "model.ffn_dim=128", "model.moe.expert_dim=32",
        "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
        "model.attention.v_head_dim=16", "model.attention.qk_rope_head_dim=8", "data.seq_len=32",
        "data.batch_size=8", "data.bundled=false", "train.eval_batches=2", "train.progress=false",
        "train.warmup_steps=10", "train.lr=0.01"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "plays"
    prepare(bundled_corpus_files()[:4], out, train_bpe_vocab=4096, heldout_fraction=0.05)
    return out


def overrides(data_dir, run_dir, *extra):
    return TINY + [f"data.path={data_dir}", f"train.run_dir={run_dir}", *extra]


def env_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def start(data_dir, run_dir, *extra, hold_save: tuple[int, float] | None = None) -> subprocess.Popen:
    """train.py on the tiny config; ``hold_save=(step, seconds)`` holds that step's save in flight
    (tests/slow_save.py)."""
    held = [str(ROOT / "tests/slow_save.py"), *map(str, hold_save)] if hold_save else []
    cmd = [sys.executable, *held, str(ROOT / "train.py"), str(ROOT / "configs/models/tiny_ne.yaml"),
           *overrides(data_dir, run_dir, *extra)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env_one_device(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def run(data_dir, run_dir, *extra, timeout=300) -> tuple[int, str]:
    p = start(data_dir, run_dir, *extra)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def losses(run_dir) -> dict[int, float]:
    """step -> loss; a step logged twice (redone after a restart) keeps its latest value."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]
    return out


def wait_for(cond, timeout=240.0, proc=None):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc is not None and proc.poll() is not None:
            return cond()
        time.sleep(0.01)
    return False


STEPS = ["train.steps=300", "train.checkpoint_every=25", "train.eval_every=150", "train.log_every=50"]


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    rc, out = run(data_dir, run_dir, *STEPS)
    assert rc == 0, out
    return run_dir, out


def test_loss_falls_on_real_text(straight):
    run_dir, out = straight
    lo = losses(run_dir)
    assert len(lo) == 300
    assert np.mean([lo[s] for s in range(1, 11)]) - np.mean([lo[s] for s in range(291, 301)]) > 1.5
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    for key in ("grad_norm", "tokens_per_s", "expert_load_max_over_mean", "ngram_rows_seen_frac", "eval_loss", "lr"):
        assert key in last, key
    assert last["eval_loss"] < 7.0
    assert "held-out loss" in out and "perplexity" in out and "checkpoint: " in out
    assert any((run_dir / "tensorboard").iterdir())


def test_resume_after_sigkill_is_bitwise_exact(straight, data_dir, tmp_path):
    want = losses(straight[0])
    run_dir = tmp_path / "killed"
    proc = start(data_dir, run_dir, *STEPS)
    assert wait_for(lambda: (run_dir / "checkpoints" / "100").is_dir(), proc=proc), proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = Checkpointer(run_dir / "checkpoints").latest_step()
    assert 100 <= resumed_from < 300
    rc, out = run(data_dir, run_dir, *STEPS)
    assert rc == 0, out
    assert f"resumed {run_dir} from step {resumed_from}" in out
    got = losses(run_dir)
    assert got == want  # every step, before and after the restart, bit for bit


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run_dir = tmp_path / "nan"
    rc, out = run(data_dir, run_dir, "train.steps=50", "train.checkpoint_every=1", "train.warmup_steps=1",
                  "train.lr=1e38", "train.grad_clip=1e30")
    assert rc == 1, out
    assert "error: loss is nan" in out.lower() or "error: loss is inf" in out.lower(), out
    bad_step = int(out.split(" at step ")[1].split(":")[0])
    latest = Checkpointer(run_dir / "checkpoints").latest_step()
    assert latest == bad_step - 1
    model, _ = restore_model(run_dir)  # the last good checkpoint is readable
    assert np.isfinite(np.asarray(model.final_norm.scale[...])).all()


def test_mismatched_config_is_refused(straight, data_dir, tmp_path):
    run_dir = tmp_path / "mismatch"
    shutil.copytree(straight[0], run_dir)
    rc, out = run(data_dir, run_dir, *STEPS, "model.ngram.max_n=5", "model.ngram.splits=1")
    assert rc == 2  # a config error (cli.USAGE_STATUS)
    assert "different configuration" in out and "model.ngram.max_n: checkpoint 3 -> requested 5" in out


def test_restore_onto_another_mesh_gives_the_same_eval_loss(straight, data_dir):
    run_dir = straight[0]
    single, cfg = restore_model(run_dir)
    batch = next(iter(make_dataset(data_dir, "heldout", seq_len=32, batch_size=8, vocab_size=4096, seed=0,
                                   repeat=False)))
    with param_context(None):
        s1, c1 = nnx.jit(eval_step)(single, batch)
    mesh = make_mesh_from_spec("data=2,expert=4")
    sharded, _ = restore_model(run_dir, mesh=mesh)
    assert sharded.embed.ngram_table[...].sharding.mesh.shape["expert"] == 4
    with param_context(mesh, cfg.mesh.rules):
        s2, c2 = nnx.jit(eval_step)(sharded, batch)
    assert float(c1) == float(c2) > 0
    assert abs(float(s1) / float(c1) - float(s2) / float(c2)) < 1e-5


def test_out_of_vocabulary_token_names_file_and_position(data_dir, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    bad = tmp_path / "bad"
    shutil.copytree(data_dir, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    f = bad / meta["splits"]["train"]["files"][0]
    w = ArrayRecordWriter(str(f), "group_size:1")
    w.write(np.array([5, 6, 9999, 7], np.int32).tobytes())
    w.close()
    meta["splits"]["train"]["files"] = [f.name]
    (bad / "metadata.json").write_text(json.dumps(meta))
    it = iter(make_dataset(bad, "train", seq_len=8, batch_size=1, vocab_size=4096, seed=0))
    with pytest.raises(ValueError, match=r"train-00000.array_record: record 0, position 2: token id 9999"):
        next(it)


def test_prepare_cli_and_tokenizer_reuse(data_dir, tmp_path):
    text = tmp_path / "t.jsonl"
    text.write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(10)))
    rc = subprocess.run([sys.executable, "-m", "ngram_jax.data.prepare", "--input", str(text), "--tokenizer",
                         str(data_dir / "tokenizer.json"), "--out", str(tmp_path / "out")], env=env_one_device(),
                        capture_output=True, text=True)
    assert rc.returncode == 0, rc.stderr
    meta = json.loads((tmp_path / "out" / "metadata.json").read_text())
    assert meta["vocab_size"] == 4096 and meta["eos_id"] == 1  # <|pad|> is 0: EOS is never the zero fill
    assert meta["tokenizer_hash"] == json.loads((data_dir / "metadata.json").read_text())["tokenizer_hash"]
    assert meta["splits"]["train"]["documents"] + meta["splits"]["heldout"]["documents"] == 10


def test_loaded_config_for_make_train():
    cfg = load_config(ROOT / "configs/train_tiny.yaml")
    assert cfg.data.bundled and cfg.model.ngram.enabled and cfg.train.steps > 0


def test_generate_cli_greedy_output_is_the_argmax_of_full_forward_passes(straight, data_dir):
    """``generate --temperature 0`` (KV cache, N-gram cache) prints the prompt and the 12 tokens that greedy
    decoding by full forward passes over the whole sequence gives."""
    from ngram_jax.data.tokenizer import load_tokenizer

    res = subprocess.run([sys.executable, "-m", "ngram_jax.generate", "--checkpoint", str(straight[0]), "--prompt",
                          "ROMEO:", "--max-new-tokens", "12", "--temperature", "0"], cwd=ROOT, env=env_one_device(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    tok = load_tokenizer(data_dir / "tokenizer.json")
    model, _ = restore_model(straight[0])
    ids = tok.encode("ROMEO:", add_special_tokens=False).ids
    n = len(ids)
    seq = np.zeros((1, n + 12), np.int32)  # right padding: a causal model's earlier logits do not see it
    seq[0, :n] = ids
    with param_context(None):
        forward = nnx.jit(lambda m, t: m(t))
        for t in range(n, n + 12):
            seq[0, t] = int(np.argmax(np.asarray(forward(model, seq))[0, t - 1]))
    assert res.stdout == "ROMEO:" + tok.decode(seq[0, n:].tolist()) + "\n"


def test_eval_cli_matches_training_eval_and_reads_raw_text(straight, tmp_path):
    run_dir = straight[0]
    last = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(run_dir), "--batches", "2"],
                         cwd=ROOT, env=env_one_device(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads((run_dir / "eval_results.json").read_text())
    assert abs(result["loss"] - last["eval_loss"]) < 1e-5  # the same held-out batches as training's eval
    assert abs(result["perplexity"] - np.exp(result["loss"])) < 1e-6 * result["perplexity"]
    assert 0.5 < result["bits_per_byte"] < 8
    raw = tmp_path / "raw.txt"
    raw.write_text("\n\n".join(f"Speech number {i}: to be, or not to be, that is the question." for i in range(40)))
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(run_dir), "--data", str(raw)],
                         cwd=ROOT, env=env_one_device(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    result = json.loads((run_dir / "eval_results.json").read_text())
    assert result["data"] == str(raw) and result["tokens"] > 0 and np.isfinite(result["loss"])


@pytest.mark.slow  # CI time: make test-all runs it
def test_eval_cli_runs_a_local_lm_eval_task(straight, tmp_path):
    pytest.importorskip("lm_eval", reason="eval extra not installed: pip install -e '.[eval]'")
    from test_eval_analysis import write_task

    tasks = write_task(tmp_path)
    env = env_one_device() | {"HF_DATASETS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--checkpoint", str(straight[0]), "--batches", "1",
                          "--tasks", "ngram_jax_tiny_mc", "--include-path", str(tasks)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads((straight[0] / "eval_results.json").read_text())
    assert 0.0 <= result["tasks"]["ngram_jax_tiny_mc"]["acc,none"] <= 1.0
    assert "ngram_jax_tiny_mc: " in res.stdout


@pytest.mark.slow
def test_throughput_window_excludes_eval_and_checkpoint_time(data_dir, tmp_path):
    """Evaluation and checkpoint saves made 2 s slower each: the logged step time stays the step's."""
    run_dir = tmp_path / "slow_eval"
    code = f"""
import time, warnings
import ngram_jax.train.loop as loop
from ngram_jax.config import load_config
evaluate, save = loop.evaluate, loop.Checkpointer.save
loop.evaluate = lambda *a: (time.sleep(2.0), evaluate(*a))[1]
loop.Checkpointer.save = lambda *a, **k: (time.sleep(2.0), save(*a, **k))[1]
cfg = load_config({str(ROOT / "configs/models/tiny_ne.yaml")!r}, {overrides(data_dir, run_dir)!r} + [
    "train.steps=12", "train.log_every=4", "train.eval_every=4", "train.checkpoint_every=4"])
loop.train(cfg)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_one_device(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    for step in (8, 12):  # windows after an eval and a save (4 s outside the steps): 1 s a step if counted
        assert logged[step]["step_time_s"] < 0.5, logged[step]
        assert 0 < logged[step]["train_tokens"] <= 4 * 8 * 32
        assert logged[step]["tokens_per_s"] == pytest.approx(logged[step]["train_tokens"]
                                                             / (4 * logged[step]["step_time_s"]))


@pytest.mark.slow  # the large variant of test_interrupted_save_is_ignored
def test_interrupted_save_is_ignored_300_steps(straight, data_dir, tmp_path):
    """A save killed half-way (orbax's temporary directory left behind) is not a checkpoint."""
    run_dir = tmp_path / "partial"
    shutil.copytree(straight[0], run_dir)
    ckpt = run_dir / "checkpoints"
    for step in ("300", "275"):
        shutil.rmtree(ckpt / step)
    partial = ckpt / "275.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpt / "250", partial)
    for f in list(partial.rglob("*"))[::2]:  # half its files missing
        if f.is_file():
            f.unlink()
    (run_dir / "metrics.jsonl").write_text("")
    assert Checkpointer(ckpt).latest_step() == 250
    rc, out = run(data_dir, run_dir, *STEPS)
    assert rc == 0, out
    assert "from step 250" in out
    want = losses(straight[0])
    assert losses(run_dir) == {s: want[s] for s in range(251, 301)}


@pytest.mark.slow  # the large variant
def test_sigterm_saves_and_next_start_resumes_300_steps(data_dir, tmp_path):
    run_dir = tmp_path / "term"
    proc = start(data_dir, run_dir, *STEPS)
    assert wait_for(lambda: (run_dir / "checkpoints" / "50").is_dir(), proc=proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved step" in out
    step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert Checkpointer(run_dir / "checkpoints").latest_step() == step
    rc, out = run(data_dir, run_dir, *STEPS[1:], "train.steps=" + str(step + 5), "train.extend=true")  # a short finish
    assert rc == 0 and f"from step {step}" in out, out


@pytest.mark.slow  # the large variant
def test_resume_with_other_steps_needs_extend_300_steps(straight, data_dir, tmp_path):
    """Defect 5: another train.steps would change the learning-rate curve; train.extend=true allows it."""
    from ngram_jax.train.optimizer import schedule

    run_dir = tmp_path / "extend"
    shutil.copytree(straight[0], run_dir)
    steps = [s for s in STEPS if not s.startswith("train.steps=")]
    rc, out = run(data_dir, run_dir, *steps, "train.steps=320")
    assert rc != 0
    assert "train.steps=300" in out and "train.steps=320" in out and "train.extend=true" in out, out
    assert max(losses(run_dir)) == 300  # nothing trained
    rc, out = run(data_dir, run_dir, *steps, "train.steps=310", "train.extend=true")
    assert rc == 0, out
    assert f"resumed {run_dir} from step 300" in out
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert max(records) == 310
    cfg = load_config(ROOT / "configs/models/tiny_ne.yaml", overrides(data_dir, run_dir, *steps, "train.steps=310"))
    assert records[301]["lr"] == pytest.approx(float(schedule(cfg.train)(300)))
    rc, out = run(data_dir, run_dir, *steps, "train.steps=310")  # the new steps are the run's steps now
    assert rc == 0, out


# ----------------------------------------------------------------------------------------------
# Faults: unreadable checkpoints, a full disk, a kill during an asynchronous save

SHORT = ["train.steps=8", "train.checkpoint_every=2", "train.eval_every=100", "train.log_every=4"]


@pytest.fixture(scope="module")
def short(data_dir, tmp_path_factory):
    """An uninterrupted 8-step run with checkpoints at steps 2, 4, 6, 8 (the last 3 kept)."""
    run_dir = tmp_path_factory.mktemp("short")
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 0, out
    assert Checkpointer(run_dir / "checkpoints").mgr.all_steps() == [4, 6, 8]
    return run_dir


def _truncate_largest(directory: Path) -> Path:
    f = max((f for f in directory.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size // 3)
    return f


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(short, data_dir, tmp_path):
    """Step 8's array data truncated, step 6's metadata deleted: both named, resume from step 4, exact."""
    run_dir = tmp_path / "corrupt"
    shutil.copytree(short, run_dir)
    ckpt = run_dir / "checkpoints"
    _truncate_largest(ckpt / "8" / "state")
    (ckpt / "6" / "meta" / "metadata").unlink()
    assert Checkpointer(ckpt).latest_step() == 8  # orbax sees complete directories only
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 0, out
    assert f"checkpoint {ckpt / '8'} (step 8) is unreadable: its state does not read" in out, out
    assert "is not valid for value of size" in out  # tensorstore's precise cause, not orbax's wrapper
    assert f"checkpoint {ckpt / '6'} (step 6) is unreadable: its metadata does not read" in out, out
    assert f"resumed {run_dir} from step 4" in out
    assert (ckpt / "8.unreadable-0").is_dir() and (ckpt / "6.unreadable-0").is_dir()  # kept for inspection
    assert Checkpointer(ckpt).latest_step() == 8  # saved again
    assert losses(run_dir) == losses(short)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(short, data_dir, tmp_path):
    run_dir = tmp_path / "all_corrupt"
    shutil.copytree(short, run_dir)
    for step in ("4", "6", "8"):
        _truncate_largest(run_dir / "checkpoints" / step / "state")
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 1, out
    assert (f"error: no readable checkpoint in {run_dir / 'checkpoints'}: steps 8, 6, 4 all fail to read "
            "(step 8: its state does not read") in out
    assert "Traceback" not in out
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {"4", "6", "8"}  # nothing moved or deleted


def test_disk_full_during_an_async_save_is_a_clear_error(short, data_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC in the background write of step 4: the next save (or the final wait) reports it, naming the
    directory and the last complete checkpoint, which restores; train.py exits 1 without a traceback."""
    import errno
    import importlib.util

    import orbax.checkpoint as ocp

    original = ocp.JsonCheckpointHandler._save_fn

    async def disk_full_at_step_4(self, x, directory):
        if x.get("step") == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(directory / "metadata"))
        await original(self, x, directory)

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", disk_full_at_step_4)
    spec = importlib.util.spec_from_file_location("train_cli", ROOT / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run_dir = tmp_path / "full"
    from ngram_jax import cli as entry

    rc = entry.run(cli.main, [str(ROOT / "configs/models/tiny_ne.yaml"), *overrides(data_dir, run_dir, *SHORT)])
    err = capsys.readouterr().err
    assert rc == 1, err
    ckpt = run_dir / "checkpoints"
    assert "error: disk full (no space left on device) while saving" in err
    assert f"to {ckpt}: " in err and f"the last complete checkpoint, step 2 ({ckpt / '2'}), is intact" in err
    assert Checkpointer(ckpt).latest_step() == 2
    model, _ = restore_model(run_dir)  # the previous checkpoint reads back
    assert np.isfinite(np.asarray(model.final_norm.scale[...])).all()


def test_sigkill_during_an_async_save_resumes_exactly(short, data_dir, tmp_path):
    """Killed while step 4's save is in flight (its temporary directory exists; tests/slow_save.py holds
    it): the next start resumes from step 2, the last complete one, bit for bit."""
    run_dir = tmp_path / "killed_saving"
    ckpt = run_dir / "checkpoints"
    proc = start(data_dir, run_dir, *SHORT, hold_save=(4, 60))
    assert wait_for(lambda: any(ckpt.glob("4.orbax-checkpoint-tmp*")), proc=proc), proc.communicate()[0]
    time.sleep(1.0)  # training goes on while the save is in flight
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (ckpt / "4").exists() and Checkpointer(ckpt).latest_step() == 2
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 0, out
    assert f"resumed {run_dir} from step 2" in out
    assert losses(run_dir) == losses(short)


def test_interrupted_save_is_ignored(short, data_dir, tmp_path):
    """A save killed half-way (orbax's temporary directory left behind, half its files missing) is not a
    checkpoint: the run resumes from the last complete one and ends bit for bit as the uninterrupted run."""
    run_dir = tmp_path / "partial"
    shutil.copytree(short, run_dir)
    ckpt = run_dir / "checkpoints"
    shutil.rmtree(ckpt / "8")
    partial = ckpt / "8.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckpt / "6", partial)
    for f in list(partial.rglob("*"))[::2]:
        if f.is_file():
            f.unlink()
    assert Checkpointer(ckpt).latest_step() == 6
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 0, out
    assert f"resumed {run_dir} from step 6" in out
    assert losses(run_dir) == losses(short)


def test_sigterm_saves_and_next_start_resumes_exactly(short, data_dir, tmp_path):
    """SIGTERM (a TPU preemption) while step 4's save is held in flight (tests/slow_save.py: training waits
    for it in the next save): the current step is saved, exit 0, and the next start resumes from it and ends
    bit for bit as the uninterrupted run."""
    run_dir = tmp_path / "term"
    ckpt = run_dir / "checkpoints"
    proc = start(data_dir, run_dir, *SHORT, hold_save=(4, 8))
    assert wait_for(lambda: any(ckpt.glob("4.orbax-checkpoint-tmp*")), proc=proc), proc.communicate()[0]
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert 4 <= step < 8 and Checkpointer(ckpt).latest_step() == step
    rc, out = run(data_dir, run_dir, *SHORT)
    assert rc == 0 and f"resumed {run_dir} from step {step}" in out, out
    assert losses(run_dir) == losses(short)


def test_resume_with_other_steps_needs_extend(short, data_dir, tmp_path):
    """Another train.steps would change the learning-rate curve: refused, nothing trained; with
    train.extend=true the run goes on on the new curve (its learning rate at the resume step)."""
    from ngram_jax.train.optimizer import schedule

    run_dir = tmp_path / "extend"
    shutil.copytree(short, run_dir)
    rest = [s for s in SHORT if not s.startswith("train.steps=")]
    rc, out = run(data_dir, run_dir, *rest, "train.steps=10")
    assert rc != 0
    assert "train.steps=8" in out and "train.steps=10" in out and "train.extend=true" in out, out
    assert max(losses(run_dir)) == 8  # nothing trained
    rc, out = run(data_dir, run_dir, *rest, "train.steps=10", "train.extend=true")
    assert rc == 0, out
    assert f"resumed {run_dir} from step 8" in out
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert max(records) == 10
    cfg = load_config(ROOT / "configs/models/tiny_ne.yaml", overrides(data_dir, run_dir, *rest, "train.steps=10"))
    assert records[9]["lr"] == pytest.approx(float(schedule(cfg.train)(8)))
