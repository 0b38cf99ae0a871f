# Two commands for a new user: `make eval` and `make test`.  Both create
# .venv on first use and install what is missing; a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.holoprune-installed
# CPU build of torch by default: from the PyTorch CPU wheel index when it is
# reachable, else from the default index (.ci/install_torch.sh says which, and
# records it in .venv/.torch-index).  On a GPU machine, install a CUDA torch into
# .venv first (README); an importable torch is never replaced.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: eval test test-compat lint bench sysdeps setup clean

setup: sysdeps $(STAMP)

sysdeps:
	@PYTHON=$(PYTHON) bash .ci/sysdeps.sh

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || TORCH_SPEC="$(TORCH_SPEC)" TORCH_INDEX="$(TORCH_INDEX)" bash .ci/install_torch.sh $(PY)
	$(PY) -m pip install --quiet -e ".[video,3d,dev]"
	touch $(STAMP)

eval: setup
	$(PY) scripts/eval_scannet.py

test: setup
	$(PY) -m pytest -q

# The engine (and AdaGate) tests under older transformers, in cached side venvs
# .venv-tf<version> next to .venv (LLaVA-3D pins 4.37.2; LLaVA-NeXT-era code 4.4x).
COMPAT_VERSIONS ?= 4.37.2 4.49.0
test-compat:
	PYTHON=$(PYTHON) COMPAT_VERSIONS="$(COMPAT_VERSIONS)" TORCH_SPEC="$(TORCH_SPEC)" \
		TORCH_INDEX="$(TORCH_INDEX)" bash .ci/test_compat.sh

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: setup
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) results bench .pytest_cache
