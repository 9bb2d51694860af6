"""Training throughput and MFU: real tokens only, the activated parameters actually routed, and the time
of the training steps alone (the end-to-end check that eval and saves stay out is in test_train.py)."""

import math

import numpy as np
import pytest
from flax import nnx

from ngram_jax.budget import parameter_budget
from ngram_jax.config import load_config
from ngram_jax.train.loop import train_step
from ngram_jax.train.metrics import TrainWindow, activated_params, flops_per_token
from ngram_jax.train.state import build_train_state

SMALL = ["model.d_model=64", "model.num_blocks=2", "model.ffn_dim=128", "model.moe.num_experts=4",
         "model.moe.num_zero_experts=2", "model.moe.top_k=2", "model.moe.expert_dim=32", "model.vocab_size=512",
         "model.eos_id=3", "data.seq_len=16", "data.batch_size=2"]


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/models/tiny_ne.yaml", SMALL)


def test_activated_params_follow_the_zero_expert_share(cfg):
    b = parameter_budget(cfg)
    one_expert = 3 * cfg.model.d_model * cfg.model.moe.expert_dim
    all_real = np.array([[3, 3, 3, 3, 0, 0], [8, 0, 0, 4, 0, 0]])  # [L, E+Z]: 6 tokens x top_k 2 per layer
    assert activated_params(cfg, b["activated_max"], all_real) == b["activated_max"]
    all_zero = np.array([[0, 0, 0, 0, 6, 6], [0, 0, 0, 0, 7, 5]])
    assert activated_params(cfg, b["activated_max"], all_zero) == b["activated_min"]
    # layer 0: a quarter of the slots zero (1.5 real experts per token), layer 1: half (1.0)
    mixed = np.array([[3, 3, 2, 1, 2, 1], [2, 2, 1, 1, 3, 3]])
    want = b["activated_max"] - one_expert * (0.5 + 1.0)
    assert activated_params(cfg, b["activated_max"], mixed) == pytest.approx(want)
    assert b["activated_min"] < want < b["activated_max"]
    dense = load_config("configs/models/tiny_ne.yaml", SMALL + ["model.moe.num_experts=0",
                                                                  "model.moe.num_zero_experts=0"])
    assert activated_params(dense, 1234, np.zeros((0, 0))) == 1234


def test_window_counts_real_tokens_training_time_and_routed_flops(cfg):
    b = parameter_budget(cfg)
    window = TrainWindow(cfg, b["activated_max"], peak=1e9)
    real = np.array([[3, 3, 3, 3, 0, 0], [3, 3, 3, 3, 0, 0]])
    half = np.array([[2, 2, 1, 1, 3, 3], [2, 2, 1, 1, 3, 3]])
    window.add(0.5, {"tokens": 20, "expert_counts": real})
    window.add(1.5, {"tokens": 12, "expert_counts": half})
    r = window.report()
    assert r["tokens_per_s"] == 32 / 2.0 and r["step_time_s"] == 1.0 and r["train_tokens"] == 32
    a_half = b["activated_max"] - 2 * 3 * cfg.model.d_model * cfg.model.moe.expert_dim
    assert r["activated_params"] == pytest.approx((20 * b["activated_max"] + 12 * a_half) / 32)
    flops = 20 * flops_per_token(cfg, b["activated_max"]) + 12 * flops_per_token(cfg, a_half)
    assert r["mfu"] == pytest.approx(flops / 2.0 / 1e9)
    assert window.steps == 0 and window.seconds == 0  # a new window starts after each report
    window.add(1.0, {"tokens": 5, "expert_counts": real})
    assert window.report()["train_tokens"] == 5
    assert "mfu" not in TrainWindow(cfg, b["activated_max"], peak=math.nan).report()  # unknown peak: no MFU


def test_train_step_reports_real_tokens_and_routing_of_real_tokens(cfg):
    model, opt = build_train_state(cfg)
    rng = np.random.default_rng(0)
    seg = np.ones((2, 16), np.int32)
    seg[0, 10:] = 0  # padding: 6 tokens
    seg[1, 13:] = 0  # 3 tokens
    batch = {"inputs": np.where(seg > 0, rng.integers(4, 512, (2, 16)), 0).astype(np.int32),
             "targets": rng.integers(4, 512, (2, 16)).astype(np.int32), "segment_ids": seg,
             "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (2, 16)).copy(),
             "loss_mask": (seg > 0).astype(np.float32)}
    out = nnx.jit(train_step)(model, opt, batch)
    assert int(out["tokens"]) == 32 - 9
    counts = np.asarray(out["expert_counts"])
    assert counts.shape == (2, 6) and (counts.sum(axis=1) == 23 * cfg.model.moe.top_k).all()
