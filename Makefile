# Two commands for a fresh machine: `make quickstart` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU machines: the local CPU build. On a CUDA machine install your CUDA torch into .venv first.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: venv browser test test-fast quickstart lint clean-outputs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The web page's test drives Debian's chromium headless; installed here when missing (root or sudo).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    chromium fonts-dejavu-core >/dev/null || echo "warning: chromium could not be installed; the page test will fail"; }

# Test files run on TEST_WORKERS processes (one torch thread each; a file's tests stay on one worker, so its
# module fixtures are built once). test-fast leaves out what is marked slow or distributed: the edit loop.
TEST_WORKERS ?= 2
test: venv browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow and not distributed"

quickstart: venv
	$(PY) scripts/quickstart.py

lint: venv
	$(PY) -m ruff check .

clean-outputs:
	rm -rf outputs/quickstart
