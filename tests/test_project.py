"""Project hygiene that CI relies on: no test can hang the run."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_has_a_timeout(pytestconfig):
    assert pytestconfig.pluginmanager.hasplugin("timeout"), "pytest-timeout is not installed (pip install -e .[test])"
    timeout = float(pytestconfig.getini("timeout") or 0)
    assert 0 < timeout <= 900, timeout
    assert pytestconfig.getini("timeout_method") == "thread"  # also fires inside C++ waits (XLA, Pallas interpret)
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(r.startswith("pytest-timeout") for r in meta["project"]["optional-dependencies"]["test"])
