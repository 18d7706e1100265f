# All set-up lives here and is idempotent: `make demo` and `make test` install
# what they need into .venv on first use, and do nothing more on later runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first and pinned: on these machines 2.13.0 is a local CPU wheel; any
# looser requirement would pull gigabytes of CUDA packages.
TORCH := torch==2.13.0

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[control,mujoco,app,test,lora]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/heed demo --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check heed tests bench
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs
