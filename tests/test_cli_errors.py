"""Bad input: every entry point prints one line ``error: ...`` naming the key or file, exits non-zero
(2 for config and usage errors), and shows no traceback. Each case runs the real command in a
subprocess (one CPU device unless the case needs a mesh) and fails before any training step; the
docs/TROUBLESHOOTING.md lists the same cases."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from ngram_jax.checkpoint import Checkpointer, row_chunked_paths
from ngram_jax.config import load_config, to_dict
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare
from ngram_jax.data.tokenizer import train_bpe
from ngram_jax.model import build_model
from ngram_jax.ngram.hashing import make_layout
from ngram_jax.sharding import param_context
from ngram_jax.train.optimizer import Optimizer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs/models/tiny_ne.yaml")
USAGE, INPUT = 2, 1  # exit statuses: config / command line, and data / checkpoint / files
TINY = ["model.d_model=32", "model.num_blocks=1", "model.ffn_dim=32", "model.moe.expert_dim=16",
        "model.attention.q_lora_rank=16", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=8",
        "model.attention.v_head_dim=8", "model.attention.qk_rope_head_dim=8", "model.attention.num_heads=2",
        "data.seq_len=16", "data.batch_size=2", "data.bundled=false", "train.steps=2", "train.progress=false",
        "train.eval_batches=1"]
WORDS = ("the king queen crown sword castle night day river stone bread wine horse field storm letter "
         "ghost honour mercy love death war peace").split()


def corpus(path: Path, docs: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(json.dumps({"text": " ".join(rng.choice(WORDS, 200))}) for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    prepare([corpus(tmp / "a.jsonl", 40, 0)], tmp / "data", train_bpe_vocab=300, heldout_fraction=0.2)
    return tmp / "data"


@pytest.fixture(scope="module")
def vocab(data) -> int:
    return json.loads((data / "metadata.json").read_text())["vocab_size"]


def tiny(data, vocab, run_dir, *extra) -> list[str]:
    return [CONFIG, *TINY, f"data.path={data}", f"model.vocab_size={vocab}", f"train.run_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def run(data, vocab, tmp_path_factory) -> Path:
    """A run directory holding one checkpoint of the tiny config (saved in-process, no training)."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(CONFIG, tiny(data, vocab, run_dir)[1:])
    with param_context(None):
        model = build_model(cfg, nnx.Rngs(cfg.seed))
        opt = Optimizer(model, cfg.train)
    ckpt = Checkpointer(run_dir / "checkpoints")
    it = iter(make_dataset(data, "train", seq_len=16, batch_size=2, vocab_size=vocab, seed=0))
    ckpt.save(1, {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}, it,
              {"config": to_dict(cfg), "step": 1}, row_chunked_paths(model, opt))
    ckpt.close()
    return run_dir


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_bpe([" ".join(WORDS[::-1]) * 20], 280).save(str(path))
    return path


def cli(*args: str, devices: int = 1, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), JAX_NUM_CPU_DEVICES=str(devices))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_user_error(res: subprocess.CompletedProcess, status: int, *named: str) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert res.returncode == status, (res.returncode, res.stderr)
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------
# train.py: config errors (before the data is read and before JAX is imported)

CONFIG_CASES = {
    "unknown key": (["model.ngram.maxn=4"], ["unknown key model.ngram.maxn", "max_n"]),
    "wrong type": (["model.d_model=wide"], ["model.d_model", "expected an integer"]),
    "N (max_n) < 2": (["model.ngram.max_n=1"], ["model.ngram.max_n", ">= 2"]),
    "K (splits) < 1": (["model.ngram.splits=0"], ["model.ngram.splits", ">= 1"]),
    "r (ratio) <= 0": (["model.ngram.ratio=0"], ["model.ngram.ratio", "> 0"]),
    "top-k above the experts": (["model.moe.top_k=13"], ["model.moe.top_k=13", "num_experts + num_zero_experts"]),
    "negative experts": (["model.moe.num_experts=-1"], ["model.moe.num_experts", ">= 0"]),
    "zero experts without experts": (["model.moe.num_experts=0"], ["model.moe.num_zero_experts", "num_experts > 0"]),
    "heads not divisible": (["model.attention.kind=gqa", "model.attention.num_kv_heads=3"],
                            ["model.attention.num_kv_heads=3", "num_heads=4"]),
    "d_model vs K*(N-1)": (["model.d_model=130"], ["model.d_model=130", "K*(N-1)"]),
    "unknown kernel": (["model.ngram.kernel=foo"], ["model.ngram.kernel", "'foo'", "'xla'"]),
    "override without =": (["model.d_model"], ["'model.d_model'", "key.path=value"]),
    "override into a value": (["model.d_model.x=1"], ["model.d_model.x", "not a section"]),
    "eos out of the vocabulary": (["model.eos_id=5000"], ["model.eos_id=5000", "vocab_size=4096"]),
    "bad mesh sizes": (["mesh.ici.fsdp=0"], ["mesh.ici", "at most one -1"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_train_config_errors(case):
    overrides, named = CONFIG_CASES[case]
    assert_user_error(cli("train.py", CONFIG, *overrides), USAGE, *named)


def test_train_missing_config_file():
    assert_user_error(cli("train.py", "configs/models/nope.yaml"), USAGE, "config file not found", "nope.yaml")


def test_train_without_arguments():
    assert_user_error(cli("train.py"), USAGE, "give a config file", "python train.py CONFIG.yaml")


# ------------------------------------------------------------------------------------------------
# train.py: data, mesh and checkpoint errors (before any training step)


def test_train_missing_data_directory(data, vocab, tmp_path):
    res = cli("train.py", *tiny(tmp_path / "nowhere", vocab, tmp_path / "r"))
    assert_user_error(res, INPUT, "data directory not found", str(tmp_path / "nowhere"), "ngram_jax.data.prepare")


def test_train_directory_that_is_not_prepared_data(vocab, tmp_path):
    (tmp_path / "raw").mkdir()
    res = cli("train.py", *tiny(tmp_path / "raw", vocab, tmp_path / "r"))
    assert_user_error(res, INPUT, "no metadata.json", str(tmp_path / "raw"))


def test_train_data_of_another_vocabulary(data, vocab, tmp_path):
    res = cli("train.py", *tiny(data, vocab, tmp_path / "r", "model.vocab_size=512"))
    assert_user_error(res, USAGE, str(data), f"vocab_size {vocab}", "model.vocab_size=512")


def test_train_data_with_another_eos(data, vocab, tmp_path):
    res = cli("train.py", *tiny(data, vocab, tmp_path / "r", "model.eos_id=5"))
    assert_user_error(res, USAGE, "token 1", "model.eos_id=5")


def test_train_token_ids_outside_the_vocabulary(data, vocab, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    meta = json.loads((bad / "metadata.json").read_text())
    f = bad / meta["splits"]["train"]["files"][0]
    w = ArrayRecordWriter(str(f), "group_size:1")
    for _ in range(4):
        w.write(np.array([5, 6, vocab + 7, 7, 1], np.int32).tobytes())
    w.close()
    res = cli("train.py", *tiny(bad, vocab, tmp_path / "r"))
    assert_user_error(res, INPUT, f.name, "position 2", f"token id {vocab + 7}", f"[0, {vocab})")


def test_train_mesh_that_does_not_divide_the_devices(data, vocab, tmp_path):
    res = cli("train.py", *tiny(data, vocab, tmp_path / "r", "mesh.ici.fsdp=2"))
    assert_user_error(res, USAGE, "mesh.ici", "1 devices", "fixed axes 2")


def test_train_mesh_that_does_not_divide_a_table(data, vocab, tmp_path):
    assert vocab % 3 == 0  # the token tables split; the N-gram table of row_multiple 1 does not
    ratio = next(r for r in (2.37, 2.41, 2.43, 2.47, 2.59) if make_layout(vocab, 3, 2, r, 1).padded_rows % 3)
    res = cli("train.py", *tiny(data, vocab, tmp_path / "r", "model.ngram.row_multiple=1",
                                f"model.ngram.ratio={ratio}"), devices=3)
    assert_user_error(res, USAGE, "ngram_table", "not divisible by the 3 shards", "model.ngram.row_multiple")


def test_train_kernel_that_cannot_run_here(data, vocab, tmp_path):
    res = cli("train.py", *tiny(data, vocab, tmp_path / "r", "model.ngram.kernel=pallas_tpu"))
    assert_user_error(res, USAGE, "model.ngram.kernel='pallas_tpu'", "only for TPU", "auto or xla")


def test_train_checkpoint_of_another_config(run, data, vocab, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    res = cli("train.py", *tiny(data, vocab, run_dir, "model.ngram.max_n=5", "model.ngram.splits=1"))
    line = assert_user_error(res, USAGE, str(run_dir), "different configuration",
                             "model.ngram.max_n: checkpoint 3 -> requested 5",
                             "model.ngram.splits: checkpoint 2 -> requested 1")
    assert line.count("requested") == 2


# ------------------------------------------------------------------------------------------------
# eval.py


def test_eval_missing_checkpoint(tmp_path):
    res = cli("eval.py", "--checkpoint", str(tmp_path / "no_run"))
    assert_user_error(res, INPUT, "--checkpoint", str(tmp_path / "no_run"))


def test_eval_run_directory_without_a_checkpoint(tmp_path):
    (tmp_path / "empty_run" / "checkpoints").mkdir(parents=True)
    res = cli("eval.py", "--checkpoint", str(tmp_path / "empty_run"))
    assert_user_error(res, INPUT, "no complete checkpoint", str(tmp_path / "empty_run"))


def test_eval_missing_data(run, tmp_path):
    res = cli("eval.py", "--checkpoint", str(run), "--data", str(tmp_path / "nope"))
    assert_user_error(res, INPUT, "--data", str(tmp_path / "nope"))


def test_eval_tokenizer_that_does_not_match_the_data(run, data, other_tokenizer):
    res = cli("eval.py", "--checkpoint", str(run), "--tokenizer", str(other_tokenizer))
    assert_user_error(res, INPUT, "--tokenizer", str(data), "prepared with")


def test_eval_text_without_any_document(run, tmp_path):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n\n")
    res = cli("eval.py", "--checkpoint", str(run), "--data", str(blank))
    assert_user_error(res, INPUT, str(blank), "0 document(s)", "give a file with some text")


def test_eval_unknown_lm_eval_task(run):
    """A task name lm-eval does not know is refused before the model is read, naming the task and how to
    list the available ones (lm-eval indexes its tasks in about 10 s)."""
    pytest.importorskip("lm_eval", reason="eval extra not installed: pip install -e '.[eval]'")
    res = cli("eval.py", "--checkpoint", str(run), "--tasks", "no_such_task_anywhere")
    assert_user_error(res, USAGE, "--tasks no_such_task_anywhere", "lm-eval ls tasks", "--include-path")


@pytest.mark.slow
def test_eval_unknown_lm_eval_task_next_to_a_local_one(run, tmp_path):
    """With --include-path, a task defined there passes the check and the unknown one names the directory."""
    pytest.importorskip("lm_eval", reason="eval extra not installed: pip install -e '.[eval]'")
    from test_eval_analysis import write_task

    tasks = write_task(tmp_path)
    res = cli("eval.py", "--checkpoint", str(run), "--tasks", "ngram_jax_tiny_mc,no_such_task_anywhere",
              "--include-path", str(tasks))
    assert_user_error(res, USAGE, "--tasks no_such_task_anywhere", f"in {tasks} or the harness",
                      f"lm-eval ls tasks --include_path {tasks}")


def test_eval_bad_argument():
    assert_user_error(cli("eval.py", "--checkpoint", "x", "--batches", "0"), USAGE, "--batches 0", ">= 1")


def test_eval_needs_a_source():
    assert_user_error(cli("eval.py"), USAGE, "--checkpoint", "required")


# ------------------------------------------------------------------------------------------------
# generate, analyze


def test_generate_missing_checkpoint(tmp_path):
    res = cli("-m", "ngram_jax.generate", "--checkpoint", str(tmp_path / "no_run"), "--prompt", "the")
    assert_user_error(res, INPUT, "no checkpoints", str(tmp_path / "no_run"))


def test_generate_tokenizer_that_does_not_match_the_data(run, data, other_tokenizer):
    res = cli("-m", "ngram_jax.generate", "--checkpoint", str(run), "--prompt", "the",
              "--tokenizer", str(other_tokenizer))
    assert_user_error(res, INPUT, str(other_tokenizer), str(data), "hash")


def test_generate_bad_sampling_argument():
    res = cli("-m", "ngram_jax.generate", "--checkpoint", "x", "--prompt", "the", "--top-p", "0")
    assert_user_error(res, USAGE, "--top-p 0.0", "(0, 1]")


def test_analyze_missing_checkpoint(tmp_path):
    res = cli("-m", "ngram_jax.analyze", str(tmp_path / "no_run"))
    assert_user_error(res, INPUT, "no checkpoints", str(tmp_path / "no_run"))


def test_analyze_missing_text(run, tmp_path):
    res = cli("-m", "ngram_jax.analyze", str(run), "--text", str(tmp_path / "missing.txt"))
    assert_user_error(res, INPUT, "--text", "missing.txt")


# ------------------------------------------------------------------------------------------------
# data preparation and tools


def test_prepare_missing_input(tmp_path):
    res = cli("-m", "ngram_jax.data.prepare", "--input", str(tmp_path / "a.txt"), "--train-bpe", "300",
              "--out", str(tmp_path / "out"))
    assert_user_error(res, INPUT, "input file not found", str(tmp_path / "a.txt"))
    assert not (tmp_path / "out").exists()


def test_prepare_malformed_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    res = cli("-m", "ngram_jax.data.prepare", "--input", str(tmp_path / "a.jsonl"), "--train-bpe", "300",
              "--out", str(tmp_path / "out"))
    assert_user_error(res, INPUT, f"{tmp_path / 'a.jsonl'}:2", "'text' field")


def test_prepare_missing_tokenizer(tmp_path):
    corpus(tmp_path / "a.jsonl", 3, 0)
    res = cli("-m", "ngram_jax.data.prepare", "--input", str(tmp_path / "a.jsonl"), "--tokenizer",
              str(tmp_path / "tok.json"), "--out", str(tmp_path / "out"))
    assert_user_error(res, INPUT, "tokenizer not found", str(tmp_path / "tok.json"))


def test_prepare_usage_errors(tmp_path):
    res = cli("-m", "ngram_jax.data.prepare", "--input", "a.txt", "--out", str(tmp_path / "out"))
    assert_user_error(res, USAGE, "--tokenizer", "--train-bpe", "required")
    res = cli("-m", "ngram_jax.data.prepare", "--input", "a.txt", "--train-bpe", "100", "--out", "o")
    assert_user_error(res, USAGE, "--train-bpe 100", "258")


def test_plan_bad_mesh_spec():
    res = cli("-m", "ngram_jax.tools.plan", CONFIG, "--mesh", "data=two")
    assert_user_error(res, USAGE, "mesh spec", "'data'", "'two'")


def test_collisions_missing_tokens_file(tmp_path):
    res = cli("-m", "ngram_jax.tools.collisions", "--tokens", str(tmp_path / "t.npy"), "--ratios", "2.37")
    assert_user_error(res, INPUT, str(tmp_path / "t.npy"))


# ------------------------------------------------------------------------------------------------
# files that are not what they should be: binary bytes, or a text cut short

BINARY = bytes(range(128, 256)) * 4  # no UTF-8 text starts with these bytes


def test_train_binary_config_file(tmp_path):
    (tmp_path / "model.yaml").write_bytes(BINARY)
    assert_user_error(cli("train.py", str(tmp_path / "model.yaml")), USAGE, str(tmp_path / "model.yaml"),
                      "not a YAML text file", "byte 0")


def test_train_config_file_cut_short(tmp_path):
    (tmp_path / "model.yaml").write_text("base: ../base.yaml\nmodel:\n  d_model: [64, 12")
    assert_user_error(cli("train.py", str(tmp_path / "model.yaml")), USAGE, str(tmp_path / "model.yaml"),
                      "not valid YAML", "line 3")


def test_generate_tokenizer_of_binary_bytes(run, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(BINARY)
    res = cli("-m", "ngram_jax.generate", "--checkpoint", str(run), "--prompt", "the",
              "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert_user_error(res, INPUT, str(tmp_path / "tokenizer.json"), "not a Hugging Face tokenizer.json", "UTF-8")


def test_generate_tokenizer_cut_short(run, data, tmp_path):
    text = (data / "tokenizer.json").read_text()
    (tmp_path / "tokenizer.json").write_text(text[: len(text) // 2])
    res = cli("-m", "ngram_jax.generate", "--checkpoint", str(run), "--prompt", "the",
              "--tokenizer", str(tmp_path / "tokenizer.json"))
    assert_user_error(res, INPUT, str(tmp_path / "tokenizer.json"), "not a valid Hugging Face tokenizer.json")


def test_train_data_with_binary_metadata(data, vocab, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    (bad / "metadata.json").write_bytes(BINARY)
    res = cli("train.py", *tiny(bad, vocab, tmp_path / "r"))
    assert_user_error(res, INPUT, str(bad / "metadata.json"), "not a metadata.json", "UTF-8")


def test_train_data_shard_cut_short(data, vocab, tmp_path):
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard = bad / json.loads((bad / "metadata.json").read_text())["splits"]["train"]["files"][0]
    os.truncate(shard, shard.stat().st_size // 2)
    res = cli("train.py", *tiny(bad, vocab, tmp_path / "r"))
    assert_user_error(res, INPUT, str(shard), "not a readable array_record shard", "prepare the data again")


def test_prepare_binary_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "fine"}\n' + BINARY)
    res = cli("-m", "ngram_jax.data.prepare", "--input", str(tmp_path / "a.jsonl"), "--train-bpe", "300",
              "--out", str(tmp_path / "out"))
    assert_user_error(res, INPUT, f"{tmp_path / 'a.jsonl'}:2", "not UTF-8")


def test_study_binary_sweep_file(tmp_path):
    (tmp_path / "sweep.yaml").write_bytes(BINARY)
    res = cli("-m", "ngram_jax.study", str(tmp_path / "sweep.yaml"), "--out", str(tmp_path / "out"))
    assert_user_error(res, USAGE, "sweep file", str(tmp_path / "sweep.yaml"), "not a YAML text file")


def test_study_report_of_binary_results(tmp_path):
    (tmp_path / "results.jsonl").write_bytes(BINARY)
    res = cli("-m", "ngram_jax.study", "report", str(tmp_path))
    assert_user_error(res, INPUT, str(tmp_path / "results.jsonl"), "results.jsonl of python -m ngram_jax.study")
