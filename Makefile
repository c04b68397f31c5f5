# StackWise developer entry points. `make install && make train` is the whole set-up.
PYTHON ?= python
# torch is installed first, pinned, so pip never resolves a multi-GB CUDA build on a CPU machine.
TORCH ?= torch==2.13.0

.PHONY: install lint format test train bench clean

install:
	$(PYTHON) -m pip install "$(TORCH)"
	$(PYTHON) -m pip install -e ".[dev]"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format:
	$(PYTHON) -m ruff check --fix .
	$(PYTHON) -m ruff format .

test:
	$(PYTHON) -m pytest tests

train:
	stackwise-train

bench:
	$(PYTHON) benchmarks/run.py

clean:
	rm -rf outputs multirun
