# dsv2: `make demo` runs the main job, `make test` runs the test suite. Both set up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A CPU-only machine takes the CPU build of torch (small, fast to install); a CUDA machine takes the default.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.8" || echo "torch==2.13.0")

.PHONY: setup demo demo-full demo-long test test-all bench clean

$(BIN)/dsv2: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip >/dev/null
	$(BIN)/pip install -q "$(TORCH_SPEC)" || $(BIN)/pip install -q "torch>=2.8"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(BIN)/dsv2

setup: $(BIN)/dsv2

demo: setup
	$(BIN)/dsv2 demo

# The whole lifecycle where GRPO beats SFT on held-out problems (docs/grpo.md; about 80 min on 2 cores): pretrain a
# small model that copies from its context (runs/retrieval_base.sh, each stage reused when done) -> SFT on solutions
# that mostly skip the working -> GRPO with the answer reward -> a chat answer. `runs/align.sh` alone runs the same
# lifecycle from the demo's `small` (which cannot copy the prompt's numbers).
demo-full: setup
	bash runs/retrieval_base.sh
	OUT=runs/align_terse BASE=runs/retrieval_base/retrieval/checkpoints/step-00001500 FREEZE_LATENTS=1000000 \
	  TASK_ARGS="--n-train 4000 --n-test 400 --steps 2 --max-number 9 --terse-fraction 0.6" SFT_STEPS=1000 \
	  GRPO_STEPS=200 GRPO_BATCH=64 GRPO_LR=3e-5 EVAL_N=400 EVAL_EVERY=25 bash runs/align.sh

demo-long: setup  # docs/long_context.md: a 4-layer retrieval base (about 40 min), then YaRN / PI / none to 2048
	OUT=runs/retrieval_base4 LAYERS=4 RETRIEVAL_STEPS=250 bash runs/retrieval_base.sh
	for rope in yarn pi none; do \
	  OUT=runs/lc4 BASE=runs/retrieval_base4/retrieval/checkpoints/step-00000250 RETRIEVAL_STEPS=0 \
	    FREEZE_LATENTS=1000000 EXTEND_STEPS=200 EXTEND_BATCH=2 TRIALS=8 ROPES=$$rope bash runs/long_context.sh; \
	done

test: setup  # fails on any pytest failure, also exit 5 ("no tests collected")
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
