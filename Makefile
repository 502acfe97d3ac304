# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
# pytest-xdist workers of `make test`: the long integration tests mostly wait on Flower (heartbeats,
# restarts; tests/conftest.py runs them first), so they overlap (3 workers measured no faster on 2 cores)
TEST_WORKERS ?= 2

.PHONY: install demo test test-unit test-integration bench bench-missing bench-ssl bench-cls bench-federation bench-post bench-privacy bench-imputer clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev]'
	@# pip byte-compiles the installed packages one file at a time (about half of the install time on 2
	@# cores); compileall does it on every core. A few files of the packages are for other Python
	@# versions and do not compile (pip skips them too), hence the log instead of a failure. The
	@# project's own modules are compiled as well: with PYTHONDONTWRITEBYTECODE set, every process
	@# (each Flower ClientApp) would compile them again.
	$(BIN)/python -m compileall -q -j 0 $(VENV)/lib client common deploy fedglioma server synth >$(VENV)/compileall.log 2>&1 || true
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedglioma demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -n $(TEST_WORKERS) $(ARGS)

test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit $(ARGS)

test-integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration $(ARGS)

bench: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_model.py $(ARGS)

bench-missing: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_missing.py $(ARGS)

bench-ssl: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_ssl.py $(ARGS)

bench-cls: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_cls.py $(ARGS)

bench-post: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_postprocess.py $(ARGS)

bench-federation: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_federation.py $(ARGS)

bench-privacy: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_privacy.py $(ARGS)

bench-imputer: $(STAMP)
	$(BIN)/python tests/benchmarks/bench_imputer.py $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
