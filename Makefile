# e2kd-fast: `make demo` and `make test` create the virtual environment on first use.
VENV      ?= .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.e2kd-installed

# CPU-only machines: the toolkit nvcc belongs to lives here (torch would guess /usr/local from
# /usr/local/bin/nvcc; docs/architecture.md#platform-notes); DeepSpeed runs
# on its CPU accelerator; caches stay inside the checkout.
export CUDA_HOME ?= /usr/local/cuda
export DS_ACCELERATOR ?= cpu
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_ext

.PHONY: venv test test-gpu gpu-wheels lint format demo bench clean

venv: $(STAMP)

# pip (not uv) sees the machine's local wheels; pip 23.2 builds the DeepSpeed sdist without
# isolation, so do not upgrade pip here. The extension is built with its CUDA sources wherever nvcc
# is found (sm_90; they cannot run without a GPU, but CI checks that they compile); a change to a
# source in csrc/ rebuilds it. Triton kernels (kernels/*.py) need no build: the install is editable.
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
$(STAMP): requirements-ci.txt setup.py $(CSRC)
	test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install --disable-pip-version-check -q -r requirements-ci.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q tests -m requires_cuda

# The official B-cos package, the tests' oracle, which the GPU machine's image lacks, as a wheel in
# .whl/ (ignored): carry .whl along to that machine, and bench/gpu_session.sh installs it for the tests.
GPU_WHEELS := $(shell grep -E '^bcos==' requirements-ci.txt)
gpu-wheels:
	rm -rf .whl
	python3 -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)
	ls .whl

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) -m e2kd_fast.demo --out runs/demo

# All benchmark suites at the device's default sizes (see bench/README.md); e.g.
# make bench BENCH_ARGS="--record" appends the results to bench/results/<device kind>.jsonl.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) -m bench all $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info e2kd_fast/_C*.so e2kd_fast/_build_config.py .cache .pytest_cache
