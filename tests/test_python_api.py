"""The Python API on one device with no mesh: the examples of docs/API.md run as written, and a model
builds, saves, restores and runs without ``param_context`` or a mesh.

Each check runs in a fresh interpreter with one CPU device, outside conftest's autouse fixture that
turns eager sharding off: what a user's script sees."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_python(section: str, page: str = "docs/API.md") -> str:
    """The ```python blocks of the section titled ``section`` of a documentation page."""
    text = (ROOT / page).read_text() + "\n## "
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, f"{page} has no section {section!r}"
    blocks = re.findall(r"^```python\n(.*?)^```", match.group(1), re.S | re.M)
    assert blocks, f"{page} section {section!r} has no python block"
    return "\n".join(blocks)


def run_fresh(code: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_readme_examples_run_without_a_mesh():
    model_code = readme_python("Build a model, count its parameters, compare with MoE")
    ne_code = readme_python("Build an NE layer")
    for code in (model_code, ne_code):
        assert "param_context" not in code and "set_mesh" not in code
    out = run_fresh(model_code + textwrap.dedent("""
        import jax
        assert jax.device_count() == 1 and jax.sharding.get_abstract_mesh().empty
        assert logits.shape == (2, 16, 4096), logits.shape
        assert baseline.model.moe.num_experts > cfg.model.moe.num_experts
        print("model ok")
    """) + ne_code + textwrap.dedent("""
        assert e.shape == (1, 5, cfg.model.d_model) and rows.shape == (1, 5, 4)
        print("ne ok")
    """))
    assert "model ok" in out and "ne ok" in out


@pytest.mark.slow  # CI time: make test-all runs it
def test_build_save_restore_run_without_a_mesh(tmp_path):
    out = run_fresh(textwrap.dedent(f"""
        import grain, jax, numpy as np
        from flax import nnx
        from ngram_jax.checkpoint import Checkpointer, restore_model
        from ngram_jax.config import load_config, to_dict
        from ngram_jax.model import build_model
        from ngram_jax.train.state import build_train_state

        cfg = load_config("configs/models/tiny_ne.yaml", ["model.moe.num_experts=4", "model.moe.num_zero_experts=2"])
        tokens = np.random.default_rng(0).integers(0, 4096, (2, 16))
        built = build_model(cfg, nnx.Rngs(0))                   # no param_context, no mesh
        assert np.isfinite(built(tokens)).all()
        model, opt = build_train_state(cfg)
        ckpt = Checkpointer({str(tmp_path / "run" / "checkpoints")!r})
        ckpt.save(3, {{"model": nnx.to_pure_dict(nnx.state(model)), "opt": nnx.to_pure_dict(nnx.state(opt))}},
                  iter(grain.MapDataset.range(4).to_iter_dataset()), {{"config": to_dict(cfg), "step": 3}})
        ckpt.close()
        restored, rcfg = restore_model({str(tmp_path / "run")!r})
        assert rcfg == cfg
        np.testing.assert_array_equal(restored(tokens), model(tokens))
        print("restore ok")
    """))
    assert "restore ok" in out
