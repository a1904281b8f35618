# Two commands do all setup on a fresh machine:  `make bench` (the main job) and `make test` (the test suite).
# Each creates or reuses .venv and installs what it needs (torch 2.13.0 CPU wheel and triton 3.8.0 from local disk here).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reatt-installed
TORCH ?= torch==2.13.0
TRITON ?= triton==3.8.0
DEPS := numpy tqdm matplotlib pytest pytest-benchmark pybind11 cmake ninja setuptools wheel faiss-cpu \
        "transformers>=5,<6" tokenizers
SOURCES := pyproject.toml setup.py CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: bench test install clean
install: $(STAMP)

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q $(TORCH) $(TRITON) $(DEPS)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import reatt_kernels as rk; print(rk.available_backends())"
	touch $(STAMP)

bench: $(STAMP)
	$(VENV)/bin/reatt-bench $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf build reatt_kernels/_C*.so
