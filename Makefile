# segrepro: `make demo` runs the main job on a generated dataset, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: venv test demo gpu-check clean

venv: $(VENV)/.installed

# One constraints file pins every version (torch 2.14.1 + torchvision 0.29.1 included).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

test: venv
	$(BIN)/pytest

# The main job on the embedded default: the five seed configurations with the smoke profile
# on a generated dataset in the ADE20K layout (created if absent), ending with the report.
DEMO_DATA := $(DEMO_DIR)/data
demo: venv
	@test -d $(DEMO_DATA)/ADEChallengeData2016 || \
		$(BIN)/segrepro data synth --root $(DEMO_DATA) --train 200 --val 8 --size 128x160 --classes 8 --seed 0
	$(BIN)/segrepro reproduce --configs seed --profile smoke --data-root $(DEMO_DATA) --run-dir $(DEMO_DIR)

# Validates a CUDA GPU (GPU-only tests, kernel profile, training, evaluation, benchmark) into
# GPU_CHECK_OUT; where none is visible it says so and exits 0. No `make venv`: a bare GPU
# machine's python3 with torch, triton and timm runs it from the checkout.
GPU_CHECK_OUT ?= runs/gpu-check
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) -m harness.gpucheck --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
