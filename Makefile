# Each target is a thin wrapper over `ddpmctl`; every one creates .venv first if it is missing.
# Override any variable on the command line, e.g. `make train CONFIG=configs/celeba_128_m3_ultra.yaml DATA=~/faces`.

PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
# torch is pinned to the build this project is tested with; on another machine (e.g. a Mac) use
# `make install TORCH_SPEC="torch torchvision"` to take the newest release for it.
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
CONFIG      ?= configs/demo_cpu.yaml
DATA        ?=
WORK        ?= runs/working
GEN         ?= runs/generated
NAME        ?=
# The run `make train` makes: NAME, else the experiment_name in CONFIG (read when a target needs it).
RUN_NAME     = $(or $(NAME),$(shell $(BIN)/python -c "from ddpmctl.config import load_yaml; \
               print(load_yaml('$(CONFIG)').run.experiment_name)" 2>/dev/null))
CHECKPOINT  ?= $(WORK)/$(RUN_NAME)
OUT         ?= runs/samples
NUM         ?= 64
FORCE       ?=
STAMP       := $(VENV)/.installed

.PHONY: help install test demo lint bench train resume sample doctor clean

help:  ## list the targets and the variables they use
	@echo "targets: install test demo lint bench train resume sample doctor clean"
	@echo "variables: CONFIG=$(CONFIG) DATA=$(DATA) WORK=$(WORK) GEN=$(GEN) NAME=$(NAME)"
	@echo "           CHECKPOINT=$(CHECKPOINT) OUT=$(OUT) NUM=$(NUM) FORCE=$(FORCE) TORCH_SPEC='$(TORCH_SPEC)'"
	@echo "           BENCH_ARGS='$(BENCH_ARGS)' (options of benchmarks/compare.py) PYTHON=$(PYTHON) VENV=$(VENV)"
	@echo "example:   make train CONFIG=configs/celeba_128_m3_ultra.yaml DATA=./celeb_hq_128 NAME=faces"
	@echo "           make resume with the same variables continues that run"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install ddpmctl with its test tools

test: $(STAMP)  ## run the test suite (CPU, a few minutes)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check ddpmctl tests benchmarks

demo: $(STAMP)  ## build the demo data, train on the CPU, sample a grid
	$(BIN)/python -m ddpmctl.cli.demo --config configs/demo_cpu.yaml --data data/demo --work $(WORK) --generated $(GEN) --out $(OUT)/demo

bench: $(STAMP)  ## ddpmctl against diffusers on this machine, then data-loading throughput
	$(BIN)/python benchmarks/compare.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/data_throughput.py

train: $(STAMP)
	$(BIN)/ddpmctl train --config $(CONFIG) --working-directory $(WORK) --generated-directory $(GEN) \
		$(if $(DATA),--path-to-data $(DATA)) $(if $(NAME),--experiment-name $(NAME))

# The run `make train` started with the same variables: its config.yaml holds the rest. CONFIG only names it
# (passed whole, its values would override the run's own, e.g. an extended --num-training-steps).
resume: $(STAMP)  ## continue the run that `make train` with the same variables started
	$(BIN)/ddpmctl resume --working-directory $(WORK) --experiment-name $(RUN_NAME) $(if $(DATA),--path-to-data $(DATA))

sample: $(STAMP)
	$(BIN)/ddpmctl sample --checkpoint $(CHECKPOINT) --out $(OUT) --num $(NUM) --grid $(if $(FORCE),--force)

doctor: $(STAMP)
	$(BIN)/ddpmctl doctor

clean:  ## remove the demo data and runs (not .venv)
	rm -rf runs data/demo
