# The two commands of the README. Each works on a fresh machine: it creates .venv, installs the
# package with its dev extras (torch from the machine's wheel cache where one exists), then runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.sparta-installed

# Where `make assets` links Fashion-MNIST (load_dataset's default data_dir is ./data).
DATA_DIR ?= data

.PHONY: demo assets test test-pretrained lint bench readme readme-walk clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Offline copies of torchvision's downloads (MobileNetV2 ImageNet weights, Fashion-MNIST) where
# torchvision looks for them; see scripts/offline_assets.sh. Never fails: it reports what it
# could not put in place and how to get it.
assets: $(STAMP)
	@PY=$(BIN)/python DATA_DIR=$(DATA_DIR) scripts/offline_assets.sh

demo: $(STAMP) assets
	$(BIN)/sparta demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not pretrained"

# The tests on the real offline assets (they skip, saying why, where one is missing).
test-pretrained: $(STAMP) assets
	$(BIN)/python -m pytest -q -m pretrained

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py

# Every generated block of README.md from the results files in benchmarks/results/.
readme: $(STAMP)
	$(BIN)/python benchmarks/readme_all.py

# Run every bash command and python block of README.md verbatim in this clone, in order, and
# record each (README line, exit code, seconds, output tail) in readme_walk.json
# (scripts/readme_walk.py; e.g. README_WALK_ARGS="--only 546,548" or "--skip 612").
README_WALK_ARGS ?=
readme-walk: $(STAMP)
	$(BIN)/python scripts/readme_walk.py --clone . --json readme_walk.json $(README_WALK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
