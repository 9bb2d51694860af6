"""Test setup: 8 simulated CPU devices, configured before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

import pytest  # noqa: E402
from flax import nnx  # noqa: E402


@pytest.fixture(autouse=True)
def _unsharded_params():
    """Modules built in tests get plain (unsharded) parameters unless a test sets a mesh."""
    with nnx.use_eager_sharding(False):
        yield
