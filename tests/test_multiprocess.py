"""Multi-host, tested with several local processes: 2 processes x 2 CPU devices joined by
jax.distributed run the row-sharded N-gram lookup; the result equals one process's."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
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
