# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch first, pinned, and the build this machine needs: PyPI's Linux torch wheels are CUDA builds
# (GBs of CUDA libraries), so a machine without an NVIDIA GPU gets the CPU build (2.13.0+cpu: from
# a local wheel cache when pip has one, else from PyTorch's CPU index) and a GPU machine PyPI's.
# Override: TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" make install
TORCH_VERSION ?= 2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_GPU),torch==$(TORCH_VERSION),torch==$(TORCH_VERSION)+cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO_DIR ?= demo-out

.PHONY: install system-deps test demo bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC) 2>/dev/null || $(PIP) install -q $(TORCH_SPEC) --extra-index-url $(TORCH_CPU_INDEX)
	$(PIP) install -q -c constraints.txt -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The MLflow UI test drives Debian's headless chromium, the tracking-server test a throwaway
# PostgreSQL: installed here when missing and we are root; otherwise those tests skip, saying why.
# $(call apt_install,<what needs it>,<Debian package>): as root, install it; else say what will skip.
apt_install = if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing $(2) (apt-get) for the $(1)"; export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q $(2) >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q $(2) >/dev/null 2>&1; } || \
	    echo "could not install $(2): the $(1) will skip"; \
	else echo "$(2) not found and not root: the $(1) will skip"; fi

system-deps:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { $(call apt_install,PostgreSQL test,postgresql); }
	@command -v chromium >/dev/null 2>&1 || { $(call apt_install,MLflow UI test,chromium); }

# The whole suite, fault drills included (worker SIGKILL, node loss, tracking server killed mid-study).
test: install system-deps
	$(PY) -m pytest -q --durations=25 tests

demo: install
	$(PY) -m ecgsearch.demo --out $(DEMO_DIR)

bench: install
	$(PY) bench/ingest.py
	$(PY) bench/train_throughput.py
	$(PY) bench/ray_overhead.py
	$(PY) bench/rle_parallel.py

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
