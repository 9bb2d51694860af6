"""Multi-host, tested with several local processes: 2 processes x 2 CPU devices joined by
jax.distributed run the row-sharded N-gram lookup; the result equals one process's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax.ngram.embedding import NgramEmbedding


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    port = free_port()
    worker = Path(__file__).with_name("multiprocess_worker.py")
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(worker), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert "process 0 of 2, 4 devices" in outs[0] and "process 1 of 2, 4 devices" in outs[1]
    got = np.concatenate([np.load(tmp_path / "out0.npy"), np.load(tmp_path / "out1.npy")])
    layer = NgramEmbedding(96, 24, max_n=3, splits=2, ratio=2.37, eos_id=5, row_multiple=8, rngs=nnx.Rngs(0))
    want = np.asarray(layer(np.random.default_rng(0).integers(0, 96, (8, 16)).astype(np.int32)))
    np.testing.assert_allclose(got, want, atol=1e-6)


D32 = ["model.d_model=32", "model.num_blocks=2", "model.ffn_dim=32", "model.moe.expert_dim=16",
       "model.attention.q_lora_rank=16", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=8",
       "model.attention.v_head_dim=8", "model.attention.qk_rope_head_dim=8", "model.attention.num_heads=2",
       "model.vocab_size=512", "data.seq_len=16", "data.batch_size=4", "data.bundled=false", "train.eval_batches=1",
       "train.progress=false", "train.lr=0.01", "train.warmup_steps=2", "train.steps=6", "train.checkpoint_every=2",
       "train.eval_every=100", "train.log_every=2"]


@pytest.mark.parametrize("size", ["d32", pytest.param("d64", marks=pytest.mark.slow)])
def test_train_two_processes_killed_and_resumed_match_one_process(tmp_path, size):
    """train.py under jax.distributed (2 processes), killed after a checkpoint (its step 2 for d32, 4 for d64)
    and started again, gives the losses of one process with all the devices on the same global mesh. d32: a
    2-block d32 model, 6 steps, 1 device per process (data=2); d64 (slow): the tiny d64 model, 8 steps, 2
    devices per process (data=4)."""
    import json
    import signal
    import time

    from test_train import ROOT, SHORT, TINY

    from ngram_jax.data.corpus import bundled_corpus_files
    from ngram_jax.data.prepare import prepare

    small = size == "d32"
    per_process, kill_at, steps = (1, 2, 6) if small else (2, 4, 8)
    data = tmp_path / "plays"
    prepare(bundled_corpus_files()[: 1 if small else 4], data, train_bpe_vocab=512 if small else 4096,
            heldout_fraction=0.05)
    cmd = [sys.executable, str(ROOT / "train.py"), str(ROOT / "configs/models/tiny_ne.yaml"),
           *(D32 if small else [*TINY, *SHORT]), f"data.path={data}", f"mesh.ici.data={2 * per_process}"]
    base = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}

    def losses(run_dir):
        return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}

    one = subprocess.run([*cmd, f"train.run_dir={tmp_path / 'one'}"], cwd=ROOT, capture_output=True, text=True,
                         env=base | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={2 * per_process}"},
                         timeout=300)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]

    def start_two(run_dir):
        port = free_port()
        return [subprocess.Popen([*cmd, f"train.run_dir={run_dir}"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True,
                                 env=base | {"XLA_FLAGS": f"--xla_force_host_platform_device_count={per_process}",
                                             "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                                             "JAX_PROCESS_ID": str(rank)}) for rank in range(2)]

    run_dir = tmp_path / "two"
    procs = start_two(run_dir)
    t0 = time.time()
    while not (run_dir / "checkpoints" / str(kill_at)).is_dir() and time.time() - t0 < 300:
        assert all(p.poll() is None for p in procs), [p.communicate()[0][-3000:] for p in procs]
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    procs = start_two(run_dir)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert f"resumed {run_dir} from step" in outs[0]
    got, want = losses(run_dir), losses(tmp_path / "one")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    # same batches, same program; gloo's all-reduce sums in another order than the in-process CPU
    # collectives, so losses agree to float rounding that training amplifies (2e-5 by step 8 measured);
    # another data order or a wrong resume would differ by ~1e-2
    np.testing.assert_allclose([got[s] for s in range(1, steps + 1)], [want[s] for s in range(1, steps + 1)],
                               rtol=1e-4)
