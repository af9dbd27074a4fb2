# Two commands for a fresh machine (python3, a C++ compiler and make):
#   make demo    the main job: trains a small two-modality model with EtherLoss
#   make test    the whole test suite (what CI runs)
# Both create .venv when missing, install what they need and build the extension;
# a second run reuses what is there. `make bench` runs the benchmarks.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 comes from this machine's local disk (a CPU build); any other spec would
# download several GB of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
DEPS := triton==3.9.0 numpy pybind11 ninja setuptools wheel pytest pytest-benchmark hypothesis tslearn dtaidistance
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ether-kernels-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu')

.PHONY: demo test bench build clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): Makefile | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet $(DEPS)
	touch $@

# A failed C++ build fails here (the package itself would fall back to the reference).
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	ETHER_KERNELS_REQUIRE_EXTENSION=1 $(PY) -m pip install --no-build-isolation --no-deps -e .
	$(PY) -c "import ether_kernels, json; print(json.dumps(ether_kernels.info(), indent=1))"
	touch $@

build: $(BUILD_STAMP)

demo: $(BUILD_STAMP)
	$(PY) -m ether_kernels.demo

test: $(BUILD_STAMP)
	$(PY) -m pytest tests -q

bench: $(BUILD_STAMP)
	$(PY) -m pip install --quiet pysdtw  # a peer in bench/bench_dtw.py (pure Python + numba)
	$(PY) -m pytest bench -q --benchmark-enable --benchmark-columns=min,median,iqr,ops --benchmark-sort=name

clean:
	rm -rf build *.egg-info ether_kernels/*.so $(BUILD_STAMP)
