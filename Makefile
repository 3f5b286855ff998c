# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs everything into it.
PYTHON ?= python3
# Where pip finds torch + torchvision. Empty: the package index's default build (CUDA on Linux x86_64,
# ~6.6 GB in .venv, runs on CPU too). For a CPU-only machine, a much smaller pair:
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# torch and torchvision must be a matching pair (timm imports torchvision):
	# install them together first so pip resolves one pair for both.
	$(PY) -m pip install torch torchvision $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ensemble.demo

# Two pytest workers (xdist's worksteal: each starts on its half of the tests, in the order tests/conftest.py
# sets, and takes from the other's end when it runs out). The tests wait on subprocesses and Ray more than
# they compute: on 2 CPUs two workers take about 3/4 of the serial time.
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist worksteal

bench: $(STAMP)
	$(PY) scripts/bench_data.py

clean:
	rm -rf $(VENV) runs
