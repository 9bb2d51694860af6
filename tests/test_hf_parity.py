"""Parity with the real peer: transformers' LongcatFlashForCausalLM (PyTorch, CPU, float32)."""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from ngram_jax.config import ConfigError, load_config
from ngram_jax.convert.hf import config_from_hf, load_hf_checkpoint, save_hf_checkpoint
from ngram_jax.errors import CheckpointError
from ngram_jax.model import build_model

torch = pytest.importorskip("torch", reason="parity extra not installed: pip install -e '.[parity]'")
transformers = pytest.importorskip("transformers", reason="parity extra not installed: pip install -e '.[parity]'")

V = 160


def tiny_hf_config(**kw):
    args = dict(vocab_size=V, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=96,
                q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, head_dim=8,
                v_head_dim=16, n_routed_experts=4, zero_expert_num=2, moe_topk=2, expert_ffn_hidden_size=32,
                routed_scaling_factor=2.0, rms_norm_eps=1e-5, eos_token_id=3, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    args.update(kw)
    return transformers.LongcatFlashConfig(**args)


def random_torch_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = transformers.LongcatFlashForCausalLM(cfg).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)
        for layer in model.model.layers:  # a non-zero selection bias, to check it is read
            layer.mlp.router.e_score_correction_bias.copy_(0.05 * torch.randn(cfg.n_routed_experts + 2))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = {}
    for name, kw in {"default": {}, "yarn": dict(rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})}.items():
        cfg = tiny_hf_config(**kw)
        model = random_torch_model(cfg)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (model, path)
    return out


@pytest.mark.parametrize("variant", ["default", "yarn"])
def test_logits_match_transformers(saved, variant):
    torch_model, path = saved[variant]
    ours, cfg = load_hf_checkpoint(path)
    tokens = np.random.default_rng(0).integers(0, V, (2, 24))
    with torch.no_grad():
        want = torch_model(torch.as_tensor(tokens)).logits.numpy()
    got = np.asarray(nnx.jit(lambda m, t: m(t))(ours, tokens))
    assert np.abs(got - want).max() <= 1e-4, np.abs(got - want).max()
    if variant == "yarn":
        assert cfg.model.attention.yarn_factor == 4.0


def test_round_trip_gives_identical_parameters(saved, tmp_path):
    _, path = saved["default"]
    model, cfg = load_hf_checkpoint(path)
    save_hf_checkpoint(model, cfg, tmp_path / "rt")
    again, cfg2 = load_hf_checkpoint(tmp_path / "rt")
    assert cfg2.model == cfg.model
    a, b = nnx.state(model), nnx.state(again)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # and transformers reads our export
    reloaded = transformers.LongcatFlashForCausalLM.from_pretrained(tmp_path / "rt").eval().float()
    tokens = np.random.default_rng(1).integers(0, V, (1, 9))
    with torch.no_grad():
        want = reloaded(torch.as_tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model(tokens)) - want).max() <= 1e-4


def test_ngram_checkpoint_round_trip(tmp_path):
    """LongCat-Flash-Lite names: embedders.{i} and post_projs.{i}; same logits after save -> load."""
    cfg = load_config("configs/models/tiny_ne.yaml", ["model.embedding.amplification=none", "model.vocab_size=512",
                                                      "model.ngram.ratio=1.37"])
    model = build_model(cfg, nnx.Rngs(3))
    save_hf_checkpoint(model, cfg, tmp_path)
    hf = json.loads((tmp_path / "config.json").read_text())
    assert (hf["emb_neighbor_num"], hf["emb_split_num"], hf["ngram_vocab_size_ratio"]) == (3, 2, 1.37)
    from safetensors import safe_open

    with safe_open(tmp_path / "model.safetensors", framework="numpy") as st:
        names = set(st.keys())
        t = cfg.model.ngram.splits * (cfg.model.ngram.max_n - 1)
        assert {f"model.ngram_embeddings.embedders.{i}.weight" for i in range(t)} <= names
        assert st.get_tensor("model.ngram_embeddings.post_projs.0.weight").shape == (128, 128 // t)
        assert st.get_tensor("model.ngram_embeddings.embedders.1.weight").shape[0] == model.embed.layout.table_sizes[1]
    loaded, cfg2 = load_hf_checkpoint(tmp_path, row_multiple=cfg.model.ngram.row_multiple)
    tokens = np.random.default_rng(2).integers(0, 512, (2, 10))
    np.testing.assert_array_equal(np.asarray(loaded(tokens)), np.asarray(model(tokens)))
    assert cfg2.model.ngram == cfg.model.ngram
    real_rows = model.embed.layout.total_rows  # padding rows come back as zeros
    np.testing.assert_array_equal(np.asarray(loaded.embed.ngram_table[...])[:real_rows],
                                  np.asarray(model.embed.ngram_table[...])[:real_rows])
    assert not np.asarray(loaded.embed.ngram_table[...])[real_rows:].any()
    unpadded, cfg3 = load_hf_checkpoint(tmp_path)  # the file format itself has no padding rows
    assert cfg3.model.ngram.row_multiple == 1
    assert unpadded.embed.ngram_table.shape[0] == model.embed.layout.total_rows
    np.testing.assert_array_equal(np.asarray(unpadded(tokens)), np.asarray(model(tokens)))


def test_export_refuses_what_the_format_cannot_hold(tmp_path):
    cfg = load_config("configs/models/tiny_plne.yaml")
    with pytest.raises(ConfigError, match="per-layer embeddings"):
        save_hf_checkpoint(build_model(cfg, nnx.Rngs(0)), cfg, tmp_path)
    assert config_from_hf(tiny_hf_config().to_dict()).model.moe.num_zero_experts == 2


def test_missing_tensor_is_a_clear_error(saved, tmp_path):
    _, path = saved["default"]
    from safetensors.numpy import load_file, save_file

    tensors = load_file(next(path.glob("*.safetensors")))
    del tensors["model.norm.weight"]
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.norm.weight missing"):
        load_hf_checkpoint(tmp_path)
