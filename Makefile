# quantbench: the two set-up commands.
#   make demo   create .venv, install the project, run the workflow on the embedded offline default
#   make test   create .venv, install the project, run the test suite (then, without CUDA, the Triton
#               kernels' tests once more on Triton's CPU interpreter)
#
# TORCH_SPEC picks the torch build: the default lets pip choose (a CUDA build on Linux); a CPU-only machine
# can pass e.g. `make demo TORCH_SPEC=torch==2.13.0`.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.4
CORES ?= 2
SNAKEMAKE_ARGS ?=
PYTEST_ARGS ?=
TRITON_SPEC ?= triton==3.6.0
KERNEL_TESTS := tests/test_quant_qdq_kernel.py tests/test_quant_norm_kernel.py tests/test_quant_gptq_kernel.py

BIN := $(VENV)/bin
STAMP := $(VENV)/.quantbench-installed

.PHONY: demo test env clean-results

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[workflow,test,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/snakemake --cores $(CORES) --configfile config/config.yaml $(SNAKEMAKE_ARGS)
	@echo
	@echo "Tables (eval-rst, CSV, Markdown):"
	@ls -1 results/tables/*.rst results/tables/*.csv results/tables/*.md
	@echo "Logs: logs/   Per-cell results: results/evals/"

# Without CUDA the Triton kernels' tests skip in the main run; on Linux they then run on Triton's CPU
# interpreter (CPU-only torch ships without Triton: TRITON_SPEC is installed for them).
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	@if ! $(BIN)/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && [ "$$(uname -s)" = Linux ]; then \
		$(BIN)/python -c "import triton" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TRITON_SPEC)"; \
		echo "Triton kernels on the CPU interpreter:"; \
		TRITON_INTERPRET=1 $(BIN)/python -m pytest $(PYTEST_ARGS) $(KERNEL_TESTS); \
	fi

clean-results:
	rm -rf results logs .snakemake
