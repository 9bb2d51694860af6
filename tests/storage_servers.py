"""Local object stores for the storage tests: real server processes on 127.0.0.1, from packages the
``test`` extra installs, started and stopped by the tests (no test reaches the internet).

- :class:`S3Server`: moto's S3-compatible server (``moto[server]``); objects live in its memory.
- :class:`GcsServer`: gcp-storage-emulator (``tests/gcs_emulator.py``); objects live in a directory, so a
  restart keeps them.

:func:`client_env` is the environment that points every client at them: ``AWS_ENDPOINT_URL`` and dummy
AWS keys for S3, ``STORAGE_EMULATOR_HOST`` for GCS (``ngram_jax.storage.configure`` derives the rest).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server process on a fixed port: :meth:`start`, :meth:`stop`, :meth:`restart` (same port)."""

    def __init__(self, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(self.command(), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.command()} exited with {self.proc.returncode}: {self.log.read_text()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.command()} did not answer on {self.url} in {timeout} s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(self.url + path, timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0


class S3Server(_Server):
    """``python -m moto.server -p PORT`` (in memory: a restart empties it)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def ready(self) -> bool:
        return self._get("/") == 200

    def create_bucket(self, name: str) -> None:
        req = urllib.request.Request(f"{self.url}/{name}", method="PUT")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200, r.status


class GcsServer(_Server):
    """``tests/gcs_emulator.py`` with one bucket, objects kept in ``data_dir`` across restarts."""

    def __init__(self, log: Path, data_dir: Path, bucket: str):
        super().__init__(log)
        self.data_dir, self.bucket = data_dir, bucket

    def command(self) -> list[str]:
        return [sys.executable, str(HERE / "gcs_emulator.py"), str(self.port), str(self.data_dir), self.bucket]

    def ready(self) -> bool:
        return self._get(f"/storage/v1/b/{self.bucket}") == 200


def client_env(s3: S3Server, gcs: GcsServer, cache: Path) -> dict[str, str]:
    """Variables pointing the clients at the servers (and the s3 data cache at ``cache``). Every variable
    ``ngram_jax.storage.configure`` would derive is set here too, so that none is left from another server."""
    return {"NGRAM_JAX_CACHE_DIR": str(cache),
            "AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "STORAGE_EMULATOR_HOST": gcs.url, "TENSORSTORE_GCS_HTTP_URL": gcs.url,
            "CLOUD_STORAGE_EMULATOR_ENDPOINT": gcs.url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@dataclass
class ObjectStores:
    """The running servers, the environment that points clients at them, and a bucket URL on each."""

    s3: S3Server
    gcs: GcsServer
    env: dict[str, str]
    s3_bucket: str
    gs_bucket: str

    def bucket(self, scheme: str) -> str:
        return self.s3_bucket if scheme == "s3" else self.gs_bucket
