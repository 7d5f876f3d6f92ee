# The README's commands. `make test` and `make demo` work on a fresh machine: they create the virtual
# environment, install torch and fastpeft (building the CUDA extension when nvcc is present), then run.
PYTHON ?= python3
VENV ?= .venv
# The registry's newest torch is a CUDA build: it runs on CPU too, and lets setup.py build csrc/ when nvcc is
# present. Override for a CPU-only install, e.g. `make test TORCH_SPEC=torch==2.13.0`.
TORCH_SPEC ?= torch>=2.4
export MAX_JOBS ?= 2

PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.fastpeft-installed

# AdapterHub's `adapters` 1.3 needs transformers ~4.57 (the main environment has transformers 5): its tests run
# with these packages first on PYTHONPATH, over the main environment's torch and fastpeft.
ADAPTERHUB_ENV := .adapterhub-env
ADAPTERHUB_PACKAGES := "adapters==1.3.0" "transformers==4.57.1" "huggingface-hub>=0.34,<1.0" "tokenizers>=0.22,<0.23" \
	requests charset-normalizer idna urllib3 certifi

.PHONY: install test test-adapterhub lint demo bench gpu-check gpu-wheels kernel-report clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel ninja
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PY) -c "import numpy" 2>/dev/null || $(PIP) install -q numpy  # torch warns at build time without it
	@echo "fastpeft: installing fastpeft; where nvcc and a CUDA build of torch are present this compiles the CUDA"
	@echo "fastpeft: extension fastpeft._C for 4 GPU architectures: about 5-10 minutes on 2 cores (MAX_JOBS=$(MAX_JOBS);"
	@echo "fastpeft: FASTPEFT_CUDA_ARCHS=9.0 builds one, FASTPEFT_SKIP_CUDA_BUILD=1 none). Quiet until it ends."
	# --no-build-isolation: the extension must be built against the torch installed above.
	$(PIP) install -q --no-build-isolation -e ".[test,bench]"
	$(PY) -m fastpeft.cli env
	touch $@

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# Every part runs, whatever failed before it; then one line names the parts that failed (exit 1) or says all
# passed. One benchmark smoke pass: tests/test_bench_runner.py runs every bench's smoke cases.
test: $(STAMP)
	@failed=""; \
	$(MAKE) --no-print-directory lint || failed="$$failed lint"; \
	$(PY) -m pytest -q tests || failed="$$failed pytest"; \
	$(MAKE) --no-print-directory test-adapterhub || failed="$$failed test-adapterhub"; \
	if [ -n "$$failed" ]; then echo "make test: FAILED:$$failed"; exit 1; fi; \
	echo "make test: every part passed (lint, pytest, test-adapterhub)"

$(ADAPTERHUB_ENV)/.installed: Makefile
	$(PIP) install -q --no-deps --upgrade --target $(ADAPTERHUB_ENV) $(ADAPTERHUB_PACKAGES)
	touch $@

test-adapterhub: $(STAMP) $(ADAPTERHUB_ENV)/.installed
	PYTHONPATH=$(ADAPTERHUB_ENV) $(PY) -m pytest -q tests/test_integration_adapterhub.py tests/test_integration_adapterhub_configs.py

demo: $(STAMP)
	$(VENV)/bin/fastpeft demo

bench: $(STAMP)
	$(VENV)/bin/fastpeft bench --out bench_out

# On a GPU machine: build, the GPU correctness subset, the TARGETS rows, compute-sanitizer (scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh gpu_check_out

# The wheels a GPU machine without a package registry lacks (bitsandbytes), into .whl/ for gpu_check.sh.
gpu-wheels:
	bash scripts/fetch_gpu_wheels.sh

# benchmarks/kernel_report.md, with this environment's Triton and triton 3.6 (the GPU machine's) and the built
# extension's sm_90 code; CI checks that it is current whenever csrc/ or triton_kernels/ change.
TRITON_GPU_MACHINE ?= 3.6.0
kernel-report: $(STAMP)
	test -d .triton36/triton || $(PIP) install -q --no-deps --target .triton36 "triton==$(TRITON_GPU_MACHINE)"
	$(PY) scripts/kernel_report.py --write --triton-path .triton36

clean:
	rm -rf build *.egg-info fastpeft/_C*.so bench_out gpu_check_out .triton_cache .triton36 .gpu_site $(ADAPTERHUB_ENV)
