"""Memory (issue 15): bfloat16 compute with float32 master weights (``model.dtype``), rematerialisation
per ScMoE block (``model.remat``), and what XLA's compiled memory analysis says about both."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from ngram_jax.config import REMAT_NAMES, ConfigError, ConfigWarning, load_config
from ngram_jax.model import build_model, default_positions
from ngram_jax.sharding import param_context
from ngram_jax.train.loop import train_step
from ngram_jax.train.loss import loss_fn
from ngram_jax.train.state import build_train_state

ROOT = Path(__file__).resolve().parent.parent
# A small tiny_ne (NE + MLA + 8 real / 4 zero experts): every kind of block computation, fast compiles.
SMALL = ["model.d_model=64", "model.num_blocks=2", "model.ffn_dim=128", "model.moe.expert_dim=32",
         "model.attention.q_lora_rank=32", "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=16",
         "model.attention.v_head_dim=16", "model.attention.qk_rope_head_dim=8", "model.vocab_size=512",
         "train.warmup_steps=1", "train.lr=0.01"]


def config(*overrides, base="tiny_ne"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(f"configs/models/{base}.yaml", [*SMALL, *overrides])


def make_batch(vocab: int, b: int = 4, s: int = 32, seed: int = 0) -> dict:
    """Random tokens in two packed documents per row (the second row ends in padding)."""
    rng = np.random.default_rng(seed)
    tok = rng.integers(2, vocab, (b, s + 1)).astype(np.int32)
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2 :] = 2
    seg[1, -4:] = 0
    seg = jnp.asarray(seg)
    return {"inputs": jnp.asarray(tok[:, :-1]), "targets": jnp.asarray(tok[:, 1:]), "segment_ids": seg,
            "positions": default_positions((b, s), seg), "loss_mask": (seg != 0).astype(jnp.float32)}


def train(cfg, steps: int, batch: dict):
    """``steps`` updates of the real training step (ngram_jax/train/loop.py) on one batch."""
    model, opt = build_train_state(cfg)
    step = nnx.jit(train_step)
    losses = [float(step(model, opt, batch)["loss"]) for _ in range(steps)]
    return losses, model, opt


def dots(jaxpr) -> list[tuple[str, tuple[str, ...], object, tuple[int, ...]]]:
    """(primitive, operand dtypes, precision, smallest operand rank) of every matmul, nested jaxprs included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
            avals = [v.aval for v in eqn.invars if v.aval.dtype != jnp.int32]
            out.append((eqn.primitive.name, tuple(str(a.dtype) for a in avals), eqn.params.get("precision"),
                        min(a.ndim for a in avals)))
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if hasattr(sub, "eqns"):
                    out += dots(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out += dots(sub.jaxpr)
    return out


def names(jaxpr) -> set[str]:
    """Every ``checkpoint_name`` in a jaxpr (nested ones included)."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "name":
            out.add(eqn.params["name"])
        for p in eqn.params.values():
            for sub in p if isinstance(p, tuple | list) else (p,):
                if hasattr(sub, "eqns"):
                    out |= names(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    out |= names(sub.jaxpr)
    return out


def forward_fn(model):
    graph, state = nnx.split(model)

    def f(state, batch):
        m = nnx.merge(graph, state)
        return m(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])

    return f, state


# ----------------------------------------------------------------------------------------------
# bfloat16 compute, float32 master weights


@pytest.mark.parametrize("grouped", ["tiled", pytest.param("ragged_dot", marks=pytest.mark.slow)])
def test_bf16_forward_computes_the_blocks_in_bf16_and_keeps_router_and_logits_float32(grouped):
    cfg = config("model.dtype=bfloat16", "model.param_dtype=float32", f"model.moe.grouped_matmul={grouped}")
    with param_context():
        model = build_model(cfg, nnx.Rngs(0))
    batch = make_batch(cfg.model.vocab_size)
    f, state = forward_fn(model)
    jaxpr = jax.make_jaxpr(f)(state, batch).jaxpr
    found = dots(jaxpr)
    bf16 = [d for d in found if d[1] == ("bfloat16", "bfloat16")]
    f32 = [d for d in found if d[1] == ("float32", "float32")]
    assert len(bf16) + len(f32) == len(found), found  # no mixed-dtype matmul
    # float32 matmuls: only the two routers (HIGHEST precision) and the routing statistics (a [N] mask
    # times the [N, E+Z] probabilities); every projection, attention, NE combine and expert is bf16
    router = [d for d in f32 if d[2] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)]
    stats = [d for d in f32 if d[3] == 1]
    assert len(router) == cfg.model.num_blocks and len(router) + len(stats) == len(f32), f32
    if grouped == "ragged_dot":  # experts: gate, up, down (tiled: batched dot_generals over tiles, bf16 above)
        assert sum(d[0] == "ragged_dot_general" for d in bf16) == 3 * cfg.model.num_blocks
    assert len(bf16) > 10 * cfg.model.num_blocks
    # the lowered program (what XLA compiles) has the same bf16 dots; logits come out float32
    hlo = jax.jit(f).lower(state, batch).as_text()
    ragged = sum(d[0] == "ragged_dot_general" for d in bf16)  # lowered as ragged_dot, not dot_general
    assert len(re.findall(r"stablehlo.dot_general .*bf16>", hlo)) >= len(bf16) - ragged
    logits = f(state, batch)
    assert logits.dtype == jnp.float32
    # parameters, and the router in particular, are float32
    params = flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert {str(v.dtype) for v in params.values()} == {"float32"}


# the default run's size: a 2-block d32 tiny_ne (NE + MLA + experts) on 2 rows of 16 tokens
D32 = ["model.d_model=32", "model.ffn_dim=32", "model.moe.expert_dim=16", "model.attention.q_lora_rank=16",
       "model.attention.kv_lora_rank=16", "model.attention.qk_nope_head_dim=8", "model.attention.v_head_dim=8",
       "model.attention.num_heads=2"]


@pytest.fixture(scope="module")
def d32_float32():
    batch = make_batch(512, b=2, s=16)
    return batch, train(config(*D32), 4, batch)


def test_bf16_training_tracks_float32_on_a_d32_model(d32_float32):
    """bf16 compute tracks float32 within 2% over 4 steps and keeps float32 weights, optimizer state and
    selection biases (the large variant below: d64)."""
    batch, (lo32, _, _) = d32_float32
    lo16, model, opt = train(config(*D32, "model.dtype=bfloat16"), 4, batch)
    np.testing.assert_allclose(lo16, lo32, rtol=2e-2)
    assert lo16[-1] < lo16[0] and lo32[-1] < lo32[0]
    for tree in (nnx.state(model, nnx.Param), nnx.state(opt)):
        leaves = jax.tree.leaves(nnx.to_pure_dict(tree))
        assert {str(v.dtype) for v in leaves if jnp.issubdtype(v.dtype, jnp.floating)} == {"float32"}
    assert all(b.moe.bias[...].dtype == jnp.float32 and float(jnp.abs(b.moe.bias[...]).sum()) > 0
               for b in model.blocks)


def test_block_remat_keeps_loss_gradients_and_routing_state_on_a_d32_model(d32_float32):
    """model.remat=block: the same losses over 4 training steps (so the same gradients and updates), the same
    expert counts and selection biases (written in the forward pass, seen by the step under nnx.remat)."""
    batch, (lo0, m0, _) = d32_float32
    lo1, m1, _ = train(config(*D32, "model.remat=block"), 4, batch)
    np.testing.assert_allclose(lo1, lo0, rtol=1e-5)
    for b0, b1 in zip(m0.blocks, m1.blocks, strict=True):
        np.testing.assert_array_equal(b1.moe.counts[...], b0.moe.counts[...])
        np.testing.assert_allclose(b1.moe.bias[...], b0.moe.bias[...], atol=1e-7)
        assert int(b1.moe.counts[...].sum()) > 0


@pytest.mark.slow  # compiles full training steps of several configs: make test-all
def test_bf16_training_tracks_float32_with_float32_weights_and_optimizer_state():
    batch = make_batch(512)
    lo32, _, _ = train(config(), 4, batch)
    lo16, model, opt = train(config("model.dtype=bfloat16"), 4, batch)
    # bf16 rounding (8 bits of mantissa) of every block activation: the loss stays within 2% of float32
    np.testing.assert_allclose(lo16, lo32, rtol=2e-2)
    assert lo16[-1] < lo16[0] - 0.1 and lo32[-1] < lo32[0] - 0.1  # both learn the batch
    for tree in (nnx.state(model, nnx.Param), nnx.state(opt)):
        leaves = jax.tree.leaves(nnx.to_pure_dict(tree))
        dtypes = {str(v.dtype) for v in leaves if jnp.issubdtype(v.dtype, jnp.floating)}
        assert dtypes == {"float32"}, dtypes
    bias = [b.moe.bias[...] for b in model.blocks]
    assert all(b.dtype == jnp.float32 and float(jnp.abs(b).sum()) > 0 for b in bias)  # balancing ran


# ----------------------------------------------------------------------------------------------
# Rematerialisation


def test_remat_config_is_validated_with_the_key_and_the_fix():
    with pytest.raises(ConfigError, match="model.remat: 'all' is not one of"):
        config("model.remat=all")
    with pytest.raises(ConfigError, match=r"model.remat=names .* model.remat_names, which is empty"):
        config("model.remat=names")
    with pytest.raises(ConfigError, match=r"model.remat_names=\['attn_out'\] is only read with model.remat=names"):
        config("model.remat=block", "model.remat_names=[attn_out]")
    with pytest.raises(ConfigError, match="unknown checkpoint name 'attn'; valid names: attn_in, qkv"):
        config("model.remat=names", "model.remat_names=[attn]")
    assert config("model.remat=names", "model.remat_names=[attn_out,ffn_in]").model.remat_names == ("attn_out",
                                                                                                     "ffn_in")


def test_the_checkpoint_names_in_the_model_are_the_names_config_accepts():
    for base, extra in (("tiny_ne", ()), ("tiny_plne", ()), ("tiny_gqa", ())):
        cfg = config(*extra, base=base)
        with param_context():
            model = build_model(cfg, nnx.Rngs(0))
        f, state = forward_fn(model)
        assert names(jax.make_jaxpr(f)(state, make_batch(512)).jaxpr) == set(REMAT_NAMES), base


POLICIES = [("block",), ("dots",), ("names", "model.remat_names=[attn_out,ffn_in]"),
            ("names", "model.remat_names=[qkv,attn_ctx,ffn_hidden,moe_out]")]


@pytest.fixture(scope="module")
def grads_by_policy():
    batch = make_batch(512)
    out = {}
    for policy, *extra in [("none",), *POLICIES]:
        with param_context():
            model = build_model(config(f"model.remat={policy}", *extra), nnx.Rngs(0))
        (total, loss), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model, batch)
        out[(policy, *extra)] = float(loss), flatten_dict(nnx.to_pure_dict(grads))
    return out


@pytest.mark.slow  # compiles full training steps of several configs: make test-all
@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: "+".join(p))
def test_remat_gives_the_loss_and_gradients_of_no_remat(grads_by_policy, policy):
    loss0, g0 = grads_by_policy[("none",)]
    loss, g = grads_by_policy[policy]
    assert abs(loss - loss0) <= 1e-6 * abs(loss0)
    assert g.keys() == g0.keys()
    # Recomputing the forward inside the backward pass changes how XLA fuses (and so orders) a few float32
    # reductions: measured 2e-6 relative (global norm) for `block`, bitwise-equal losses. Tolerance 1e-5.
    num = sum(float(jnp.sum(jnp.square(g[k] - g0[k]))) for k in g0)
    den = sum(float(jnp.sum(jnp.square(g0[k]))) for k in g0)
    assert num**0.5 <= 1e-5 * den**0.5
    for k in g0:  # and no single parameter's gradient is off
        np.testing.assert_allclose(g[k], g0[k], rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(g0[k]))) + 1e-12,
                                   err_msg="/".join(map(str, k)))


@pytest.mark.slow  # CI time: make test-all runs it
def test_remat_keeps_the_routing_state_of_the_training_step():
    """The MoE counts and the selection bias are written in the forward pass; under nnx.remat the training
    step must still see them (and the bias update after the optimizer)."""
    batch = make_batch(512)
    lo0, m0, _ = train(config(), 3, batch)
    lo1, m1, _ = train(config("model.remat=block"), 3, batch)
    np.testing.assert_allclose(lo1, lo0, rtol=1e-5)
    for b0, b1 in zip(m0.blocks, m1.blocks, strict=True):
        np.testing.assert_array_equal(b1.moe.counts[...], b0.moe.counts[...])
        np.testing.assert_allclose(b1.moe.bias[...], b0.moe.bias[...], atol=1e-7)
        assert int(b1.moe.counts[...].sum()) > 0


# ----------------------------------------------------------------------------------------------
# Compiled memory: XLA's analysis of the real training step, and the planner's prediction of it


def plan_and_measure(config_file: str, *overrides: str, batch: int, seq: int) -> dict:
    """``python -m ngram_jax.tools.plan ... --measure --json`` in a fresh one-device process: the planner's
    terms and XLA's memory analysis of the jitted train_step (ngram_jax/train/loop.py, state donated), compiled
    with XLA:CPU's memory-minimising scheduler (the flag has to be set before the backend starts)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "ngram_jax.tools.plan", f"configs/models/{config_file}.yaml", *overrides,
           "--mesh", "data=1", "--batch", str(batch), "--seq", str(seq), "--backend", "cpu", "--measure", "--json"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


# (config, overrides, batch, seq): tiny_plain, tiny_ne, tiny_plain with block rematerialisation, and a deeper
# tiny_plain with longer rows, without and with block rematerialisation
CASES = {"tiny_plain": ("tiny_plain", (), 8, 128), "tiny_ne": ("tiny_ne", (), 8, 128),
         "remat": ("tiny_plain", ("model.remat=block",), 8, 128),
         "deep": ("tiny_plain", ("model.num_blocks=4",), 8, 256),
         "deep_remat": ("tiny_plain", ("model.num_blocks=4", "model.remat=block"), 8, 256)}


@pytest.fixture(scope="module")
def measured():
    return {name: plan_and_measure(c, *o, batch=b, seq=s) for name, (c, o, b, s) in CASES.items()}


@pytest.mark.slow  # compiles full training steps of several configs: make test-all
@pytest.mark.parametrize("none,block,ratio", [
    pytest.param("tiny_plain", "remat", 0.85, marks=pytest.mark.xfail(strict=True, reason=(
        "measured 2026-12-01 after the sorted/tiled dropless MoE landed: with 2 blocks the compiled peak "
        "(112 vs 113 MB of temporaries, none vs block) is no longer set by the blocks' residuals, with either "
        "grouped matmul; the 4-block case below still shows the saving"))),
    ("deep", "deep_remat", 0.95)])
def test_block_remat_lowers_the_compiled_temporary_memory(measured, none, block, ratio):
    # measured (2026-12-01): 0.76 with 2 blocks; only 0.86 with 4, where XLA:CPU recomputes several blocks
    # ahead of their backward pass (see test_the_planner_predicts_the_compiled_step_memory)
    a, b = measured[none]["measured"], measured[block]["measured"]
    assert b["temporaries"] < ratio * a["temporaries"], (a, b)
    assert b["arguments"] == a["arguments"]


CPU_SCHEDULE_GAP = ("XLA:CPU's schedule keeps several blocks' recomputed activations live at once (4 blocks, "
                    "remat=block: 341 MiB of temporaries, the recomputation present in the compiled program, where "
                    "one block at a time needs about 200 MiB); the plan counts one block at a time, as a "
                    "memory-aware scheduler does")


@pytest.mark.slow  # compiles full training steps of several configs: make test-all
@pytest.mark.parametrize("case", [c if c != "deep_remat" else
                                  pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=CPU_SCHEDULE_GAP))
                                  for c in CASES])
def test_the_planner_predicts_the_compiled_step_memory(measured, case):
    """Terms of the prediction and what they correspond to in XLA's analysis:

    - arguments (XLA: argument_size_in_bytes) = parameters + AdamW mu, nu + the other model variables
      (selection bias, routing statistics) + the batch: exact, from the abstract shapes;
    - temporaries (XLA: temp_size_in_bytes, the peak of the step's scratch heap) = float32 gradients of the
      dense parameters + what every block keeps for the backward pass (``blocks``; under remat: its input,
      plus ``recompute``, the last block's activations and one sublayer's cotangent) + the float32 softmax
      of the logits and its cotangent (``head``) + the embedding output.
    Each within 15% (arguments 1%), and their sum. Not predicted within 15% on CPU (docs/TRAINING.md, Memory): block
    remat with more than 2 blocks (``deep_remat``, strict xfail: the gap is XLA:CPU's schedule), bf16
    compute (XLA:CPU keeps float32 buffers: measured 123 MiB of temporaries for tiny_plain 8 x 128 against
    82 MiB planned) and XLA:CPU's default concurrency-optimised scheduler."""
    plan, got = measured[case]["plan"], measured[case]["measured"]
    assert plan["arguments"] == pytest.approx(got["arguments"], rel=0.01)
    assert plan["temporaries"] == pytest.approx(got["temporaries"], rel=0.15)
    assert plan["total"] == pytest.approx(got["total"], rel=0.15)
    assert plan["blocks"] > 0 and plan["head"] > 0
