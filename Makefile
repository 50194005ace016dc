# miles-flyte: `make run` (default pipeline on CPU) and `make test` (test suite).
# Both create .venv and install the project on first use; nothing else needs installing by hand.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU machines take the local CPU build of torch; machines with CUDA keep/get a CUDA build.
TORCH_SPEC ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)
PYTEST_ARGS ?=

.PHONY: setup test test-slow test-all run bench-cpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[flyte,test]"
	@touch $(STAMP)

# The default pipeline on CPU: shipped tiny MoE, 3 cycles x 10 GRPO steps, artifacts in runs/flyte.
RUN_ARGS ?=
run: $(STAMP)
	FLYTE_LOCAL_CACHE_ENABLED=$${FLYTE_LOCAL_CACHE_ENABLED:-false} $(VENV)/bin/pyflyte run workflows/grpo.py grpo_pipeline $(RUN_ARGS)

# Fast suite (CI). pytest exit 5 ("no tests ran") is not a failure.
test: $(STAMP)
	@$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-slow: $(STAMP)
	@$(PY) -m pytest -q -m slow $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

test-all: $(STAMP)
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
