"""What every entry point shares: a user error is one line ``error: ...`` on stderr and a non-zero exit
status; a bug keeps its traceback.

User errors (see ``docs/TROUBLESHOOTING.md``): :class:`~ngram_jax.config.ConfigError` and
:class:`~ngram_jax.errors.UsageError` exit with 2 (as argparse does); :class:`~ngram_jax.errors.UserError`
(data, tokenizer, checkpoint), a missing file or directory, and a diverged training run exit with 1.

    def main(argv=None) -> int: ...
    if __name__ == "__main__":
        sys.exit(cli.run(main))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from ngram_jax.config import ConfigError
from ngram_jax.errors import UsageError, UserError

USAGE_STATUS = 2  # config and command-line errors, as argparse
INPUT_STATUS = 1  # data, tokenizer, checkpoint, missing files


def user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConfigError, UserError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError]
    loop = sys.modules.get("ngram_jax.train.loop")  # only raised there: no import (it pulls in JAX)
    if loop is not None and hasattr(loop, "TrainingDiverged"):
        types.append(loop.TrainingDiverged)
    return tuple(types)


def one_line(err: BaseException) -> str:
    """The message on one line: a multi-line message (e.g. a list of differing keys) joined by '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = "; ".join(lines) if lines else type(err).__name__
    return text.replace(":;", ":")


def exit_status(err: BaseException) -> int:
    return USAGE_STATUS if isinstance(err, ConfigError | UsageError) else INPUT_STATUS


def report(err: BaseException) -> int:
    """Print ``error: <message>`` on stderr; return the exit status."""
    print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
    return exit_status(err)


def skip_absent_tpu() -> None:
    """On a machine with libtpu installed (the ``tpu`` extra, which ``make test`` installs to compile for TPU
    ahead of time) but no accelerator, JAX's backend probe would start libtpu, which prints warnings about a
    TPU host it cannot find on every start. Unless ``JAX_PLATFORMS`` is set, the entry points then ask for
    the CPU backend. An accelerator is a TPU's device nodes (``/dev/accel*``, ``/dev/vfio/<n>``) or a GPU's
    (``/dev/nvidia*``, ``/dev/kfd``); with one, nothing changes."""
    import glob
    import importlib.util
    import os

    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia*", "/dev/kfd")):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported already: its config read the environment at import
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def run(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` with user errors reported on one line; other exceptions propagate (bugs)."""
    skip_absent_tpu()
    sys.stdout.flush()
    try:
        return main(argv)
    except UserError as err:
        return report(err)
    except Exception as err:
        if isinstance(err, user_error_types()):
            return report(err)
        raise


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`UsageError` (one line ``error: ...``, exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")
