"""``s3://`` checkpoint directories for orbax, which has no public way to choose a tensorstore kvstore.

orbax-checkpoint 0.12.8 builds tensorstore kvstore specs for local and ``gs://`` directories only: for
``s3://`` its OCDBT spec fails ("Checkpoint path should be absolute") and its plain spec would name a local
file; no option or handler argument chooses another kvstore (orbax issues 359 and 872, pull request 2739).
:func:`enable` wraps its one builder (``tensorstore_utils.build_kvstore_tspec``, which every array, OCDBT
merge and sharding file goes through), once: an ``s3://`` directory is built as the same ``gs://`` one and
each GCS kvstore in the result is replaced by :func:`ngram_jax.storage.s3_kvstore` of the same bucket and
key (with the endpoint, which tensorstore does not read from the environment).

The wrapped function is orbax's internals: pyproject.toml pins orbax-checkpoint to exactly
:data:`ORBAX_VERSION`, and :func:`enable` refuses, on one line, any other installed version
(tests/test_storage.py checks the pin and the builder's signature; the S3 end-to-end tests check the rest).
"""

from __future__ import annotations

import functools
import inspect
import os

from ngram_jax import storage
from ngram_jax.errors import UserError

ORBAX_VERSION = "0.12.8"  # the one orbax-checkpoint release this adapter was written and tested against
BUILDER_PARAMS = ("directory", "name", "use_ocdbt", "ocdbt_process_spec", "ocdbt_write_options",
                  "ocdbt_temporary_metadata_context")  # build_kvstore_tspec's parameters in that release


def _builder_module():
    """orbax's tensorstore_utils, after checking that it is the release this adapter knows."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import tensorstore_utils

    installed = getattr(ocp, "__version__", "unknown")
    if installed != ORBAX_VERSION:
        raise UserError(f"s3:// checkpoints need orbax-checkpoint=={ORBAX_VERSION} (installed: {installed}): "
                        f"run pip install 'orbax-checkpoint=={ORBAX_VERSION}', or use a gs:// or local directory")
    return tensorstore_utils


def enable() -> None:
    """Let orbax write and read ``s3://`` checkpoints (idempotent)."""
    ts_utils = _builder_module()
    original = ts_utils.build_kvstore_tspec
    if getattr(original, "_ngram_jax_s3", False):
        return

    def to_s3(spec):
        if isinstance(spec, dict) and spec.get("driver") in ("gcs", "gcs_grpc") and "bucket" in spec:
            return storage.s3_kvstore(spec["bucket"], spec.get("path", ""))  # the key as orbax gave it
        if isinstance(spec, dict):
            return {k: to_s3(v) for k, v in spec.items()}
        if isinstance(spec, list):
            return [to_s3(v) for v in spec]
        return spec

    @functools.wraps(original)
    def build_kvstore_tspec(directory, *args, **kwargs):
        text = os.fspath(directory)
        if text.startswith("s3:/"):  # orbax normalises s3://b/p to s3:/b/p before some calls
            return to_s3(original("gs://" + text[len("s3:/"):].lstrip("/"), *args, **kwargs))
        return original(directory, *args, **kwargs)

    build_kvstore_tspec._ngram_jax_s3 = True
    ts_utils.build_kvstore_tspec = build_kvstore_tspec


def builder_params() -> tuple[str, ...]:
    """The parameter names of the installed orbax's kvstore builder (what :data:`BUILDER_PARAMS` must match)."""
    fn = _builder_module().build_kvstore_tspec
    return tuple(inspect.signature(fn).parameters)
