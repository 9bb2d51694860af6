"""``python -m ngram_jax.generate --draft ...``: bad input is one line ``error: ...`` before any weights are
read or anything compiles; a good request prints the text and stats that prove the drafter ran."""

import re

import pytest
from flax import nnx
from test_cli_errors import CONFIG, INPUT, USAGE, assert_user_error, cli, corpus, data, run, tiny, vocab  # noqa: F401

from ngram_jax.checkpoint import Checkpointer, row_chunked_paths
from ngram_jax.config import load_config, to_dict
from ngram_jax.data.pipeline import make_dataset
from ngram_jax.data.prepare import prepare
from ngram_jax.model import build_model
from ngram_jax.sharding import param_context
from ngram_jax.train.optimizer import Optimizer

GEN = ("-m", "ngram_jax.generate")


def save_run(run_dir, cfg, data_dir, vocab_size):
    with param_context(None):
        model = build_model(cfg, nnx.Rngs(cfg.seed))
        opt = Optimizer(model, cfg.train)
    ckpt = Checkpointer(run_dir / "checkpoints")
    it = iter(make_dataset(data_dir, "train", seq_len=16, batch_size=2, vocab_size=vocab_size, seed=0))
    ckpt.save(1, {"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}, it,
              {"config": to_dict(cfg), "step": 1}, row_chunked_paths(model, opt))
    ckpt.close()
    return run_dir


@pytest.fixture(scope="module")
def other_vocab_run(data, vocab, tmp_path_factory):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("draft_vocab")
    cfg = load_config(CONFIG, tiny(data, vocab, run_dir)[1:] + [f"model.vocab_size={vocab + 64}"])
    return save_run(run_dir, cfg, data, vocab)


@pytest.fixture(scope="module")
def other_tokenizer_run(vocab, tmp_path_factory):  # noqa: F811
    """Same vocabulary size, data tokenized with another BPE (trained on another corpus)."""
    tmp = tmp_path_factory.mktemp("draft_tok")
    meta = prepare([corpus(tmp / "b.jsonl", 40, 7)], tmp / "data", train_bpe_vocab=300, heldout_fraction=0.2)
    cfg = load_config(CONFIG, tiny(tmp / "data", vocab, tmp / "run")[1:])
    assert meta["vocab_size"] <= vocab
    return save_run(tmp / "run", cfg, tmp / "data", meta["vocab_size"])


def test_num_draft_below_one():
    res = cli(*GEN, "--checkpoint", "x", "--prompt", "the", "--draft", "prompt_lookup", "--num-draft", "0")
    assert_user_error(res, USAGE, "--num-draft 0", ">= 1")


def test_model_drafter_needs_a_checkpoint():
    res = cli(*GEN, "--checkpoint", "x", "--prompt", "the", "--draft", "model")
    assert_user_error(res, USAGE, "--draft-checkpoint")


def test_draft_checkpoint_with_another_vocabulary(run, other_vocab_run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the", "--draft", "model", "--draft-checkpoint",
              str(other_vocab_run))
    assert_user_error(res, INPUT, str(other_vocab_run), "vocabulary")


def test_draft_checkpoint_with_another_tokenizer(run, other_tokenizer_run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the", "--draft", "model", "--draft-checkpoint",
              str(other_tokenizer_run))
    assert_user_error(res, INPUT, str(other_tokenizer_run), "tokenizer")


def test_prompt_longer_than_the_cache(run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the king " * 10, "--draft", "prompt_lookup",
              "--max-len", "6")
    assert_user_error(res, USAGE, "longer than the cache", "--max-len 6")


def test_num_draft_larger_than_the_remaining_context(run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the king", "--draft", "prompt_lookup",
              "--max-len", "16", "--num-draft", "15")
    assert_user_error(res, USAGE, "--num-draft 15", "remaining context")


def test_speculative_generate_prints_text_and_stats(run):  # noqa: F811
    """The drafter flags reach the decoder: the stats count its calls and proposals."""
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the king the king the", "--draft", "prompt_lookup",
              "--num-draft", "3", "--temperature", "0", "--max-new-tokens", "8", "--stats", timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("the king the king the")
    stats = dict(re.findall(r"(\w+)=([\d.]+)", lines[-1]))
    assert "drafter=prompt_lookup" in lines[-1] and "K=3" in lines[-1]
    assert int(stats["draft_calls"]) >= 1 and int(stats["proposed"]) == 3 * int(stats["verify_steps"])


def test_ngram_drafter_needs_the_draft_head(run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the", "--draft", "ngram")
    assert_user_error(res, USAGE, "--draft ngram", "model.draft_head=ngram")


def test_early_reject_threshold_out_of_range():
    res = cli(*GEN, "--checkpoint", "x", "--prompt", "the", "--draft", "prompt_lookup", "--early-reject", "1.5")
    assert_user_error(res, USAGE, "--early-reject 1.5", "(0, 1)")


def test_mtp_drafter_needs_the_mtp_head(run):  # noqa: F811
    res = cli(*GEN, "--checkpoint", str(run), "--prompt", "the", "--draft", "mtp")
    assert_user_error(res, USAGE, "--draft mtp", "model.draft_head=mtp")


@pytest.mark.slow  # two train.py runs: kept out of CI for time, run by make test-all
def test_an_mtp_head_trains_on_a_frozen_target_started_from_another_run(run, data, vocab, tmp_path):  # noqa: F811
    """``python train.py ... model.draft_head=mtp train.freeze_target=true train.init_from=RUN``: the new run
    starts from RUN's target (parameters and MoE selection biases) and trains only the MTP head, so after
    training its target is bit-identical to RUN's and its head has moved from its initialization."""
    import numpy as np
    from flax import nnx as _nnx

    from ngram_jax.checkpoint import restore_model
    from ngram_jax.layers.moe import SelectionBias

    out = tmp_path / "mtp"
    res = cli("train.py", *tiny(data, vocab, out, "model.draft_head=mtp", "train.freeze_target=true",
                                f"train.init_from={run}", "seed=1"), timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"starts from {run}; initialised here: draft_head" in res.stdout
    which = _nnx.Any(_nnx.Param, SelectionBias)
    src = _nnx.to_pure_dict(_nnx.state(restore_model(run)[0], which))
    got = _nnx.to_pure_dict(_nnx.state(restore_model(out)[0], which))
    head = got.pop("draft_head")
    assert jax_equal(src, got)
    cfg = load_config(CONFIG, tiny(data, vocab, out, "model.draft_head=mtp", "seed=1")[1:])
    with param_context(None):
        fresh = _nnx.to_pure_dict(_nnx.state(build_model(cfg, _nnx.Rngs(cfg.seed)).draft_head))
    assert not jax_equal(fresh, head)
    assert np.isfinite(np.asarray(head["proj"]["kernel"])).all()


def jax_equal(a, b) -> bool:
    import jax
    import numpy as np

    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(np.array_equal(x, y) for x, y in pairs)
