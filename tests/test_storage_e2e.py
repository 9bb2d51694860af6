"""End to end in a bucket on a local server (tests/storage_servers.py): a corpus prepared into the bucket,
training with its data and run directory there, SIGKILL and a bitwise resume from the bucket, a corrupt latest
checkpoint skipped and moved aside, then eval, generate and analyze reading from it; every command runs in an
empty working directory that stays empty. s3:// (moto) runs by default; gs:// (the GCS emulator), a SIGTERM
save, a study and the storage faults with ``make test-all``: the GCS server restarted during an asynchronous
save (training goes on, the save lands), and gone through one (one-line error; the last complete checkpoint
restores and a restart resumes from it, bitwise)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax import storage
from ngram_jax.checkpoint import Checkpointer, restore_model

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/models/tiny_ne.yaml")
TINY = ["model.d_model=32", "model.num_blocks=1", "model.ffn_dim=32", "model.moe.expert_dim=16",
        "model.attention.q_lora_rank=16", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=8",
        "model.attention.v_head_dim=8", "model.attention.qk_rope_head_dim=8", "model.attention.num_heads=2",
        "model.vocab_size=300", "data.seq_len=16", "data.batch_size=2", "data.bundled=false", "train.progress=false",
        "train.eval_batches=1", "train.lr=0.01", "train.warmup_steps=4"]
STEPS = ["train.steps=16", "train.checkpoint_every=4", "train.log_every=4", "train.eval_every=8"]
WORDS = ("the king queen crown sword castle night day river stone bread wine horse field storm letter "
         "ghost honour mercy love death war peace").split()


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    out.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **extra)
    return out


def command(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, *args], cwd=cwd, env=env(), capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def start(data, run_dir, cwd: Path, extra: list[str] = (), hold_save: tuple[int, float] | None = None,
          **extra_env) -> subprocess.Popen:
    """train.py on the tiny config; ``hold_save=(step, seconds)`` holds that step's save in flight
    (tests/slow_save.py)."""
    held = [str(ROOT / "tests/slow_save.py"), *map(str, hold_save)] if hold_save else []
    cmd = [sys.executable, *held, str(ROOT / "train.py"), CONFIG, *TINY, *STEPS, f"data.path={data}",
           f"train.run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def train(data, run_dir, cwd: Path, timeout: float = 400) -> tuple[int, str]:
    p = start(data, run_dir, cwd)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out


def losses(run_dir) -> dict[int, float]:
    """step -> loss from the run's metrics.jsonl in the bucket (a step logged twice keeps its latest value)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def wait_for(cond, proc: subprocess.Popen, timeout: float = 300.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.05)
    return False


def in_flight(ckpt, step: int) -> bool:
    """A save of ``step`` has begun writing into the bucket and is not complete (no commit file yet)."""
    return (ckpt / str(step)).exists() and not (ckpt / str(step) / "commit_success.txt").exists()


@pytest.fixture(scope="module", params=["s3", pytest.param("gs", marks=pytest.mark.slow)])
def bucket(request, object_stores):
    return storage.location(f"{object_stores.bucket(request.param)}/e2e-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def workdir(tmp_path):
    """The working directory of every command: nothing may appear in it."""
    yield tmp_path
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def data(bucket, tmp_path_factory):
    """A corpus in the bucket, prepared into the bucket by the prepare command."""
    rng = np.random.default_rng(0)
    (bucket / "corpus.jsonl").write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 200))})
                                                  for _ in range(40)))
    cwd = tmp_path_factory.mktemp("prepare")
    res = command("-m", "ngram_jax.data.prepare", "--input", str(bucket / "corpus.jsonl"), "--train-bpe", "300",
                  "--heldout-fraction", "0.2", "--out", str(bucket / "data"), cwd=cwd)
    assert f"{bucket / 'data'}: vocab 300" in res.stdout
    assert list(cwd.iterdir()) == []
    return bucket / "data"


@pytest.fixture(scope="module")
def straight(bucket, data, tmp_path_factory):
    """An uninterrupted run in the bucket: 16 steps, checkpoints every 4 (the last 3 kept)."""
    run_dir = bucket / "straight"
    cwd = tmp_path_factory.mktemp("straight")
    rc, out = train(data, run_dir, cwd)
    assert rc == 0, out
    assert list(cwd.iterdir()) == []
    return run_dir, out


def test_training_writes_metrics_tensorboard_and_checkpoints_into_the_bucket(straight):
    run_dir, out = straight
    assert f"checkpoint: {run_dir / 'checkpoints' / '16'}" in out
    assert sorted(losses(run_dir)) == list(range(1, 17))
    assert Checkpointer(run_dir / "checkpoints").mgr.all_steps() == [8, 12, 16]
    for step in (8, 12, 16):
        assert (run_dir / "checkpoints" / str(step) / "commit_success.txt").exists()
    (events,) = list((run_dir / "tensorboard").iterdir())
    assert events.name.startswith("events.out.tfevents.") and len(events.read_bytes()) > 100


def test_resume_after_sigkill_is_bitwise_exact(straight, data, bucket, workdir):
    run_dir = bucket / "killed"
    ckpt = run_dir / "checkpoints"
    proc = start(data, run_dir, workdir)
    assert wait_for(lambda: (ckpt / "8" / "commit_success.txt").exists(), proc), proc.communicate()[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    resumed_from = Checkpointer(ckpt).latest_step()
    assert 8 <= resumed_from < 16
    rc, out = train(data, run_dir, workdir)
    assert rc == 0, out
    assert f"resumed {run_dir} from step {resumed_from}" in out
    assert losses(run_dir) == losses(straight[0])  # every step, before and after the kill, bit for bit


def test_eval_generate_and_analyze_read_from_the_bucket(straight, data, workdir):
    run_dir = straight[0]
    res = command(str(ROOT / "eval.py"), "--checkpoint", str(run_dir), "--batches", "2", cwd=workdir)
    result = json.loads((run_dir / "eval_results.json").read_text())
    assert f"loss {result['loss']:.4f}" in res.stdout and result["data"] == str(data) and result["tokens"] > 0
    res = command("-m", "ngram_jax.generate", "--checkpoint", str(run_dir), "--prompt", "the king",
                  "--max-new-tokens", "8", cwd=workdir)
    assert res.stdout.startswith("the king") and len(res.stdout.strip()) > len("the king")
    res = command("-m", "ngram_jax.analyze", str(run_dir), "--max-tokens", "64", cwd=workdir)
    report = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert report["step"] == 16 and report["bytes_read"]["table_rows"] > 0  # rows read lazily from the bucket
    assert {p.name for p in (run_dir / "analysis").iterdir()} == {
        "analysis.json", "embedding_share.png", "row_usage.png", "row_norms.png", "expert_load.png"}
    assert f"plot: {run_dir / 'analysis' / 'row_norms.png'}" in res.stdout


def _truncate_largest(directory) -> str:
    """Cut the largest object under ``directory`` to a third (a damaged checkpoint); returns its name."""
    name = max(storage.files(directory), key=lambda n: len((directory / n).read_bytes()))
    data = (directory / name).read_bytes()
    (directory / name).write_bytes(data[: len(data) // 3])
    return name


def test_corrupt_latest_checkpoint_in_the_bucket_falls_back(straight, data, bucket, workdir):
    """A copy of the straight run with step 16's array data truncated and step 12's metadata deleted, and
    its metrics cut back to step 8: both are named, moved aside (copied: no rename in a bucket), training
    resumes from step 8 and steps 9-16 come out bit for bit as before."""
    src, run_dir = straight[0], bucket / "corrupt"
    for name in storage.files(src):
        if name.startswith("checkpoints/"):
            storage.copy_file(src / name, run_dir / name)
    ckpt = run_dir / "checkpoints"
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("".join(x + "\n" for x in lines if json.loads(x)["step"] <= 8))
    _truncate_largest(ckpt / "16" / "state")
    (ckpt / "12" / "meta" / "metadata").unlink()
    assert Checkpointer(ckpt).latest_step() == 16  # complete as far as orbax can tell
    rc, out = train(data, run_dir, workdir)
    assert rc == 0, out
    assert f"checkpoint {ckpt / '16'} (step 16) is unreadable: its state does not read" in out, out
    assert f"checkpoint {ckpt / '12'} (step 12) is unreadable: its metadata does not read" in out, out
    assert f"resumed {run_dir} from step 8" in out
    for step in (16, 12):
        assert f"moved the unreadable checkpoint {ckpt / str(step)} to {ckpt / f'{step}.unreadable-0'}" in out
        assert (ckpt / f"{step}.unreadable-0" / "commit_success.txt").exists()  # kept for inspection
    assert Checkpointer(ckpt).mgr.all_steps() == [8, 12, 16]  # saved again
    assert losses(run_dir) == losses(src)


@pytest.mark.slow
def test_sigterm_saves_into_the_bucket_and_the_next_start_resumes(data, bucket, workdir):
    run_dir = bucket / "term"
    proc = start(data, run_dir, workdir, extra=["train.steps=2000", "train.checkpoint_every=4"])
    assert wait_for(lambda: (run_dir / "checkpoints" / "4" / "commit_success.txt").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    step = int(out.split("SIGTERM: saved step ")[1].split()[0])
    assert f"SIGTERM: saved step {step} to {run_dir / 'checkpoints'}" in out
    assert Checkpointer(run_dir / "checkpoints").latest_step() == step
    p = start(data, run_dir, workdir, extra=[f"train.steps={step + 3}", "train.checkpoint_every=4",
                                             "train.extend=true"])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0 and f"resumed {run_dir} from step {step}" in out, out


@pytest.mark.slow
def test_study_runs_and_reports_into_the_bucket(data, bucket, workdir, tmp_path_factory):
    """python -m ngram_jax.study SWEEP --out URL: the run trains in URL/runs, its record goes to
    URL/results.jsonl, a rerun skips it, and the report (report.md, plots) is written there too."""
    import yaml

    tiny = dict(x.split("=", 1) for x in TINY)
    sweep = tmp_path_factory.mktemp("sweep") / "tiny.yaml"
    sweep.write_text(yaml.safe_dump({"name": "tiny", "base": CONFIG, "seeds": [0], "scales": {"cpu": {}},
                                     "set": {**{k: yaml.safe_load(v) for k, v in tiny.items()}, "train.steps": 2,
                                             "train.checkpoint_every": 2, "data.path": str(data)}}))
    out = bucket / "study"
    res = command("-m", "ngram_jax.study", str(sweep), "--out", str(out), cwd=workdir)
    assert f"{out / 'results.jsonl'}: 1 runs recorded by this call" in res.stdout
    (rec,) = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    name = rec["name"]
    assert rec["config"]["train"]["run_dir"] == str(out / "runs" / name) and np.isfinite(rec["eval_loss"])
    assert (out / "runs" / name / "checkpoints" / "2" / "commit_success.txt").exists()
    res = command("-m", "ngram_jax.study", str(sweep), "--out", str(out), cwd=workdir)
    assert "1 finished, 0 to go" in res.stderr
    res = command("-m", "ngram_jax.study", "report", str(out), cwd=workdir)
    assert f"wrote {out / 'report.md'}" in res.stdout
    text = (out / "report.md").read_text()
    plots = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", text)
    assert text.startswith("# Sweep `tiny`") and plots and all((out / p).exists() for p in plots)


# ------------------------------------------------------------------------------------------------
# Storage faults (the GCS emulator keeps its objects across a restart)


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_gcs_restarted_during_an_async_save_and_training_goes_on(object_stores, straight, data, bucket, workdir):
    """The server goes down and comes back while step 8's save is in flight (tests/slow_save.py holds
    it): the clients' retries carry the save through, training finishes, bit for bit."""
    run_dir = bucket / "restarted"
    ckpt = run_dir / "checkpoints"
    proc = start(data, run_dir, workdir, hold_save=(8, 8))
    assert wait_for(lambda: in_flight(ckpt, 8), proc), proc.communicate()[0]
    object_stores.gcs.restart()  # down for the time it takes to start again (a few seconds)
    out, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, out
    assert losses(run_dir) == losses(straight[0])
    assert Checkpointer(ckpt).mgr.all_steps() == [8, 12, 16]
    model, _ = restore_model(run_dir, 8)  # the checkpoint saved across the restart reads back
    want, _ = restore_model(straight[0], 8)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(want, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("bucket", ["gs"], indirect=True)
def test_gcs_gone_through_an_async_save_stops_with_one_line_and_resumes(object_stores, straight, data, bucket,
                                                                        workdir):
    """The server goes down while step 8's save is in flight and stays down: training stops with one
    ``error:`` line naming the checkpoint directory, the endpoint and the last complete checkpoint (step 4);
    with the server back, the next start resumes from step 4 and ends bit for bit as the straight run."""
    run_dir = bucket / "gone"
    ckpt = run_dir / "checkpoints"
    proc = start(data, run_dir, workdir, hold_save=(8, 20))
    # step 12 logged (metrics.jsonl is written before each save): training waits in save(12) for step 8's save
    assert wait_for(lambda: (run_dir / "metrics.jsonl").exists() and 12 in losses(run_dir), proc), proc.communicate()[0]
    assert in_flight(ckpt, 8)
    object_stores.gcs.stop()
    try:
        out, _ = proc.communicate(timeout=400)
    finally:
        object_stores.gcs.start()
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), out
    assert errors[0].startswith(f"error: saving step 8 to {ckpt} failed: cannot reach {object_stores.gcs.url}")
    assert f"the last complete checkpoint, step 4 ({ckpt / '4'}), is intact" in errors[0]
    assert Checkpointer(ckpt).latest_step() == 4
    rc, out = train(data, run_dir, workdir)
    assert rc == 0, out
    assert f"resumed {run_dir} from step 4" in out
    assert losses(run_dir) == losses(straight[0])
