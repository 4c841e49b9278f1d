# dsv2: `make demo` runs the main job, `make test` runs the test suite. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU-only machine takes the CPU build of torch (small, fast to install); a CUDA machine takes the default.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.8" || echo "torch==2.13.0")

.PHONY: setup demo demo-full test test-all bench clean

$(BIN)/dsv2: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "torch>=2.8"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/dsv2

setup: $(BIN)/dsv2

demo: setup
	$(BIN)/dsv2 demo

demo-full: setup  # the whole lifecycle: pretrain (reused if runs/demo has it) -> SFT -> GRPO -> a chat answer
	runs/align.sh

test: setup  # fails on any pytest failure, also exit 5 ("no tests collected")
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
