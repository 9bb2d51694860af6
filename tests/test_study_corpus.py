"""The study corpus builder (prepare --study) on fake local packages: resumable downloads, partial and
failed downloads are clear errors, the held-out split shares no document text with training."""

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from ngram_jax.data import study_corpus as sc
from ngram_jax.data.prepare import build_study_corpus
from ngram_jax.data.tokenizer import load_tokenizer
from ngram_jax.errors import DataError

PACKAGES = (("alpha", "1.0"), ("beta", "2.0"), ("gamma", "0.1"))


def fake_wheel(name: str, version: str) -> bytes:
    rng = np.random.default_rng(sum(map(ord, name)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(30):
            body = "\n".join(f"def f_{name}_{i}_{j}(x):\n    return x * {int(rng.integers(1000))} + {j}\n"
                             for j in range(20))
            z.writestr(f"{name}/mod_{i}.py", body)
        z.writestr(f"{name}/shared.py", "VENDORED = 'the same text in every package'\n")  # deduplicated
        z.writestr(f"{name}/empty.py", "")
        z.writestr(f"{name}/data.json", "{}")
    return buf.getvalue()


class Downloader:
    def __init__(self, fail=(), truncate=()):
        self.calls, self.fail, self.truncate = [], set(fail), set(truncate)

    def __call__(self, name, version, dest: Path):
        self.calls.append(name)
        if name in self.fail:
            raise DataError(f"pip download {name}=={version} failed (simulated)")
        data = fake_wheel(name, version)
        if name in self.truncate:
            data = data[: len(data) // 2]
        (dest / f"{name}-{version}-py3-none-any.whl").write_bytes(data)


def build(tmp_path, downloader, **kw):
    return build_study_corpus(tmp_path / "cache", tmp_path / "out", vocab_size=300, packages=PACKAGES,
                              downloader=downloader, english=False, progress=False,
                              **{"min_train_tokens": 1000, "heldout_fraction": 0.1, **kw})


def test_failed_and_partial_downloads_are_errors_and_a_rerun_resumes(tmp_path):
    with pytest.raises(DataError, match="gamma==0.1 failed"):
        build(tmp_path, Downloader(fail={"gamma"}))
    with pytest.raises(DataError, match="partial or corrupt download"):
        build(tmp_path, Downloader(truncate={"gamma"}))
    assert not (tmp_path / "out").exists()
    again = Downloader()
    meta = build(tmp_path, again)
    assert again.calls == ["gamma"]  # alpha and beta were complete and kept
    assert meta["packages"] == ["alpha==1.0", "beta==2.0", "gamma==0.1"]
    # once: a second build with the same packages does nothing
    third = Downloader()
    assert build(tmp_path, third)["tokenizer_hash"] == meta["tokenizer_hash"] and third.calls == []


def test_split_by_document_text_and_token_counts(tmp_path):
    meta = build(tmp_path, Downloader())
    out = tmp_path / "out"
    tok = load_tokenizer(out)
    texts = {}
    for split in ("train", "heldout"):
        s = meta["splits"][split]
        records = [np.frombuffer(r, np.int32) for f in s["files"]
                   for r in ArrayRecordReader(str(out / f)).read_all()]
        assert sum(len(r) for r in records) >= s["tokens"]  # pieces overlap by one token
        texts[split] = {tok.decode(r.tolist(), skip_special_tokens=True) for r in records}
    assert texts["heldout"] and not texts["train"] & texts["heldout"]
    docs = [json.loads(line)["text"] for f in sorted((tmp_path / "cache/documents").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert sum("VENDORED" in d for d in docs) == 1  # identical files kept once, empty ones dropped
    assert len(docs) == 3 * 30 + 1 == meta["splits"]["train"]["documents"] + meta["splits"]["heldout"]["documents"]
    with pytest.raises(DataError, match="fewer than the 10,000,000 required"):
        build_study_corpus(tmp_path / "cache", tmp_path / "out2", vocab_size=300, packages=PACKAGES,
                           downloader=Downloader(), english=False, progress=False, min_train_tokens=10_000_000)
    with pytest.raises(DataError, match="fewer than"):  # a rerun does not accept the small corpus it kept
        build_study_corpus(tmp_path / "cache", tmp_path / "out2", vocab_size=300, packages=PACKAGES,
                           downloader=Downloader(), english=False, progress=False, min_train_tokens=10_000_000)


def test_changed_archive_is_downloaded_again(tmp_path):
    d = Downloader()
    archive = sc.fetch_package("alpha", "1.0", tmp_path, d)
    assert sc.fetch_package("alpha", "1.0", tmp_path, d) == archive and d.calls == ["alpha"]
    archive.write_bytes(archive.read_bytes()[:100])  # corrupted after it was marked complete
    sc.fetch_package("alpha", "1.0", tmp_path, d)
    assert d.calls == ["alpha", "alpha"]
