"""Typed config: loading, inheritance, overrides, and errors that name the key and the fix."""

import dataclasses
import warnings
from pathlib import Path

import pytest

from ngram_jax.budget import check_config, closed_form_budget
from ngram_jax.config import (
    Config,
    ConfigError,
    ConfigWarning,
    EmbeddingConfig,
    from_dict,
    load_config,
    replace,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


# configs/paper/*.yaml are sweep files, not configs: tests/test_study.py expands and validates every run of them
@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "paper"),
                         ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        cfg = load_config(path)
    assert isinstance(cfg, Config)
    b = closed_form_budget(cfg.model)
    assert b["total"] > 0 and b["activated_min"] <= b["activated_max"] <= b["total"]


def test_tiny_configs_follow_the_papers_rules():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for name in ("tiny_ne", "tiny_plne", "tiny_plain"):
            load_config(CONFIGS / "models" / f"{name}.yaml")


@pytest.mark.parametrize("target, draft", [("spec_target", "draft_tiny"), ("spec_target_large", "draft_tiny"),
                                           ("spec_target_large", "draft_small"),
                                           ("spec_target_large_narrow", "draft_tiny")])
def test_speculative_pairs_share_the_vocabulary_and_keep_the_size_ratio(target, draft):
    """benchmarks/speculative.py's pairs (issue 12: a target of at least 10x the draft's activated parameters)."""
    t, d = (load_config(CONFIGS / f"{n}.yaml") for n in (target, draft))
    assert (t.model.vocab_size, t.data.path) == (d.model.vocab_size, d.data.path)
    assert d.model.ngram.enabled is False  # the paper's draft: a plain token embedding
    assert closed_form_budget(t.model)["activated_min"] >= 10 * closed_form_budget(d.model)["activated_max"]


def test_inheritance_and_overrides(tmp_path):
    write(tmp_path, "parent.yaml", "model:\n  d_model: 96\n  ngram:\n    enabled: true\n    max_n: 4\n    splits: 1\n")
    child = write(tmp_path, "child.yaml", "base: parent.yaml\nname: child\nmodel:\n  ngram:\n    ratio: 1.37\n")
    cfg = load_config(child, overrides=["model.ngram.max_n=3", "model.ngram.splits=3", "seed=7"])
    assert cfg.name == "child" and cfg.seed == 7
    assert cfg.model.d_model == 96  # from the parent
    assert (cfg.model.ngram.max_n, cfg.model.ngram.splits, cfg.model.ngram.ratio) == (3, 3, 1.37)
    assert cfg.model.ngram.enabled
    assert cfg.model.vocab_size == 4096  # dataclass default


def test_frozen_and_round_trip():
    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d_model = 3  # type: ignore[misc]
    assert from_dict(to_dict(cfg)) == cfg
    assert replace(cfg, **{"model.ngram.max_n": 5}).model.ngram.max_n == 5
    assert hash(cfg) == hash(from_dict(to_dict(cfg)))


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.ngram.maxn=4"], r"unknown key model\.ngram\.maxn; valid keys of model\.ngram: .*max_n"),
        (["modle.d_model=4"], r"unknown key modle; valid keys of config: .*model"),
        (["model.d_model=abc"], r"model\.d_model: expected an integer, got 'abc'"),
        (["model.d_model=1.5"], r"model\.d_model: expected an integer"),
        (["model.ngram.enabled=3"], r"model\.ngram\.enabled: expected true or false"),
        (["model.embedding.amplification=cube"], r"model\.embedding\.amplification: 'cube' is not one of 'none'"),
        (["model.ngram.max_n=1"], r"model\.ngram\.max_n: N must be >= 2"),
        (["model.ngram.splits=0"], r"model\.ngram\.splits: K must be >= 1"),
        (["model.ngram.ratio=0"], r"model\.ngram\.ratio: .* must be > 0"),
        (["model.ngram.ratio=-2"], r"model\.ngram\.ratio: .* must be > 0"),
        (["model.ngram.max_n=4", "model.ngram.splits=3"],
         r"model\.ngram: model\.d_model=128 must be divisible by K\*\(N-1\) = 3\*\(4-1\) = 9; valid .*: 1, 2, 4"),
        (["model.eos_id=4096"], r"model\.eos_id=4096 must be in \[0, vocab_size=4096\) or null"),
        (["model.ple.kind=plne", "model.ple.max_n=4", "model.ple.splits=5"],
         r"model\.ple: model\.ffn_dim=256 must be divisible by K\*\(N-1\) = 5\*\(4-1\) = 15"),
        (["model.moe.num_experts=4", "model.moe.top_k=9"], r"model\.moe\.top_k=9 must be in \[1, .* = 8\]"),
        (["model.moe.real_experts_per_token=3"], r"model\.moe\.real_experts_per_token=3\.0 must be in \(0, top_k=2\]"),
        (["model.moe.real_experts_per_token=0"], r"model\.moe\.real_experts_per_token=0\.0 must be in \(0, top_k"),
        (["model.moe.num_zero_experts=0", "model.moe.real_experts_per_token=1.5"],
         r"model\.moe\.real_experts_per_token=1\.5 must equal top_k=2 without zero experts"),
        (["model.moe.real_experts_per_token=many"], r"model\.moe\.real_experts_per_token: expected a number"),
        (["model.moe.bias_update_rate=-1"], r"model\.moe\.bias_update_rate must be >= 0"),
        (["model.moe.grouped_matmul=megablocks"],
         r"model\.moe\.grouped_matmul: 'megablocks' is not one of 'auto', 'megablox', 'ragged_dot', 'tiled'"),
        (["model.moe.grouped_matmul_tile=0"], r"model\.moe\.grouped_matmul_tile must be >= 1 .*got 0"),
        (["model.attention.kind=gqa", "model.attention.num_kv_heads=3"], r"num_kv_heads=3 must divide"),
        (["model"], r"must look like key\.path=value"),
        (["model.ngram.enabled=false", "model.draft_head=ngram"],
         r"model\.draft_head=ngram drafts from the N-gram Embedding: set model\.ngram\.enabled=true"),
        (["model.draft_head=eagle"], r"model\.draft_head: 'eagle' is not one of 'none', 'ngram', 'mtp'"),
        (["train.freeze_target=true"], r"train\.freeze_target=true trains only the draft head, and the model has "
         r"none: set model\.draft_head=mtp"),
        (["model.draft_head=mtp", "train.freeze_target=true", "train.draft_head_weight=0"],
         r"train\.freeze_target=true trains only the draft head's loss: set train\.draft_head_weight > 0"),
        (["train.draft_head_weight=-1"], r"train\.draft_head_weight must be >= 0"),
        (["model.draft_head_ffn_dim=-1"], r"model\.draft_head_ffn_dim must be >= 0 \(0: model\.ffn_dim\)"),
    ],
)
def test_bad_values_name_the_key(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=overrides)


def test_exponent_floats_without_a_dot():
    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=["train.lr=1e-3", "train.eps=1E-9"])
    assert cfg.train.lr == 1e-3 and cfg.train.eps == 1e-9
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=["train.lr=fast"])


def test_eos_may_be_null():
    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=["model.eos_id=null"])
    assert cfg.model.eos_id is None


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "list.yaml", "- 1\n- 2\n"))


@pytest.mark.parametrize("overrides, pattern", [
    (["model.ngram.ratio=600000"], r"model\.ngram: .*exceeds 2\^31 - 1"),
    (["model.ple.kind=plne", "model.ple.ratio=600000.37"], r"model\.ple: .*exceeds 2\^31 - 1"),
    (["model.ngram.ratio=260000.37", "model.ngram.max_n=5", "model.ngram.splits=2"],
     r"model\.ngram: flattened table has \d+ rows, more than int32 row ids"),
])
def test_table_limits_name_the_key(overrides, pattern):
    """Checked where the table layout lives (budget.check_config, run by training and the plan tool)."""
    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=overrides)
    with pytest.raises(ConfigError, match=pattern):
        check_config(cfg)


def test_warns_when_ngram_exceeds_half_the_budget():
    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=["model.ngram.ratio=8.37"])
    with pytest.warns(ConfigWarning, match=r"N-gram embeddings hold [5-9]\d\.\d% of all parameters"):
        assert check_config(cfg) is cfg
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        check_config(load_config(CONFIGS / "models" / "tiny_ne.yaml"))  # the shipped tiny NE: below half


def test_config_imports_nothing_from_the_package():
    import ast

    tree = ast.parse((Path(__file__).resolve().parent.parent / "ngram_jax" / "config.py").read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) if n.level == 0]
    assert not [n for n in names if n.split(".")[0] == "ngram_jax"], names
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]


@pytest.mark.parametrize("ratio, warns", [(2.0, True), (2.5, True), (2.333, True), (2.37, False), (2.73, False)])
def test_warns_on_simple_fraction_ratio(ratio, warns):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_config(CONFIGS / "models" / "tiny_ne.yaml", overrides=[f"model.ngram.ratio={ratio}"])
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert any("simple fraction" in m for m in msgs) == warns, msgs


def test_longcat_flash_lite_budget():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)  # the released r = 78 is an integer ratio
        cfg = load_config(CONFIGS / "models" / "longcat_flash_lite.yaml")
    b = closed_form_budget(cfg.model)
    assert abs(b["total"] / 68.5e9 - 1) < 0.005
    assert abs(b["ngram"] / 31.4e9 - 1) < 0.005
    # tables 31.41B + projections 9.4M (the paper, section 3)
    assert sum(78 * 131072 + 2 * i + 1 for i in range(12)) * 256 == 31_406_985_216
    padding = 3952 * 256  # model.ngram.row_multiple: 4096 rounds 122,683,536 rows up to 122,687,488
    assert b["ngram"] - 31_406_985_216 == 12 * 256 * 3072 + padding
    assert 2.85e9 < b["activated_min"] < 2.95e9  # "2.9B" when zero experts take all slots
    assert 4.45e9 < b["activated_max"] < 4.55e9  # "4.5B" when all 12 slots are real experts


def test_default_eos_is_not_the_zero_fill():
    """The tiny configs' EOS is the trained BPE's <|endoftext|> (1), not 0, the value histories and padding
    are filled with, so that a bug confusing the two shows."""
    from ngram_jax.data.tokenizer import EOS_TOKEN, PAD_TOKEN, TRAINED_EOS_ID, eos_id, train_bpe

    tok = train_bpe(["to be or not to be"] * 10, 300)
    assert eos_id(tok) == tok.token_to_id(EOS_TOKEN) == TRAINED_EOS_ID == 1 and tok.token_to_id(PAD_TOKEN) == 0
    for name in ("tiny_ne", "tiny_moe", "tiny_plne", "tiny_gqa", "tiny_dense", "tiny_plain"):
        assert load_config(CONFIGS / "models" / f"{name}.yaml").model.eos_id == TRAINED_EOS_ID


def test_a_key_added_after_a_checkpoint_counts_as_its_default():
    """Resuming a run saved before a config key existed (e.g. train.freeze_target) is not a config change
    while the key keeps its default; another value is."""
    from ngram_jax.checkpoint import config_differences

    cfg = load_config(CONFIGS / "models" / "tiny_ne.yaml")
    saved = to_dict(cfg)
    del saved["train"]["freeze_target"]
    assert config_differences(saved, cfg) == []
    frozen = replace(cfg, **{"model.draft_head": "mtp", "train.freeze_target": True})
    saved_mtp = to_dict(frozen)
    del saved_mtp["train"]["freeze_target"]
    assert config_differences(saved_mtp, frozen) == ["train.freeze_target: checkpoint False -> requested True"]


def _old_style(cfg: Config, amplification, init_std) -> dict:
    """A config saved before model.embedding existed: amplification and init std under model.ngram."""
    saved = to_dict(cfg)
    del saved["model"]["embedding"]
    saved["model"]["ngram"].update(amplification=amplification, init_std=init_std)
    return saved


def test_old_ngram_amplification_and_init_keep_loading_as_the_same_model(tmp_path):
    """model.ngram.amplification / init_std moved to model.embedding: an old NE config reads as the same model
    (the amplification as it was, the old table std s as the output std s / sqrt(1 + T) it gave); without NE
    they had no effect and are dropped; a file that sets both an old and a new key differently is an error."""
    from ngram_jax.checkpoint import config_differences

    ne = load_config(CONFIGS / "models" / "tiny_ne.yaml")
    t = ne.model.ngram.splits * (ne.model.ngram.max_n - 1)
    saved = _old_style(ne, "layernorm", 0.5)
    migrated = from_dict(saved)  # a checkpoint's saved config: silently
    assert migrated.model.embedding.amplification == "layernorm"
    assert migrated.model.embedding.init_std == pytest.approx(0.5 / (1 + t) ** 0.5)
    want = replace(ne, **{"model.embedding.amplification": "layernorm",
                          "model.embedding.init_std": 0.5 / (1 + t) ** 0.5})
    assert config_differences(saved, want) == []
    plain = replace(ne, **{"model.ngram.enabled": False})
    assert from_dict(_old_style(plain, "sqrt_d", 0.5)).model.embedding == EmbeddingConfig()  # they had no effect
    f = write(tmp_path, "old.yaml", "base: %s\nmodel:\n  ngram: {enabled: true, ratio: 2.37, amplification: sqrt_d}\n"
              % (CONFIGS / "base.yaml"))
    with pytest.warns(ConfigWarning, match=r"model\.ngram\.amplification is model\.embedding\.amplification now"):
        assert load_config(f).model.embedding.amplification == "sqrt_d"
    with pytest.raises(ConfigError, match=r"moved to model\.embedding\.amplification.*keep only"):
        load_config(f, ["model.embedding.amplification=layernorm"])
