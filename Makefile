# The two commands: `make demo` runs the main job on built-in data, `make test` runs the tests.
# Both create or reuse .venv: torch==2.13.0 first (a CPU wheel here), then the project.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test quick bench gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vitscale study

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache  # the layers and no import cycles (pyproject [tool.importlinter])
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir site  # the docs: a broken link fails
	$(PY) -m compileall -q vitscale  # bytecode once, not again in each process a test starts
	$(PY) -m pytest -q -n auto --dist worksteal

quick: $(STAMP)  # the edit-test loop: everything but the tests marked slow
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) -m compileall -q vitscale
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/bench_vit.py

# On a CUDA machine, in about 8 minutes: the tests marked cuda, a 200-step bf16 S/16 training with
# torch.compile, bench_vit's B/16 b128 bf16 train line; a table and runs/gpu-check/TIME/gpu-check.json.
# It installs this checkout (no deps: a GPU machine reaches no registry) into that machine's own python,
# not .venv (GPU_PYTHON=... to pick another); without a CUDA device it says so and exits 0.
GPU_PYTHON ?= python3
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py --install
