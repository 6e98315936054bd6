# The two commands of README's quick start; each works on a fresh machine (Python 3.11):
#   make bench   install everything into .venv, build, run the kernel benchmark (quick mode)
#   make test    install everything into .venv, build, lint, run the whole test suite
# Builds are in place (cbfused/*.so) and incremental (build/ keeps the objects): a second
# target recompiles only what changed. `make bench` builds the CPU kernels for this machine's
# ISA only, and CUDA only where a GPU is visible; `make test` builds every CPU ISA, the CUDA
# kernels wherever nvcc exists (FORCE_CUDA=1: the tests read the compiled device code) and
# the CUDA emulation, reusing what `make bench` built.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.cbfused-deps
# torch 2.14.1 + torchvision 0.29.1 (CUDA 13.0 build; runs on the CPU too). The versions
# are pinned so torchvision's compiled ops match torch.
TORCH_PKGS := torch==2.14.1 torchvision==0.29.1
DEV_PKGS   := pytest==9.* hypothesis ruff==0.17.* clang-format==23.1.* balanced-loss==0.1.1 numpy mpmath \
              matplotlib ninja setuptools wheel mnist1d==0.0.2.post1 tqdm
BENCH_ARGS ?=
PYTEST_ARGS ?=
export CUDA_HOME ?= /usr/local/cuda
# The in-place build is imported from the clone (tests, benchmarks, examples).
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))
BUILD := $(PY) setup.py -q build_ext --inplace
HAVE_NVCC := $(shell test -x "$(CUDA_HOME)/bin/nvcc" && echo 1)
TEST_BUILD_ENV := CBFUSED_BUILD_EMULATION=1 $(if $(HAVE_NVCC),FORCE_CUDA=1)

.PHONY: all bench test build build-test lint format deps clean example

all: test

$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PKGS)
	$(PIP) install -q $(DEV_PKGS)
	touch $(STAMP)

deps: $(STAMP)

# what `make bench` needs: this machine's CPU ISA (and CUDA where a GPU is visible)
build: $(STAMP)
	CBFUSED_CPU_CAPABILITIES=native $(BUILD)
	$(PY) -c "import cbfused; print('cbfused', cbfused.__version__, cbfused.BUILD_INFO)"

# what `make test` needs: every CPU ISA, the CUDA kernels (where nvcc exists), the emulation
build-test: $(STAMP)
	$(TEST_BUILD_ENV) $(BUILD)
	$(PY) -c "import cbfused; print('cbfused', cbfused.__version__, cbfused.BUILD_INFO)"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files --cached --others --exclude-standard 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

format: $(STAMP)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .
	$(VENV)/bin/clang-format -i $$(git ls-files --cached --others --exclude-standard 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

test: build-test lint
	CBFUSED_EMULATION=1 $(PY) -m pytest -q $(PYTEST_ARGS)

# jemalloc keeps freed memory mapped: without it large CPU buffers are page-faulted in on
# every step (see benchmarks/bench.py). Best effort: without it the benchmark uses glibc.
bench: build
	-@ls /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 >/dev/null 2>&1 || apt-get install -y -q libjemalloc2 >/dev/null 2>&1 || \
	  (apt-get update -q && apt-get install -y -q libjemalloc2) >/dev/null 2>&1 || \
	  echo "note: libjemalloc2 not installed; benchmarking with glibc malloc (slower and noisier at large shapes)"
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

# the long-tailed training example (quick grid; EXAMPLE_ARGS=--full for the whole grid)
EXAMPLE_ARGS ?=
example: build
	$(PY) examples/long_tailed.py $(EXAMPLE_ARGS)

clean:
	rm -rf build cbfused/*.so *.egg-info
