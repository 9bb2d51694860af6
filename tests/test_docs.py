"""Every command shown in the README and the docs pages runs as written: the short ones are run here; every
one of the project's modules and scripts parses with its own argument parser; the long ones (training,
evaluation of a run, sweeps, pod compiles) are also checked for what can go stale: the script
or module exists, the files they name exist, and their configs and overrides load."""

import json
import os
import re
import shlex
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from ngram_jax.config import load_config

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# run for real (each a few seconds): tools that only read configs or make small computations
SHORT = (r"-m ngram_jax\.study \S+ --list$", r"-m ngram_jax\.tools\.collisions --zipf ", r"^python -c ",
         r"-m ngram_jax\.tools\.plan (?!.*--(measure|topology))", r"-m ngram_jax\.tools\.aot configs/train_tiny\.yaml")
SKIP = ("pip ", "make ", "gcloud ", "for ", "cd ", "export ")  # installs, make targets (CI runs them), loops


def commands() -> list[tuple[str, str]]:
    """(page, command) for every command line of every ```bash block (continuations joined, comments cut)."""
    out = []
    for page in PAGES:
        for block in re.findall(r"^```bash\n(.*?)^```", page.read_text(), re.S | re.M):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    out.append((page.name, line))
    return out


def argv_of(command: str) -> list[str] | None:
    """The python argv of a command (``.venv/bin/python`` / ``python`` / ``JAX...=x python``), or None."""
    if command.startswith(SKIP) or ";" in command or "&" in command:
        return None
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    if not words or not re.match(r"^(\.venv/bin/)?python3?$", words[0]):
        return None
    return words[1:]


def test_the_pages_show_commands():
    """Every command is a python command (checked below) or an install, make target or shell loop."""
    cmds = commands()
    assert len(cmds) > 40 and {p for p, _ in cmds} >= {"README.md", "TPU.md", "TRAINING.md", "KERNELS.md"}
    others = [c for _, c in cmds if argv_of(c) is None]
    assert all(c.startswith(SKIP) or c.startswith("done") or "python" in c for c in others), others
    makefile = (ROOT / "Makefile").read_text()
    for c in others:
        if c.startswith("make "):
            assert re.search(rf"^{re.escape(c.split()[1])}:", makefile, re.M), c


PYTHON = [(p, c) for p, c in commands() if argv_of(c) is not None]


@pytest.mark.parametrize("page,command", PYTHON, ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_documented_command_is_current(page, command):
    argv = argv_of(command)
    if argv[0] == "-c":
        return
    if argv[0] == "-m":
        assert find_spec(argv[1]) is not None, f"{page}: no module {argv[1]}"
        rest = argv[2:]
    else:
        assert (ROOT / argv[0]).is_file(), f"{page}: no script {argv[0]}"
        rest = argv[1:]
    for word in rest:  # every file of the repository a command names exists
        if re.match(r"^(configs|benchmarks|docs)/\S+\.(yaml|py|md|jsonl)$", word):
            assert (ROOT / word).exists(), f"{page}: {word} does not exist ({command})"
    configs = [w for w in rest if w.endswith(".yaml") and w.startswith("configs/") and "/paper/" not in w]
    if configs:  # a model config and its key=value overrides load (validated keys and values)
        overrides = [w for w in rest[rest.index(configs[0]) + 1:] if "=" in w and not w.startswith("-")
                     and not re.match(r"^[a-z_]+=[\w.:/-]+,", w)]
        load_config(ROOT / configs[0], [o for o in overrides if "." in o.split("=")[0]])


def parsed_argv(argv: list[str]) -> list[str] | None:
    """The argv a documented command gives its own parser ([--opt X] shown as optional: given), or None for
    what has no parser of the project's (``-c``, ``train.py``'s config and overrides, checked above, pytest)."""
    if argv[0] == "-c" or argv[0] == "train.py" or (argv[0] == "-m" and not argv[1].startswith("ngram_jax")):
        return None
    return [w.strip("[]") for w in argv if w.strip("[]")]


def test_documented_commands_parse_with_their_own_parsers():
    """Every command of the project's modules and scripts shown in the pages parses with that module's own
    argparse parser (tests/parse_commands.py stops each right after parsing): a renamed or removed flag, a
    choice or type no longer accepted, fails here."""
    argvs = [a for _, c in PYTHON if (a := parsed_argv(argv_of(c))) is not None]
    assert len(argvs) > 30
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu",
                                                                         "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, str(ROOT / "tests/parse_commands.py")], input=json.dumps(argvs), cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["argv"] for r in results] == argvs, p.stderr[-3000:]
    failed = [f"{' '.join(r['argv'])}: {r['error']}" for r in results if r["error"]]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("page,command", [(p, c) for p, c in PYTHON if any(re.search(s, c) for s in SHORT)],
                         ids=lambda v: v[:60] if isinstance(v, str) else v)
def test_short_documented_commands_run(page, command):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu",
                                                                         "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, *argv_of(command)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"{page}: {command}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"


def test_tpu_page_tables_are_the_recorded_compiles():
    """docs/TPU.md's tables are ``benchmarks/tpu_aot.py --table`` of docs/tpu/aot_results.jsonl, as written by
    ``--table --doc docs/TPU.md``: a result recorded or a table format changed without the page is stale."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("tpu_aot", ROOT / "benchmarks/tpu_aot.py")
    tpu_aot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tpu_aot)
    records = [json.loads(x) for x in (ROOT / "docs/tpu/aot_results.jsonl").read_text().splitlines()]
    page = (ROOT / "docs/TPU.md").read_text()
    assert tpu_aot.into_doc(page, tpu_aot.blocks(records)) == page, (
        "run: python benchmarks/tpu_aot.py --table --doc docs/TPU.md")
    assert {r["case"] for r in records} <= set(tpu_aot.CASES)
