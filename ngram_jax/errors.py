"""Errors that mean bad input, not a bug: the entry points print them as one line ``error: ...``.

:class:`ngram_jax.config.ConfigError` covers config keys, overrides and meshes. The classes here cover
what is not a config key: prepared data, tokenizers, checkpoints and command-line arguments. Each
message names the file (or argument) and the fix. This module imports nothing from the package.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a file, a directory, an argument); the message names it and says what to do."""


class UsageError(UserError):
    """A malformed command line (exit status 2, as argparse)."""


class DataError(UserError, ValueError):
    """Prepared data or raw text that cannot be used: missing, malformed, out of the vocabulary, or
    tokenized differently from what the model or tokenizer expects."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable or does not fit the request, or one that could not be
    written (e.g. a full disk)."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the command needs does not exist (still a ``FileNotFoundError``)."""
