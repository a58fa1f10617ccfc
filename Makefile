# Quickstart and CI entry points. `make test` builds .venv on first use; later runs are instant
# because the install is keyed on a stamp file that depends on the dependency specs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LINT_PATHS := core moe multimodal experiment recipes tests

.PHONY: venv test lint demo demo-multimodal scaling clean distclean

venv: $(STAMP)

# Reuses an existing .venv (only installs into it); rebuilds the install when pyproject.toml,
# constraints.txt or requirements-peers.txt change. torch 2.11 needs setuptools<82. The benchmark peers
# go in without their dependencies (see requirements-peers.txt).
$(STAMP): pyproject.toml constraints.txt requirements-peers.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -U pip "setuptools>=70,<82" wheel
	$(PY) -m pip install -c constraints.txt -e ".[data,test,dev]"
	$(PY) -m pip install -c constraints.txt --no-deps -r requirements-peers.txt
	touch $@

test: venv
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

demo: venv
	$(PY) recipes/compare.py --config recipes/configs/compare-cpu.yaml --out runs/demo

demo-multimodal: venv
	$(PY) recipes/compare.py --config recipes/configs/mm-cpu.yaml --out runs/demo-multimodal

scaling: venv
	$(PY) recipes/compare.py --config recipes/configs/scaling-cpu.yaml --out runs/scaling

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
