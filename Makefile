# revdeq_kernels: every target sets up what it needs in a virtual environment (.venv) first.
#   make demo   set up, then run the main job: gradient check, digits training, quick benchmark
#   make test   set up, then run the test suite (what CI runs through .ci/run)
# Other targets: install, bench, cuda-check, cuda-emu, cuda-emu-tsan, cuda-emu-mutations, lint, gpu, clean.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# Two pytest workers (pytest-xdist, one per CI core); a file's tests stay on one worker, so tests that share
# a build folder or a module fixture never race. PYTEST_WORKERS=0 runs everything in this process.
PYTEST_WORKERS ?= 2

# Never let pip pull PyPI's multi-GB CUDA build of torch onto a machine without an NVIDIA GPU:
# use a local CPU wheel when pip is configured with one (find-links), else PyTorch's CPU index.
CPU_TORCH_WHEEL := $(firstword $(foreach d,$(subst :, ,$(PIP_FIND_LINKS)),$(wildcard $(d)/torch-$(TORCH_VERSION)+cpu-*.whl)))
HAVE_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_PIP_ARGS ?= $(if $(or $(CPU_TORCH_WHEEL),$(HAVE_NVIDIA)),,--index-url https://download.pytorch.org/whl/cpu)

CSRC := $(shell find csrc -type f)

.PHONY: install test demo bench cuda-check cuda-emu cuda-emu-tsan cuda-emu-mutations lint gpu gpu-prepare clean

# The environment: torch first (so the extension builds against it), then the package with its
# test, benchmark and example extras.
$(VENV)/.deps: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install --no-build-isolation -e ".[test,bench,examples]"
	touch $@ $(VENV)/.built  # .built last: not older than .deps, so the build above is not repeated

# Rebuild revdeq_kernels._C whenever a C++/CUDA source changes. .deps is order-only, and the recipe
# checks the timestamps itself: GNU make treats a target whose prerequisite was remade in the same run
# as out of date whatever the timestamps, so a fresh clone compiled _C twice (once in .deps's install).
$(VENV)/.built: setup.py $(CSRC) | $(VENV)/.deps
	@if [ -f $@ ] && [ -z "$$(find setup.py csrc -type f -newer $@)" ]; then \
		echo "revdeq_kernels._C is up to date"; \
	else \
		echo "$(PY) -m pip install --no-build-isolation --no-deps -e ."; \
		$(PY) -m pip install --no-build-isolation --no-deps -e . && touch $@; \
	fi

install: $(VENV)/.built

test: install
	$(PY) -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile) $(PYTEST_ARGS)

# The main job, a few minutes on 2 CPU cores: the reversible gradient against autograd (float64), a
# RevDEQ trained on scikit-learn's digits (fails below 95% test accuracy), the quick benchmarks and
# their tables, then a short summary of all of it. Everything it writes goes to runs/demo/.
DEMO := runs/demo
demo: install
	mkdir -p $(DEMO)
	$(PY) examples/grad_check.py --json $(DEMO)/grad_check.json
	$(PY) examples/train_digits.py --min-accuracy 0.95 --out-dir $(DEMO)
	$(PY) -m benchmarks --quick --out $(DEMO)
	$(PY) examples/demo_summary.py $(DEMO)

bench: install
	$(PY) -m benchmarks --quick

cuda-check:
	$(PYTHON) tools/cuda_check.py

# The CUDA kernels executed on the CPU (tests/cuda_emulation/README.md): every section in full on the
# plain build, then the quick sections under AddressSanitizer + UBSan. No torch, no GPU.
EMU := tests/cuda_emulation
cuda-emu:
	$(PYTHON) $(EMU)/emu_build.py --variant plain --run
	$(PYTHON) $(EMU)/emu_build.py --variant asan --run --quick

# The *-small sections under ThreadSanitizer, one OS thread per CUDA thread.
cuda-emu-tsan:
	$(PYTHON) $(EMU)/emu_build.py --variant tsan --run --small

# Plant known kernel bugs one at a time; every one must make the suite fail (several minutes).
cuda-emu-mutations:
	$(PYTHON) $(EMU)/mutations.py

# On the GPU machine (its python3 already has torch with CUDA, Triton, pytest; no network, no .venv):
# build for sm_90 only, GPU tests, verify.py, compute-sanitizer, full benchmarks; logs and results
# under $$OUT. See tools/gpu_session.sh (GPU_STEPS picks a subset).
gpu:
	tools/gpu_session.sh

# Here, before a device call that runs `make gpu` with carry [".gpu", ".whl"]: ../shared/gpu/verify.py
# does not travel, and the GPU machine cannot download torchdeq.
gpu-prepare:
	mkdir -p .gpu .whl
	cp ../shared/gpu/verify.py .gpu/verify.py
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: -d .whl torchdeq==0.1.0

lint: $(VENV)/.deps
	$(PY) -m ruff check revdeq_kernels benchmarks tests tools examples setup.py

clean:
	rm -rf build dist *.egg-info revdeq_kernels/*.so .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
