# emmito: `make demo` runs the whole workflow on a synthetic volume; `make test` runs the tests.
# GPU users: make demo TORCH='torch' (or a CUDA wheel spec); CPU machines get the small CPU build.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
CORES  ?= 2
BIN    := $(VENV)/bin
SNAKEMAKE := $(BIN)/snakemake
# The rules call `emmito`: put the venv first on PATH for every recipe.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test data lint dag clean help

help:
	@echo "make demo   - install into $(VENV), synthesise demo data, run the workflow, print metrics"
	@echo "make test   - install dev dependencies and run the test suite"
	@echo "make lint   - snakemake --lint and snakefmt --check"
	@echo "make dag    - render the rule graph to dag.svg (needs graphviz)"

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "emmito needs Python >= 3.11: run make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[workflow,view]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[workflow,view,dev]"
	touch $@

# The demo's embedded data: three independent synthetic volumes (train / validation / deploy).
data/demo/.done: $(VENV)/.installed
	$(BIN)/emmito synth data/demo/train  --slices 48 --size 192 --seed 1
	$(BIN)/emmito synth data/demo/val    --slices 24 --size 192 --seed 2
	$(BIN)/emmito synth data/demo/deploy --slices 72 --size 192 --seed 3
	touch $@

data: data/demo/.done

demo: data/demo/.done
	$(SNAKEMAKE) --cores $(CORES) --configfile config.yaml
	$(BIN)/emmito summary config.yaml

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev data/demo/.done
	$(SNAKEMAKE) --lint
	$(BIN)/snakefmt --check Snakefile rules/

dag: $(VENV)/.installed data/demo/.done
	$(SNAKEMAKE) --rulegraph | dot -Tsvg > dag.svg

clean:
	rm -rf results data .snakemake
