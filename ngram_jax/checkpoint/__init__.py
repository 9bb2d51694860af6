"""Checkpoints: save and resume training (:class:`Checkpointer`, orbax), the row-block layout of stored
tables (:mod:`~ngram_jax.checkpoint.blocks`), how a checkpoint's config differs from a run's
(:mod:`~ngram_jax.checkpoint.config_diff`), and models restored from a run (:func:`restore_model`,
:func:`warm_start`, :func:`read_config`)."""

from ngram_jax.checkpoint.blocks import MAX_TABLE_BLOCKS, TABLE_CHUNK_ROWS, block_rows, is_blocked, row_chunked_paths
from ngram_jax.checkpoint.config_diff import RUN_CONTROL_KEYS, config_differences
from ngram_jax.checkpoint.manager import Checkpointer, DataState
from ngram_jax.checkpoint.restore import find_checkpoints, read_config, restore_model, warm_start

__all__ = ["MAX_TABLE_BLOCKS", "RUN_CONTROL_KEYS", "TABLE_CHUNK_ROWS", "Checkpointer", "DataState", "block_rows",
           "config_differences", "find_checkpoints", "is_blocked", "read_config", "restore_model",
           "row_chunked_paths", "warm_start"]
