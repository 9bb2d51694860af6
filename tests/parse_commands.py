"""``python tests/parse_commands.py < commands.json``: parse each documented command with its own argument
parser, without running it, and print one JSON line per command: ``{"argv": ..., "error": ...}`` (error
None when it parses).

Each argv is ``["-m", MODULE, ...]`` or ``[SCRIPT, ...]``; it runs as ``__main__`` (``runpy``) with
``argparse.ArgumentParser.parse_args`` wrapped: a successful parse stops the command there (:class:`Parsed`),
a refused one ends as the command's own usage error (its exit status and message)."""

import argparse
import contextlib
import io
import json
import runpy
import sys


class Parsed(BaseException):  # not an Exception: passes through the entry points' error reporting
    pass


original = argparse.ArgumentParser.parse_args


def parse_then_stop(self, args=None, namespace=None):
    self.allow_abbrev = False  # a documented flag is spelt in full: a renamed one must not pass as a prefix
    original(self, args, namespace)
    raise Parsed


def parse(argv: list[str]) -> str | None:
    sys.argv = [argv[1] if argv[0] == "-m" else argv[0], *argv[2 if argv[0] == "-m" else 1:]]
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if argv[0] == "-m":
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(argv[0], run_name="__main__")
    except Parsed:
        return None
    except SystemExit as e:
        return f"exit status {e.code}: {err.getvalue().strip()[-500:]}"
    return "the command ran to its end without parsing its arguments"


if __name__ == "__main__":
    argparse.ArgumentParser.parse_args = parse_then_stop
    for argv in json.load(sys.stdin):
        print(json.dumps({"argv": argv, "error": parse(argv)}), file=sys.__stdout__, flush=True)
