"""Errors that mean bad input, not a bug: the entry points print them as one line ``error: ...``.

:class:`ngram_jax.config.ConfigError` covers config keys, overrides and meshes. The classes here cover
what is not a config key: prepared data, tokenizers, checkpoints and command-line arguments. Each
message names the file (or argument) and the fix. This module imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterator


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


def exception_chain(err: BaseException | None) -> Iterator[BaseException]:
    """``err``, then the exception it was raised from or while handling (``__cause__``, else
    ``__context__``), and so on to the root cause; each exception once (a chain may loop)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of ``err``'s chain (:func:`exception_chain`)."""
    *_, last = exception_chain(err)
    return last


def one_line(err: BaseException, limit: int = 300) -> str:
    """``err``'s message on one line (whitespace runs joined), at most ``limit`` characters (its type's
    name when it has no message): libraries wrap a precise cause in long multi-line specs."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
