# Two commands do all setup on a fresh machine:  `make bench` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what it needs (torch 2.13.0 CPU wheel and triton 3.8.0 from local disk here).
#
# `make test` = the whole CI: pytest, then every extra check in scripts/ci/*.sh in name order (each is one file, so
# adding a check never edits this Makefile). `make test ARGS="-k maxsim"` passes ARGS to pytest and skips the extra
# checks; `make pytest` runs pytest alone; `make checks` runs the extra checks alone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reatt-installed
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
SOURCES := pyproject.toml setup.py CMakeLists.txt requirements-dev.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: bench test pytest checks install clean
install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q $(TORCH) $(TRITON) -r requirements-dev.txt
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import reatt_kernels as rk; print(rk.available_backends())"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/reatt-bench $(ARGS)

pytest: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

checks: $(STAMP)
	@for s in scripts/ci/*.sh; do [ -e "$$s" ] || continue; echo "== $$s"; \
	  start=$$(date +%s); PY=$(abspath $(PY)) bash "$$s" || { echo "FAILED: $$s"; exit 1; }; \
	  echo "== $$s done in $$(( $$(date +%s) - start )) s"; done

test: pytest
	@if [ -z "$(ARGS)" ]; then $(MAKE) --no-print-directory checks; fi

clean:
	rm -rf build reatt_kernels/_C*.so
