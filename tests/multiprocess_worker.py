"""One process of tests/test_multiprocess.py: 2 local CPU devices, joined to the others by
jax.distributed; runs the sharded N-gram lookup on a 4-device mesh spanning the processes."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ngram_jax.ngram.embedding import NgramEmbedding  # noqa: E402
from ngram_jax.sharding import create_sharded, initialize_distributed, make_mesh_from_spec, param_context  # noqa: E402


def main(out_dir: str) -> None:
    assert initialize_distributed()
    mesh = make_mesh_from_spec("data=4")
    layer = create_sharded(lambda: NgramEmbedding(96, 24, max_n=3, splits=2, ratio=2.37, eos_id=5, row_multiple=8,
                                                  rngs=nnx.Rngs(0)), mesh)
    tokens = np.random.default_rng(0).integers(0, 96, (8, 16)).astype(np.int32)
    rank = jax.process_index()
    batch = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), tokens[rank * 4:(rank + 1) * 4])
    with param_context(mesh):
        out = nnx.jit(lambda m, t: m(t))(layer, batch)
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
    np.save(os.path.join(out_dir, f"out{rank}.npy"), np.concatenate([np.asarray(s.data) for s in shards]))
    print(f"process {rank} of {jax.process_count()}, {jax.device_count()} devices", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
