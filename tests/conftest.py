"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One persistent compilation cache for the whole run, this process and the train.py / eval.py subprocesses
# the tests start (they inherit the variables): many tests compile the same tiny steps, and compiling
# dominates the suite's time. A fresh directory per run unless JAX_COMPILATION_CACHE_DIR is set.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache_dir = tempfile.mkdtemp(prefix="ngram_jax_test_jit_")
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")  # JAX's default, 1 s, skips most

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402
from flax import nnx  # noqa: E402


@pytest.fixture(autouse=True)
def _unsharded_params():
    """Modules built in tests get plain (unsharded) parameters unless a test sets a mesh."""
    with nnx.use_eager_sharding(False):
        yield


@pytest.fixture(scope="session")
def object_stores(tmp_path_factory):
    """An S3-compatible server (moto) and a GCS emulator on 127.0.0.1 for this test process, with the
    buckets ``s3://ngram-s3`` and ``gs://ngram-gcs``; the clients of this process (and of the commands it
    starts, which inherit the environment) point at them until the session ends (tests/storage_servers.py)."""
    from storage_servers import GcsServer, ObjectStores, S3Server, client_env

    root = tmp_path_factory.mktemp("object_stores")
    s3, gcs = S3Server(root / "s3.log"), GcsServer(root / "gcs.log", root / "gcs_objects", "ngram-gcs")
    try:
        s3.start()
        s3.create_bucket("ngram-s3")
        gcs.start()
        env = client_env(s3, gcs, root / "s3_cache")
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield ObjectStores(s3, gcs, env, "s3://ngram-s3", "gs://ngram-gcs")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        s3.stop()
        gcs.stop()
