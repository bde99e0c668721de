# segrepro: `make demo` runs the main job on a generated dataset, `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO_DIR ?= runs/demo

.PHONY: venv test demo clean

venv: $(VENV)/.installed

# One constraints file pins every version (torch 2.14.1 + torchvision 0.29.1 included).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

test: venv
	$(BIN)/pytest

# Until `segrepro reproduce` lands: the zoo, a generated ADE20K-layout dataset, and a
# prediction with the reference-format parity checkpoint (random weights) on one of its images.
demo: venv
	$(BIN)/segrepro zoo
	$(BIN)/segrepro data synth --root $(DEMO_DIR)/data --train 16 --val 8 --seed 0
	$(BIN)/segrepro data check --root $(DEMO_DIR)/data
	$(BIN)/segrepro predict --checkpoint tests/fixtures/vit_mask --ms-flip \
		--image $(DEMO_DIR)/data/ADEChallengeData2016/images/validation/ADE_val_00000001.jpg \
		--out $(DEMO_DIR)/ADE_val_00000001_mask.png

clean:
	rm -rf $(VENV) runs build *.egg-info
