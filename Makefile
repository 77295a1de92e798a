# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned, so pip never resolves a multi-GB CUDA build on a CPU box.
# GPU users: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make install
TORCH_SPEC ?= torch==2.13.0
DEMO_DIR ?= demo-out

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The whole suite, fault drills included (worker SIGKILL, node loss, tracking server killed mid-study).
test: install
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m ecgsearch.demo --out $(DEMO_DIR)

bench: install
	$(PY) bench/ingest.py
	$(PY) bench/train_throughput.py
	$(PY) bench/ray_overhead.py
	$(PY) bench/rle_parallel.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
