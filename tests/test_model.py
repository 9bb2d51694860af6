"""The model family: every config builds, causality, packed documents stay separate, budgets."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ngram_jax.budget import closed_form_budget, moe_baseline, parameter_budget
from ngram_jax.config import ConfigError, ConfigWarning, load_config
from ngram_jax.layers.attention import GQA, MLA
from ngram_jax.model import build_model, default_positions

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
# configs/paper/*.yaml are sweep files, not configs (tests/test_study.py validates every run of them)
CONFIG_FILES = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "paper")
TINY = ["tiny_plain", "tiny_dense", "tiny_ne", "tiny_plne", "tiny_moe", "tiny_gqa"]


def cfg(name, *overrides):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return load_config(CONFIGS / "models" / f"{name}.yaml", overrides=list(overrides))


@pytest.fixture(scope="module")
def models():
    with nnx.use_eager_sharding(False):
        return {name: build_model(cfg(name), nnx.Rngs(0)) for name in ("tiny_ne", "tiny_plne", "tiny_gqa")}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_builds(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        c = load_config(path)
    if parameter_budget(c)["total"] > 50e6:  # big ones: abstract shapes only
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(lambda: build_model(c, nnx.Rngs(0)))
        assert isinstance(abstract.blocks[0].attn[0], MLA | GQA)
        return
    model = build_model(c, nnx.Rngs(0))
    logits = model(np.zeros((1, 5), np.int32))
    assert logits.shape == (1, 5, c.model.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("name", ["tiny_ne", "tiny_plne", "tiny_gqa"])
def test_causal(models, name):
    model = models[name]
    f = nnx.jit(lambda m, t: m(t))
    t = np.random.default_rng(0).integers(1, 4096, (2, 12))
    base = np.asarray(f(model, t))
    other = t.copy()
    other[:, 7:] = np.random.default_rng(1).integers(1, 4096, (2, 5))
    np.testing.assert_allclose(np.asarray(f(model, other))[:, :7], base[:, :7], atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_ne", "tiny_plne", "tiny_gqa"])
def test_packed_documents_equal_separate_runs(models, name):
    """Doc B packed after doc A gives the logits of doc B alone: attention, positions and the
    n-gram history all restart at the segment boundary."""
    model = models[name]
    rng = np.random.default_rng(2)
    doc_a, doc_b = rng.integers(1, 4096, 5), rng.integers(1, 4096, 7)
    packed = np.concatenate([doc_a, doc_b])[None]
    seg = np.array([[1] * 5 + [2] * 7])
    out = np.asarray(model(packed, segment_ids=seg))
    alone_b = np.asarray(model(doc_b[None]))
    alone_a = np.asarray(model(doc_a[None]))
    np.testing.assert_allclose(out[0, 5:], alone_b[0], atol=2e-5)
    np.testing.assert_allclose(out[0, :5], alone_a[0], atol=2e-5)
    # and without segment ids the second document does see the first
    assert not np.allclose(np.asarray(model(packed))[0, 5:], alone_b[0], atol=1e-3)


def test_attention_never_crosses_documents():
    c = cfg("tiny_ne").model
    for attn in (MLA(c.attention, c.d_model, rngs=nnx.Rngs(0)),
                 GQA(cfg("tiny_gqa").model.attention, c.d_model, rngs=nnx.Rngs(0))):
        x = jax.random.normal(jax.random.key(0), (1, 10, c.d_model))
        seg = jnp.array([[1] * 4 + [2] * 6])
        pos = default_positions((1, 10), seg)
        y = attn(x, pos, seg)
        x2 = x.at[:, :4].set(jax.random.normal(jax.random.key(1), (1, 4, c.d_model)))  # change doc 1 only
        np.testing.assert_allclose(np.asarray(attn(x2, pos, seg))[:, 4:], np.asarray(y)[:, 4:], atol=1e-6)


def test_default_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(np.asarray(default_positions((2, 6), seg)),
                                  [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def test_tied_embeddings_and_bad_tokens():
    model = build_model(cfg("tiny_ne", "model.tie_embeddings=true"), nnx.Rngs(0))
    assert model.lm_head is None
    assert model(np.ones((1, 3), np.int32)).shape == (1, 3, 4096)
    with pytest.raises(ValueError, match=r"outside \[0, 4096\)"):
        model(np.array([[1, 4096]]))


@pytest.mark.slow  # CI time: make test-all runs it
def test_moe_aux_loss_and_gradients():
    model = build_model(cfg("tiny_ne", "model.moe.load_balance_loss_weight=0.01"), nnx.Rngs(0))
    t = np.random.default_rng(3).integers(1, 4096, (2, 8))
    grads = nnx.grad(lambda m: jnp.mean(m(t) ** 2) + m.aux_loss())(model)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert float(model.aux_loss()) > 0
    assert float(jnp.abs(grads["blocks"][0]["moe"]["router"][...]).sum()) > 0


# ----------------------------------------------------------------------------------------------
# Parameter budget


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_abstract_budget_equals_closed_form(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        c = load_config(path)
    assert parameter_budget(c) == closed_form_budget(c.model)


@pytest.mark.parametrize("name", TINY)
def test_budget_total_equals_materialised_count(name):
    model = build_model(cfg(name), nnx.Rngs(0))
    assert parameter_budget(cfg(name))["total"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_longcat_flash_lite_parameter_budget():
    b = parameter_budget(cfg("longcat_flash_lite"))
    assert abs(b["total"] / 68.5e9 - 1) < 0.005
    assert abs(b["ngram"] / 31.4e9 - 1) < 0.005
    assert 2.85e9 < b["activated_min"] < 2.95e9 and 4.45e9 < b["activated_max"] < 4.55e9


def activated_from_shapes(c) -> int:
    """Activated parameters per token of a model without N-gram or per-layer tables, counted from the shapes
    of its parameters: every weight, one row of the token table, top_k of the E stacked experts."""
    m = c.model
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: build_model(m, nnx.Rngs(0)))
    total = 0
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names, size = tuple(map(str, path)), int(np.prod(var.shape))
        assert "ngram" not in "/".join(names) and names[0] != "ple"
        if names == ("embed", "embedding"):
            size = var.shape[1]  # the row of the token read
        elif "moe" in names and names[-1] != "router":
            assert var.shape[0] == m.moe.num_experts
            size = size // m.moe.num_experts * m.moe.top_k
        total += size
    return total


@pytest.mark.parametrize("name", ["tiny_ne", "tiny_plne", "longcat_flash_lite"])
def test_moe_baseline_matches_total_and_activated(name):
    c = cfg(name)
    assert c.model.moe.num_experts > 0  # a MoE baseline adds experts to an MoE backbone
    base = moe_baseline(c)
    b_ne, b_moe = parameter_budget(c), parameter_budget(base)
    one_expert = c.model.num_blocks * (3 * c.model.d_model * c.model.moe.expert_dim + c.model.d_model)
    assert abs(b_ne["total"] - b_moe["total"]) <= one_expert
    assert not base.model.ngram.enabled and base.model.moe.top_k == c.model.moe.top_k
    assert base.model.moe.num_experts > c.model.moe.num_experts
    # same activated expert parameters, in closed form: per block top_k experts (max) or only the top_k - Z
    # that zero experts cannot take (min), each 3 * D * F_e
    e, nb, d = c.model.moe, c.model.num_blocks, c.model.d_model
    expert_span = nb * (e.top_k - max(0, e.top_k - e.num_zero_experts)) * 3 * d * e.expert_dim
    assert expert_span > 0
    for b in (b_ne, b_moe):
        assert b["activated_max"] - b["activated_min"] == expert_span
    # the baseline's activated count from its real parameter shapes (no N-gram or per-layer tables there)
    if base.model.ple.kind == "none" and not base.model.tie_embeddings:
        assert b_moe["activated_max"] == activated_from_shapes(base)
    # ... and the activated counts differ exactly by the NE projections and rows read, less the new router columns
    m, t = c.model, None
    ne_only = 0
    if m.ngram.enabled:
        t = m.ngram.splits * (m.ngram.max_n - 1)
        ne_only += t * (m.d_model // t) * (m.d_model + 1)
    if m.ple.kind == "plne":
        t = m.ple.splits * (m.ple.max_n - 1)
        ne_only += 2 * m.num_blocks * t * (m.ffn_dim // t) * (m.ffn_dim + 1)
    extra_router = m.num_blocks * m.d_model * (base.model.moe.num_experts - m.moe.num_experts)
    assert b_ne["activated_max"] - b_moe["activated_max"] == ne_only - extra_router


def test_tiny_moe_is_the_baseline_of_tiny_ne():
    assert moe_baseline(cfg("tiny_ne")).model.moe.num_experts == cfg("tiny_moe").model.moe.num_experts


def test_moe_baseline_needs_experts_and_ngrams():
    with pytest.raises(ConfigError, match="needs an MoE model"):
        moe_baseline(cfg("tiny_ne", "model.moe.num_experts=0", "model.moe.num_zero_experts=0"))
    with pytest.raises(ConfigError, match="N-gram parameters"):
        moe_baseline(cfg("tiny_plain"))


@pytest.mark.parametrize("head", ["ngram", "mtp"])
def test_draft_head_width(head):
    """model.draft_head_ffn_dim sets the width of either head's SwiGLU (0: model.ffn_dim); both budgets follow."""
    for width, expect in ((0, 256), (48, 48)):
        c = cfg("tiny_ne", f"model.draft_head={head}", f"model.draft_head_ffn_dim={width}")
        model = nnx.eval_shape(lambda c=c: build_model(c, nnx.Rngs(0)))
        ffn = model.draft_head.mlp if head == "ngram" else model.draft_head.ffn
        assert c.model.ffn_dim == 256
        assert ffn.gate.kernel.shape == (128, expect) and ffn.down.kernel.shape == (expect, 128)
        assert parameter_budget(c) == closed_form_budget(c.model)
    wide, narrow = (closed_form_budget(cfg("tiny_ne", f"model.draft_head={head}",
                                           f"model.draft_head_ffn_dim={w}").model) for w in (0, 48))
    assert wide["draft"] - narrow["draft"] == 3 * 128 * (256 - 48)
    assert {k: v for k, v in wide.items() if k != "draft" and "total" not in k} == \
        {k: v for k, v in narrow.items() if k != "draft" and "total" not in k}


def test_budgets_agree_with_layernorm_amplification_and_ple():
    """The closed form and the abstract count agree on every category, activated counts included,
    for the combinations no shipped config uses (amplification layernorm, tied head, plain PLE)."""
    for overrides in (["model.embedding.amplification=layernorm"],
                      ["model.embedding.amplification=layernorm", "model.tie_embeddings=true", "model.ple.kind=ple"]):
        c = cfg("tiny_ne", *overrides)
        assert parameter_budget(c) == closed_form_budget(c.model)


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_ne"])
def test_every_input_embedding_is_amplified_alike_and_starts_at_init_std(name):
    """model.embedding applies to the plain token embedding and to NE alike: sqrt_d is sqrt(D) times none,
    layernorm normalises every token, and the output (before amplification) starts with std init_std
    whichever embedding it is (NE's tables start sqrt(1 + T) wider to undo its mean of 1 + T terms)."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(2, 4096, (8, 128)), jnp.int32)
    out = {}
    with nnx.use_eager_sharding(False):
        for amp in ("none", "sqrt_d", "layernorm"):
            model = build_model(cfg(name, f"model.embedding.amplification={amp}", "model.embedding.init_std=0.5"),
                                nnx.Rngs(0))
            out[amp] = np.asarray(model.embed(tokens), np.float64)  # [B, S, D]
    d = out["none"].shape[-1]
    assert out["none"].std() == pytest.approx(0.5, rel=0.05)
    np.testing.assert_allclose(out["sqrt_d"], out["none"] * np.sqrt(d), rtol=1e-5)
    np.testing.assert_allclose(out["layernorm"].mean(-1), 0.0, atol=1e-4)
    np.testing.assert_allclose(out["layernorm"].std(-1), 1.0, rtol=1e-2)
    assert parameter_budget(cfg(name, "model.embedding.amplification=layernorm"))["embedding"] == \
        parameter_budget(cfg(name))["embedding"] + 2 * d


@pytest.mark.parametrize("name", ["tiny_moe", "tiny_ne", "tiny_plne"])
def test_transformer_counts_leave_out_the_vocabulary_matrices(name):
    """The paper's counting: the transformer's total holds every weight but the token table and the LM head
    (N-gram tables stay: sparse parameters), its activated count the dense weights, the router, the N-gram
    projections and top_k experts per block (no table rows, no LM head)."""
    c = cfg(name)
    m = c.model
    b = parameter_budget(c)
    ne_proj = 0
    if m.ngram.enabled:
        ne_proj = int(np.prod(build_model(m, nnx.Rngs(0)).embed.ngram_proj.shape))
    if m.ple.kind == "plne":
        ne_proj = int(np.prod(build_model(m, nnx.Rngs(0)).ple.ngram_proj.shape))
    experts_active = m.num_blocks * min(m.moe.top_k, m.moe.num_experts) * 3 * m.d_model * m.moe.expert_dim
    assert b["transformer_total"] == b["dense"] + b["router"] + b["experts"] + b["ngram"] + b["ple"]
    assert b["transformer_activated"] == b["dense"] + b["router"] + experts_active + ne_proj
