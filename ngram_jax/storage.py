"""Where a run's files live: a local path, or a ``gs://BUCKET/PATH`` / ``s3://BUCKET/PATH`` URL.

Everything a run reads or writes goes through here: prepared data (``data.path``, the output of
``ngram_jax.data.prepare``), run directories (metrics, TensorBoard, checkpoints), ``train.init_from``, the
checkpoints that eval, generate and analyze read, and study directories. :func:`location` turns each into a
path object with pathlib's interface: an :class:`etils.epath.Path` for a URL (the path type orbax uses;
fsspec's gcsfs and s3fs under it), a :class:`pathlib.Path` for a local path (as before, ``stat().st_size``
and all), and refuses on one line what no backend serves (``s4://x``, ``gs:/one-slash``, a bad bucket name).
:func:`check` makes sure a bucket is reachable, exists and (for outputs) takes a write before anything runs:
a missing bucket is never created and nothing is written locally in its place.

Endpoints come from the usual variables and reach every client (:func:`configure`):

- S3-compatible stores: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), region ``AWS_REGION`` /
  ``AWS_DEFAULT_REGION``, keys ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. botocore (s3fs) reads them;
  tensorstore ignores the endpoint variable, so :func:`kvstore` writes it into every s3 kvstore spec.
- GCS emulators: ``STORAGE_EMULATOR_HOST`` (gcsfs, Google's Python clients) or ``TENSORSTORE_GCS_HTTP_URL``
  (tensorstore); either one sets the other and ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (google-cloud-cpp, which
  array_record's GCS reader uses). Real GCS needs none of them.

array_record reads ``gs://`` shards itself (its reader is built with riegeli's GCS reader) but has no S3
reader: :func:`readable_file` copies ``s3://`` shards into a local cache (``NGRAM_JAX_CACHE_DIR``, default
``~/.cache/ngram_jax``) once and reads them there. An object cannot be appended to: :class:`AppendedFile`
keeps the lines of ``metrics.jsonl``, ``results.jsonl`` and TensorBoard event files and rewrites the object.

This module imports nothing from the package but :mod:`ngram_jax.errors` and :mod:`ngram_jax.config`, and
neither JAX nor orbax.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from etils import epath

from ngram_jax.config import ConfigError
from ngram_jax.errors import DataError, UsageError, UserError, exception_chain, one_line

SCHEMES = ("gs", "s3")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):(/*)(.*)$")  # scheme (2+ characters), slashes, the rest
_BUCKET = {"gs": re.compile(r"^[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]$"),
           "s3": re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")}
_FORMS = "a local path, gs://BUCKET/PATH or s3://BUCKET/PATH"


class StorageError(UserError):
    """A location that cannot be used: a malformed URL, a bucket that does not exist, refuses access or
    cannot be reached. The message names the URL (and the endpoint it tried)."""


class MalformedLocation(StorageError, UsageError):
    """A path no backend serves (``s4://x``, ``gs:/one-slash``, a bad bucket name): exit status 2, as a
    malformed command line (a config key's is a :class:`~ngram_jax.config.ConfigError`)."""


Location = epath.Path | Path  # what location() returns: an epath.Path for a URL, a pathlib.Path for a local path


def location(value: str | os.PathLike, what: str = "path") -> Location:
    """``value`` as a path: a local path as given (a :class:`pathlib.Path`), a ``gs://`` or ``s3://`` URL
    normalised, without a trailing slash (an :class:`etils.epath.Path`). ``what`` (e.g. ``train.run_dir``)
    names it in the :class:`StorageError` of a malformed one."""
    if isinstance(value, Path) and not isinstance(value, epath.Path):
        return value
    text = os.fspath(value)
    if not text:
        raise MalformedLocation(f"{what} is empty: give {_FORMS}")
    m = _URL.match(text)
    if m and (m[2] or m[1] in SCHEMES):  # looks like a URL: "scheme:/..." or "gs:..."
        scheme, slashes, rest = m[1], m[2], m[3]
        if scheme not in SCHEMES:
            raise MalformedLocation(f"{what}={text}: unsupported URL scheme {scheme}:// (give {_FORMS})")
        if slashes != "//":
            raise MalformedLocation(f"{what}={text}: a {scheme} URL starts with {scheme}:// (two slashes), e.g. "
                               f"{scheme}://{rest.lstrip('/') or 'BUCKET/PATH'}")
        bucket, _, key = rest.partition("/")
        if not _BUCKET[scheme].match(bucket):
            allowed = "'-', '.', '_'" if scheme == "gs" else "'-', '.'"
            raise MalformedLocation(f"{what}={text}: {bucket!r} is not a bucket name (3-63 lowercase letters, digits, "
                               f"{allowed}; give {scheme}://BUCKET/PATH)")
        configure()
        key = key.rstrip("/")
        return epath.Path(f"{scheme}://{bucket}/{key}" if key else f"{scheme}://{bucket}")
    return Path(text)


CONFIG_KEYS = ("data.path", "train.run_dir", "train.init_from")  # the config keys that name a location


def config_locations(cfg) -> dict[str, Location]:
    """The locations a config names (the keys of :data:`CONFIG_KEYS` that are set), parsed; a malformed one
    is a :class:`~ngram_jax.config.ConfigError` naming the key."""
    out = {}
    for key in CONFIG_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value:
            try:
                out[key] = location(value, key)
            except MalformedLocation as err:
                raise ConfigError(str(err)) from None
    return out


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a ``gs://`` or ``s3://`` URL (a path :func:`location` returned, or a string)."""
    return os.fspath(path).startswith(tuple(f"{s}://" for s in SCHEMES))


def parts(path: str | os.PathLike) -> tuple[str, str, str]:
    """``(scheme, bucket, key)`` of a URL; ``("", "", path)`` for a local path."""
    text = os.fspath(location(path))
    if not is_remote(text):
        return "", "", text
    scheme, _, rest = text.partition("://")
    bucket, _, key = rest.partition("/")
    return scheme, bucket, key


def configure() -> None:
    """Point every client at the configured endpoints (idempotent; variables already set are kept).

    A GCS emulator given as ``STORAGE_EMULATOR_HOST`` or ``TENSORSTORE_GCS_HTTP_URL`` sets the other one,
    ``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (array_record's google-cloud-cpp client), a test token for tensorstore
    (an emulator takes any) and turns off gcsfs's bucket-type probe (the storage-control API, which emulators
    do not serve: each probe would log a warning)."""
    gcs = os.environ.get("STORAGE_EMULATOR_HOST") or os.environ.get("TENSORSTORE_GCS_HTTP_URL")
    if gcs:
        url = gcs if "://" in gcs else f"http://{gcs}"
        for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
            os.environ.setdefault(name, url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    # gcsfs logs every retry of a failed request with its traceback; the failure itself reaches the caller
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    # no cached directory listings: a run directory is written by other clients too (tensorstore, other
    # processes), whose objects a cached listing would hide
    import fsspec

    for scheme in SCHEMES:
        fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)


def s3_endpoint() -> str | None:
    """The S3 endpoint of ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def endpoint(path: str | os.PathLike) -> str:
    """Where requests for ``path`` go, for messages."""
    scheme = parts(path)[0]
    if scheme == "s3":
        return s3_endpoint() or "AWS S3 (AWS_ENDPOINT_URL unset)"
    return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage (STORAGE_EMULATOR_HOST unset)"


CONNECT_TIMEOUT_S = 5.0  # how long check() waits for a storage server to accept a connection


def _address(path: str | os.PathLike) -> tuple[str, int]:
    """``(host, port)`` that requests for a remote ``path`` go to."""
    if parts(path)[0] == "s3":
        url = s3_endpoint() or "https://s3.amazonaws.com"
    else:
        url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    split = urlsplit(url if "://" in url else f"http://{url}")
    return split.hostname or "", split.port or (443 if split.scheme == "https" else 80)


def _check_reachable(path: str | os.PathLike, what: str) -> None:
    """One TCP connection to ``path``'s endpoint within :data:`CONNECT_TIMEOUT_S`, else a :class:`StorageError`:
    the clients would retry an unreachable server with backoff for half a minute or more."""
    host, port = _address(path)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise StorageError(f"{what}={path}: cannot reach {endpoint(path)} (no connection to {host}:{port} within "
                           f"{CONNECT_TIMEOUT_S:g} s: {one_line(err)}); check the endpoint variables "
                           "(docs/STORAGE.md) and the network") from None


def kvstore(path: str | os.PathLike) -> dict:
    """The tensorstore kvstore spec of a directory: ``file``, ``gcs`` or ``s3`` (:func:`s3_kvstore`)."""
    scheme, bucket, key = parts(path)
    if not scheme:
        return {"driver": "file", "path": os.path.abspath(key) + "/"}
    prefix = key + "/" if key else ""
    return {"driver": "gcs", "bucket": bucket, "path": prefix} if scheme == "gs" else s3_kvstore(bucket, prefix)


def s3_kvstore(bucket: str, path: str) -> dict:
    """The tensorstore kvstore spec of ``path`` (a key, or a prefix ending in '/') in an S3 bucket, with the
    endpoint and region, which tensorstore does not take from the environment."""
    spec = {"driver": "s3", "bucket": bucket, "path": path}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if s3_endpoint():
        spec["endpoint"] = s3_endpoint()
        region = region or "us-east-1"
    if region:
        spec["aws_region"] = region
    return spec


def _is_unreachable(err: BaseException) -> bool:
    """A connection that could not be made (refused, reset, timed out, no such host) anywhere in the chain."""
    names = ("EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError", "ServerDisconnectedError",
             "ConnectionError", "ConnectTimeout", "ReadTimeoutError")
    return any(isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in names
               for e in exception_chain(err))


def failure(err: BaseException, path: str | os.PathLike | None = None) -> str | None:
    """Why a request to a bucket (``path``'s, for the endpoint's name) failed, on one line, when ``err`` is a
    storage failure (a connection refused or timed out, an access refused, a request the server answered
    with an error, as each client reports it); None for anything else (a bug keeps its traceback)."""
    chain = list(exception_chain(err))
    cause = chain[-1]
    if _is_unreachable(err):
        return f"cannot reach {endpoint(path) if path is not None else 'the storage server'} ({one_line(cause)})"
    if any(isinstance(e, PermissionError) or getattr(e, "code", None) in (401, 403) for e in chain):
        return f"access refused ({one_line(cause)})"
    storage_errors = ("HttpError", "ClientError", "BotoCoreError", "ClientResponseError")
    if any(isinstance(e, OSError) or type(e).__name__ in storage_errors for e in chain):
        return f"{type(cause).__name__}: {one_line(cause)}"
    if any(type(e) is ValueError and any(s in str(e) for s in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "Error writing",
                                                                 "Error reading")) for e in chain):
        return one_line(cause)  # tensorstore reports I/O errors as ValueError with the gRPC status text
    return None


@contextlib.contextmanager
def reported(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Storage failures inside as one :class:`StorageError` naming ``what``, the URL and the endpoint."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        why = failure(err, path) if is_remote(path) else None
        if why is None:
            raise
        raise StorageError(f"{what}={path}: {why}") from err


def check(path: str | os.PathLike, what: str, *, write: bool = False) -> Location:
    """A remote ``path``'s bucket is reachable and exists (and, with ``write``, takes a small object, deleted
    again), else a :class:`StorageError` naming the URL; returns ``location(path)``. Local paths are not
    checked here (their own errors are clear)."""
    path = location(path, what)
    if not is_remote(path):
        return path
    scheme, bucket, _ = parts(path)
    root = epath.Path(f"{scheme}://{bucket}")
    _check_reachable(path, what)
    with reported(path, what):
        try:  # one listing request: the server answers, the bucket exists and we may read it (an exists() is
            next(iter(root.iterdir()), None)  # no help: s3fs says False for any failure)
        except FileNotFoundError:
            raise StorageError(f"{what}={path}: bucket {scheme}://{bucket} does not exist at {endpoint(path)} "
                               "(create it, or fix the name)") from None
        if write:
            probe = path / f".write-probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
    return path


def read_text(path: str | os.PathLike, what: str, kind: str = "a text file") -> str:
    """The content of a user-given file (local or in a bucket) as UTF-8 text. Bytes that are not UTF-8 (a
    binary file, or one cut short inside a character) are a :class:`~ngram_jax.errors.DataError` naming
    ``what`` (e.g. ``--tokenizer``), the file, the first such byte and what the file should be (``kind``)."""
    path = location(path, what)
    with reported(path, what):
        data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {path} is not {kind}: byte {err.start} (0x{data[err.start]:02x}) is not UTF-8 "
                        "text (a binary or damaged file?)") from None


def output_dir(path: str | os.PathLike, what: str) -> Location:
    """A directory outputs are written into: a bucket checked (:func:`check` with ``write``), a local
    directory created."""
    path = check(path, what, write=True)
    if not is_remote(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir() -> str:
    return os.environ.get("NGRAM_JAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "ngram_jax")


def readable_file(path: str | os.PathLike) -> str:
    """A name array_record's reader opens for ``path``: a local path or a ``gs://`` URL as it is; an
    ``s3://`` object (array_record has no S3 reader) copied once into :func:`cache_dir` (kept while the
    object's ETag and size stay the same) and read there."""
    path = location(path)
    if parts(path)[0] != "s3":
        return os.fspath(path)
    _, bucket, key = parts(path)
    local = os.path.join(cache_dir(), "s3", bucket, key)
    with reported(path, "data file"):
        fs, name = _fsspec(path)
        info = fs.info(name)
        stamp = f"{info.get('ETag')} {info.get('size')}"
        marker = local + ".source"
        if os.path.isfile(local) and os.path.isfile(marker) and Path(marker).read_text() == stamp:
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        tmp = f"{local}.tmp-{uuid.uuid4().hex}"
        with path.open("rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        os.replace(tmp, local)
        Path(marker).write_text(stamp)
    return local


def _fsspec(path: str | os.PathLike):
    """``(fsspec filesystem, path without the scheme)`` of a URL, for what epath does not offer (or gets
    wrong: its ``walk`` passes s3fs an argument it refuses)."""
    import fsspec

    return fsspec.core.url_to_fs(os.fspath(location(path)))


def files(directory: str | os.PathLike) -> list[str]:
    """Names (relative, with '/') of every file under ``directory``."""
    directory = location(directory)
    if not is_remote(directory):
        return sorted(os.path.relpath(os.path.join(root, n), directory)
                      for root, _, names in os.walk(directory) for n in names)
    fs, root = _fsspec(directory)
    return sorted(f[len(root) :].lstrip("/") for f in fs.find(root))


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    with location(src).open("rb") as s, location(dst).open("wb") as d:
        shutil.copyfileobj(s, d, 1 << 22)


def move_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Move a directory. Locally a rename; in a bucket (no rename: s3fs's recursive move fails on the
    prefix itself) every object is copied, then the source deleted."""
    src, dst = location(src), location(dst)
    if not is_remote(src):
        src.rename(dst)
        return
    for name in files(src):
        copy_file(src / name, dst / name)
    src.rmtree()


def remove(path: str | os.PathLike) -> None:
    """Delete a file or a directory tree if it exists."""
    path = location(path)
    if path.is_dir() and is_remote(path):
        path.rmtree()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def write_figure(fig, path: str | os.PathLike, **kwargs) -> str:
    """``fig.savefig`` to a local path or a URL (matplotlib writes local files only)."""
    path = location(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", **kwargs)
    if not is_remote(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return os.fspath(path)


class AppendedFile:
    """A file that records are appended to (``metrics.jsonl``, ``results.jsonl``, TensorBoard event files).

    A local file is opened for appending and flushed at every :meth:`write` (``durable``: also fsync'ed).
    An object in a bucket cannot be appended to: its content (what it held when opened, then every write) is
    kept here and the object rewritten whole by :meth:`flush`, which :meth:`write` calls at most every
    ``every_s`` seconds (0: at every write) and :meth:`close` calls last. Text, or bytes with ``binary``."""

    def __init__(self, path: str | os.PathLike, *, binary: bool = False, every_s: float = 30.0,
                 durable: bool = False, what: str = "output file"):
        self.path, self.binary, self.every_s, self.durable = location(path), binary, every_s, durable
        self.what, self.remote, self.closed = what, is_remote(self.path), False
        if self.remote:
            with reported(self.path, what):
                old = self.path.read_bytes() if self.path.exists() else b""
            self._parts, self._dirty, self._last = [old], False, time.monotonic()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(os.fspath(self.path), "ab" if binary else "a")

    def write(self, data: str | bytes) -> None:
        if not self.remote:
            self._file.write(data)
            self._sync()
            return
        self._parts.append(data if self.binary else data.encode())
        self._dirty = True
        if time.monotonic() - self._last >= self.every_s:
            self.flush()

    def _sync(self) -> None:
        self._file.flush()
        if self.durable:
            os.fsync(self._file.fileno())

    def flush(self) -> None:
        if not self.remote:
            self._sync()
        elif self._dirty:
            data = b"".join(self._parts)
            self._parts = [data]
            with reported(self.path, self.what):
                self.path.write_bytes(data)
            self._dirty, self._last = False, time.monotonic()

    def close(self, flush: bool = True) -> None:
        """Flush (unless ``flush`` is false: the storage has failed) and close."""
        if self.closed:
            return
        self.closed = True
        if self.remote:
            if flush:
                self.flush()
        else:
            self._file.close()

    def __enter__(self) -> AppendedFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
