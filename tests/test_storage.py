"""ngram_jax.storage against real local object stores (tests/storage_servers.py: moto for s3://, the GCS
emulator for gs://): locations and their one-line errors, bucket checks, the kvstore specs tensorstore and
orbax get, files appended to in a bucket, TensorBoard event files, prepared data read from a bucket (grain /
array_record), checkpoints saved, restored and read lazily from a bucket."""

import json
import os
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax import storage
from ngram_jax.config import ConfigError, load_config, to_dict

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/models/tiny_ne.yaml")
SCHEMES = ["s3", "gs"]
WORDS = ("the king queen crown sword castle night day river stone bread wine horse field storm letter "
         "ghost honour mercy love death war peace").split()
TINY = ["model.d_model=32", "model.num_blocks=1", "model.ffn_dim=32", "model.moe.expert_dim=16",
        "model.attention.q_lora_rank=16", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=8",
        "model.attention.v_head_dim=8", "model.attention.qk_rope_head_dim=8", "model.attention.num_heads=2",
        "data.seq_len=16", "data.batch_size=2", "data.bundled=false", "train.steps=2", "train.progress=false",
        "train.eval_batches=1", "model.vocab_size=300"]


def unique(url: str) -> str:
    return f"{url}/{uuid.uuid4().hex[:8]}"


def corpus(path: Path, docs: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 200))}) for _ in range(docs)))
    return path


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(res: subprocess.CompletedProcess, status: int, *named: str) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.returncode == status, (res.returncode, res.stderr)
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# Locations (no server needed)


def test_locations_local_and_in_buckets():
    assert str(storage.location("runs/x")) == "runs/x" and not storage.is_remote("runs/x")
    assert str(storage.location("gs://my-bucket/a/b/")) == "gs://my-bucket/a/b"
    assert str(storage.location("s3://my.bucket")) == "s3://my.bucket"
    assert storage.parts("s3://my-bucket/a/b") == ("s3", "my-bucket", "a/b")
    assert str(storage.location("gs://my-bucket/run") / "checkpoints" / "8") == "gs://my-bucket/run/checkpoints/8"
    assert str(storage.location("weird:name")) == "weird:name"  # a colon without a slash is a local file name


BAD = {
    "s4://bucket/run": ["unsupported URL scheme s4://", "gs://BUCKET/PATH"],
    "gs:/one-slash/run": ["starts with gs:// (two slashes)", "gs://one-slash/run"],
    "s3:bucket/run": ["starts with s3:// (two slashes)", "s3://bucket/run"],
    "gs://": ["'' is not a bucket name"],
    "s3://Upper_Case/run": ["'Upper_Case' is not a bucket name"],
    "s3://under_score/run": ["'under_score' is not a bucket name"],
    "ftp://host/x": ["unsupported URL scheme ftp://"],
}


@pytest.mark.parametrize("url", list(BAD))
def test_malformed_locations_are_refused_with_the_key(url):
    with pytest.raises(storage.MalformedLocation) as err:
        storage.location(url, "train.run_dir")
    assert str(err.value).startswith(f"train.run_dir={url}: ")
    for text in BAD[url]:
        assert text in str(err.value)


def test_config_locations_name_the_key():
    cfg = load_config(CONFIG, ["train.run_dir=gs://ok-bucket/run", "data.path=s4://x/data"])
    with pytest.raises(ConfigError, match=r"^data.path=s4://x/data: unsupported URL scheme s4://"):
        storage.config_locations(cfg)
    cfg = load_config(CONFIG, ["train.run_dir=gs://ok-bucket/run", "train.init_from=s3://b-1/r"])
    got = storage.config_locations(cfg)
    assert {k: str(v) for k, v in got.items()} == {"data.path": cfg.data.path, "train.run_dir": "gs://ok-bucket/run",
                                                  "train.init_from": "s3://b-1/r"}


def test_kvstore_specs_carry_the_s3_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    assert storage.kvstore("s3://b-1/run/ck/8/state") == {
        "driver": "s3", "bucket": "b-1", "path": "run/ck/8/state/", "endpoint": "http://127.0.0.1:9",
        "aws_region": "eu-west-3"}
    assert storage.kvstore("gs://b-1/x") == {"driver": "gcs", "bucket": "b-1", "path": "x/"}
    assert storage.kvstore("/tmp/x") == {"driver": "file", "path": "/tmp/x/"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert "endpoint" not in storage.kvstore("s3://b-1/x")  # AWS itself


@pytest.mark.parametrize("key,value", [("train.run_dir", "s4://bucket/run"), ("data.path", "gs:/one-slash/data"),
                                       ("train.init_from", "s3:bucket/run")])
def test_train_refuses_a_malformed_url_before_anything_runs(key, value, tmp_path):
    res = cli(str(ROOT / "train.py"), CONFIG, f"{key}={value}", cwd=tmp_path)
    one_error_line(res, 2, f"{key}={value}")
    assert list(tmp_path.iterdir()) == []  # no local directory with a strange name


def test_eval_refuses_a_malformed_url_as_a_usage_error(tmp_path):
    res = cli(str(ROOT / "eval.py"), "--checkpoint", "gs:/my-bucket/run", cwd=tmp_path)
    one_error_line(res, 2, "--checkpoint=gs:/my-bucket/run", "gs://my-bucket/run")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# Buckets on the servers


def test_missing_bucket_is_an_error_and_is_not_created(object_stores, tmp_path):
    res = cli(str(ROOT / "train.py"), CONFIG, *TINY, "train.run_dir=s3://no-such-bucket/run1", cwd=tmp_path)
    one_error_line(res, 1, "train.run_dir=s3://no-such-bucket/run1", "bucket s3://no-such-bucket does not exist",
                   object_stores.s3.url)
    assert list(tmp_path.iterdir()) == []
    assert not storage.location("s3://no-such-bucket").exists()  # s3fs would have created it on a mkdir
    with pytest.raises(storage.StorageError, match="bucket gs://no-such-bucket does not exist"):
        storage.check("gs://no-such-bucket/run", "train.run_dir", write=True)


def test_unreachable_s3_server_at_start_is_one_line_and_writes_nothing(object_stores, tmp_path):
    from storage_servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    res = cli(str(ROOT / "train.py"), CONFIG, *TINY, f"data.path={object_stores.s3_bucket}/data",
              f"train.run_dir={object_stores.s3_bucket}/run", cwd=tmp_path, env={"AWS_ENDPOINT_URL": dead})
    one_error_line(res, 1, f"train.run_dir={object_stores.s3_bucket}/run", f"cannot reach {dead}")
    assert list(tmp_path.iterdir()) == []


def test_unreachable_gcs_server_at_start_is_one_line_and_writes_nothing(object_stores, tmp_path):
    from storage_servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    env = {k: dead for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT")}
    res = cli(str(ROOT / "train.py"), CONFIG, *TINY, f"train.run_dir={object_stores.gs_bucket}/run", cwd=tmp_path,
              env=env)
    one_error_line(res, 1, f"train.run_dir={object_stores.gs_bucket}/run", f"cannot reach {dead}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("scheme", SCHEMES)
def test_appended_file_keeps_what_the_object_held(object_stores, scheme):
    path = storage.location(unique(object_stores.bucket(scheme))) / "metrics.jsonl"
    f = storage.AppendedFile(path, every_s=3600)
    f.write("a\n")
    assert not path.exists()  # kept until a flush
    f.flush()
    f.write("b\n")
    f.close()
    assert path.read_text() == "a\nb\n"
    with storage.AppendedFile(path, every_s=0) as g:  # reopened (a resumed run): appends to what is there
        g.write("c\n")
        assert path.read_text() == "a\nb\nc\n"  # every_s=0: at every write


@pytest.mark.parametrize("scheme", SCHEMES)
def test_move_dir_and_remove_in_a_bucket(object_stores, scheme):
    root = storage.location(unique(object_stores.bucket(scheme)))
    (root / "8" / "state" / "d").mkdir(parents=True, exist_ok=True)
    (root / "8" / "state" / "d" / "x").write_bytes(b"123")
    (root / "8" / "commit_success.txt").write_text("ok")
    storage.move_dir(root / "8", root / "8.unreadable-0")
    assert not (root / "8").exists()
    assert storage.files(root / "8.unreadable-0") == ["commit_success.txt", "state/d/x"]
    assert (root / "8.unreadable-0" / "state" / "d" / "x").read_bytes() == b"123"
    storage.remove(root)
    assert not root.exists()


def _event_scalars(data: bytes) -> dict[str, list[tuple[int, float]]]:
    """The scalars of a TensorBoard event file (TFRecord framing: length, crc, event proto, crc)."""
    from tensorboardX.proto import event_pb2

    out, i = {}, 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        ev = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
        for v in ev.summary.value:
            out.setdefault(v.tag, []).append((ev.step, v.simple_value))
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_metrics_and_tensorboard_event_files_in_a_bucket(object_stores, scheme):
    from ngram_jax.train.metrics import MetricsWriter

    run_dir = storage.location(unique(object_stores.bucket(scheme)))
    w = MetricsWriter(run_dir, flush_s=3600)
    w.write(1, {"loss": 2.5, "lr": 0.1})
    w.flush()
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 1, "loss": 2.5, "lr": 0.1}]
    w.write(2, {"loss": 2.0, "lr": 0.1})
    w.close()
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    (events,) = list((run_dir / "tensorboard").iterdir())
    assert events.name.startswith("events.out.tfevents.")
    assert _event_scalars(events.read_bytes())["loss"] == [(1, 2.5), (2, 2.0)]


# ------------------------------------------------------------------------------------------------
# Prepared data and checkpoints in buckets


@pytest.fixture(scope="module")
def local_data(tmp_path_factory):
    from ngram_jax.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("storage_data")
    prepare([corpus(tmp / "a.jsonl")], tmp / "data", train_bpe_vocab=300, heldout_fraction=0.2)
    return tmp


@pytest.mark.parametrize("scheme", SCHEMES)
def test_prepared_data_in_a_bucket_reads_as_locally(object_stores, local_data, scheme):
    """prepare --out URL (text from the bucket too), then grain reads the same records: gs:// shards through
    array_record's own GCS reader, s3:// ones from the local cache."""
    from ngram_jax.data.pipeline import TokenSource
    from ngram_jax.data.prepare import prepare, read_metadata

    root = storage.location(unique(object_stores.bucket(scheme)))
    storage.copy_file(local_data / "a.jsonl", root / "a.jsonl")
    meta = prepare([root / "a.jsonl"], root / "data", train_bpe_vocab=300, heldout_fraction=0.2)
    here_meta = read_metadata(local_data / "data")
    assert read_metadata(root / "data") == meta == {**here_meta, "sources": [str(root / "a.jsonl")]}
    assert storage.files(root / "data") == sorted(os.listdir(local_data / "data"))
    here, there = TokenSource(local_data / "data", "train", 300), TokenSource(root / "data", "train", 300)
    assert len(here) == len(there) > 0
    assert all(np.array_equal(here[i], there[i]) for i in range(len(here)))
    cached = [f.startswith(storage.cache_dir()) for f in there.files]
    assert all(cached) if scheme == "s3" else not any(cached) and all(f.startswith("gs://") for f in there.files)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoint_saved_restored_and_read_lazily_in_a_bucket(object_stores, local_data, scheme):
    """orbax saves a model and optimizer state into the bucket (OCDBT, the tables in row blocks); restore_model
    and LazyCheckpoint's tensorstore row reads give back exactly what was saved."""
    from ngram_jax.analyze import LazyCheckpoint
    from ngram_jax.checkpoint import Checkpointer, restore_model, row_chunked_paths
    from ngram_jax.data.pipeline import make_dataset
    from ngram_jax.model import build_model
    from ngram_jax.sharding import param_context
    from ngram_jax.train.optimizer import Optimizer

    run_dir = storage.location(unique(object_stores.bucket(scheme)))
    data = local_data / "data"
    cfg = load_config(CONFIG, [*TINY, f"data.path={data}", "model.vocab_size=300", f"train.run_dir={run_dir}"])
    with param_context(None):
        model = build_model(cfg, nnx.Rngs(cfg.seed))
        opt = Optimizer(model, cfg.train)
    ckpt = Checkpointer(run_dir / "checkpoints")
    it = iter(make_dataset(data, "train", seq_len=16, batch_size=2, vocab_size=300, seed=0))
    ckpt.save(3, {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}, it,
              {"config": to_dict(cfg), "step": 3}, row_chunked_paths(model, opt))
    ckpt.close()
    assert (run_dir / "checkpoints" / "3" / "commit_success.txt").exists()  # complete: its commit file is there
    names = storage.files(run_dir / "checkpoints")
    assert "3/state/_sharding" in names  # objects named as orbax names them (a key, not a "directory/")
    copy = storage.location(unique(object_stores.bucket(scheme)))  # copied object by object (gsutil cp -r)
    for name in names:
        storage.copy_file(run_dir / "checkpoints" / name, copy / "checkpoints" / name)
    for where in (run_dir, copy):
        restored, rcfg = restore_model(where)
        assert rcfg == cfg
        want = nnx.to_flat_state(nnx.state(model, nnx.Param))
        got = dict(nnx.to_flat_state(nnx.state(restored, nnx.Param)))
        for path, var in want:
            np.testing.assert_array_equal(np.asarray(got[path][...]), np.asarray(var[...]), err_msg=str(path))
    lazy = LazyCheckpoint(run_dir)
    table = np.asarray(model.embed.ngram_table[...])
    ids = np.array([0, 5, 31, 32, 33, table.shape[0] - 1])
    np.testing.assert_array_equal(lazy.rows(("embed", "ngram_table"), ids), table[ids])
    assert lazy.table_bytes_read > 0


def test_unreachable_endpoint_that_never_answers_is_reported_within_the_timeout(monkeypatch):
    """A server that never completes a connection (its accept queue full: the handshake is dropped, as by a
    firewall) is reported after storage.CONNECT_TIMEOUT_S, naming the timeout, not after the clients' retries."""
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    host, port = server.getsockname()
    fillers = [socket.socket() for _ in range(4)]
    for f in fillers:
        f.setblocking(False)
        f.connect_ex((host, port))
    time.sleep(0.2)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setattr(storage, "CONNECT_TIMEOUT_S", 0.5)
    t0 = time.monotonic()
    try:
        with pytest.raises(storage.StorageError, match=rf"cannot reach http://{host}:{port} .*within 0.5 s"):
            storage.check("s3://some-bucket/run", "train.run_dir")
    finally:
        for f in [*fillers, server]:
            f.close()
    assert time.monotonic() - t0 < 5


def test_orbax_pin_is_the_release_the_s3_adapter_wraps(monkeypatch):
    """s3:// checkpoints wrap an orbax internal (ngram_jax/checkpoint/s3.py): pyproject pins exactly that
    release, the installed one is it, its builder takes the parameters the wrapper passes on, and any other
    installed version is refused on one line."""
    import tomllib

    import orbax.checkpoint as ocp

    from ngram_jax.checkpoint import s3
    from ngram_jax.errors import UserError

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert [d.split("#")[0].strip() for d in deps if d.startswith("orbax")] == [f"orbax-checkpoint=={s3.ORBAX_VERSION}"]
    assert ocp.__version__ == s3.ORBAX_VERSION
    assert s3.builder_params() == s3.BUILDER_PARAMS
    monkeypatch.setattr(ocp, "__version__", "0.13.0")
    with pytest.raises(UserError, match=r"s3:// checkpoints need orbax-checkpoint==0.12.8 \(installed: 0.13.0\)"):
        s3.enable()
