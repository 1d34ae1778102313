# `make test` builds .venv from nothing, then runs ruff and pytest.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test test-slow lint bench demo clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, from the pinned CPU build, so nothing later pulls a CUDA build
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,openvino,serve,train,export,dev]'
	touch $(STAMP)

lint: venv
	$(VENV)/bin/ruff check deploy_diff tests benchmarks tools
	$(VENV)/bin/ruff format --check deploy_diff tests benchmarks tools

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-slow: venv
	$(VENV)/bin/pytest -q -m slow

# train -> export -> sample on the built-in digits; writes demo/grid.png and prints a timing table
DEMO_ARGS ?=
demo: venv
	$(VENV)/bin/deploy-diff demo --out demo $(DEMO_ARGS)

bench: venv
	$(PY) benchmarks/scheduler_step.py

clean:
	rm -rf $(VENV) build *.egg-info
