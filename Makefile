# Fluke re-identification pipeline.  `make all` = set up .venv, build the demo competition if
# RAW has none, then run the stages 00..06, each only when its inputs changed.
#   make all PROFILE=full RAW=/data/humpback DATA=/scratch/run1 SET="train.epochs=3"
#   make 04 MODEL=lite0_128          # rerun one stage (one member)
#   make all NPROC=2                 # stages 03/04/05 in 2 processes (torchrun, one per GPU; README)
SHELL := /bin/bash
.DEFAULT_GOAL := help

RAW     ?= data/raw
DATA    ?= data
SET     ?=
MODEL   ?=
NPROC   ?= 1
PYTHON  ?= python3
# PROFILE not named: demo for the embedded demo, full on a CUDA machine, cpu otherwise (common/profile.py
# prints which and why); only for the targets that run the pipeline.
PIPELINE_GOALS := all demo 00 01 02 03 04 05 06 predict report bench bench-targets
ifeq ($(origin PROFILE),undefined)
  ifneq ($(filter $(PIPELINE_GOALS),$(MAKECMDGOALS)),)
    PROFILE := $(shell $(PYTHON) -m common.profile $(RAW) $(if $(MAKE_RESTARTS),--quiet))
  else
    PROFILE := demo
  endif
endif
CONFIG  ?= configs/$(PROFILE).yaml
VENV    := .venv
PY      := $(VENV)/bin/python
VENV_OK := $(VENV)/.stamp
# the training stages 03/04/05: one process, or NPROC under torchrun (common/distributed.py)
TRAIN_PY := $(if $(filter-out 1,$(NPROC)),$(VENV)/bin/torchrun --standalone --nproc_per_node $(NPROC),$(PY))

# each override quoted: the shell must not brace-expand a mapping such as ensemble={a:1,b:0.5}
SET_ARGS := $(foreach s,$(SET),--set '$(s)')
ARGS := --raw $(RAW) --data $(DATA) --config $(CONFIG) $(SET_ARGS)
CFG  := $(DATA)/.config
STAGES := 00 01 02 03 04 05 06
STAMPS := $(foreach s,demo $(STAGES),$(CFG)/$(s).json)

# ---- code each stage runs: its script + the common/ modules it imports (python -m common.deps) ----
# Editing one of them reruns that stage (and what depends on its artifacts) on the next `make all`.
DEPS_MK := .make/deps.mk
-include $(DEPS_MK)
$(DEPS_MK): common/deps.py $(wildcard common/*.py) $(wildcard [0-9][0-9]_*.py)
	@$(PYTHON) -m common.deps --out $@

# ---- outputs that mark each stage done (names mirror common/paths.py) -------------------------
OUT_00 := $(DATA)/clean/report.json
OUT_01 := $(DATA)/detector/metrics.json
OUT_02 := $(DATA)/crops/crops.csv
OUT_03 := $(DATA)/models/pretrain/summary.json
OUT_04 := $(DATA)/models/summary.json
OUT_05 := $(DATA)/pseudo/report.json
OUT_06 := $(DATA)/submission/submission.csv
REPORT := $(DATA)/report/index.html

.PHONY: help all setup test bench bench-targets bench-speed clean demo predict report tensorboard browser FORCE $(STAGES)

help:  ## list targets
	@echo "Usage: make <target> [PROFILE=demo|cpu|full|tiny] [RAW=dir] [DATA=dir] [SET=\"key=value ...\"] [MODEL=name] [NPROC=n]"
	@echo
	@grep -hE '^[0-9a-z_-]+:.*## ' $(firstword $(MAKEFILE_LIST)) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'
	@echo "00..06  rerun one stage now (03/04/05 accept MODEL=name, and NPROC=n processes under torchrun)"

all: $(REPORT)  ## set up, build the demo if needed, run every stale stage, write the submission and report
	@echo "submission: $(OUT_06)"
	@echo "report:     $(REPORT)"

setup: $(VENV_OK)  ## create .venv from requirements.txt (once; redone when requirements change)

$(VENV_OK): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $@

# Per-stage config fingerprints: rewritten only when the sections a stage reads change.
$(STAMPS) &: FORCE | $(VENV_OK)
	@$(PY) -m common.config $(ARGS) --stamps

demo: $(RAW)/train.csv  ## build the embedded demo competition into RAW (only when it has none)

$(RAW)/train.csv: | $(VENV_OK) $(CFG)/demo.json
	@if [ "$(abspath $(RAW))" != "$(abspath data/raw)" ] && [ -z "$(FORCE_DEMO)" ]; then \
	  echo "error: no competition at $(RAW) (train.csv missing). Point RAW at a Kaggle-layout folder," \
	       "or omit RAW to use the demo competition in data/raw." >&2; exit 2; fi
	$(PY) -m common.demo_data --out $(RAW) --config $(CONFIG) $(SET_ARGS)

$(OUT_00): $(CODE_00) $(RAW)/train.csv $(CFG)/00.json | $(VENV_OK)
	$(PY) 00_clean_data.py $(ARGS)
$(OUT_01): $(CODE_01) $(OUT_00) $(wildcard $(RAW)/boxes.csv) $(CFG)/01.json | $(VENV_OK)
	$(PY) 01_train_detector.py $(ARGS)
$(OUT_02): $(CODE_02) $(OUT_01) $(OUT_00) $(CFG)/02.json | $(VENV_OK)
	$(PY) 02_crop_flukes.py $(ARGS)
$(OUT_03): $(CODE_03) $(OUT_02) $(CFG)/03.json | $(VENV_OK)
	$(TRAIN_PY) 03_pretrain_humpback.py $(ARGS)
$(OUT_04): $(CODE_04) $(OUT_03) $(OUT_02) $(CFG)/04.json | $(VENV_OK)
	$(TRAIN_PY) 04_train_embed.py $(ARGS)
$(OUT_05): $(CODE_05) $(OUT_04) $(CFG)/05.json | $(VENV_OK)
	$(TRAIN_PY) 05_pseudo_label.py $(ARGS)
$(OUT_06): $(CODE_06) $(OUT_05) $(OUT_04) $(CFG)/06.json | $(VENV_OK)
	$(PY) 06_ensemble_submit.py $(ARGS)

$(REPORT): $(OUT_06) common/report.py $(wildcard $(DATA)/bench/bench.json $(DATA)/bench/ablation.md) | $(VENV_OK)
	@$(PY) -m common.report $(ARGS)

report: | $(VENV_OK)  ## (re)write DATA/report/index.html: one page with every stage's figures and what to do next
	$(PY) -m common.report $(ARGS)

# `make 04` reruns that stage now, whatever make thinks of its inputs.
00 01 02 06: | $(VENV_OK)
	$(PY) $(wildcard $@_*.py) $(ARGS)
03 04 05: | $(VENV_OK)
	$(TRAIN_PY) $(wildcard $@_*.py) $(ARGS) $(if $(MODEL),--model $(MODEL))

# a passing test's tmp_path is removed (a run writes ~2.7 GB of checkpoints and crops; pytest kept the last three)
test: $(VENV_OK) browser  ## run the test suite (unit tests, doctests, CI-sized stage runs, the report in Chromium)
	$(PY) -m pytest -q -p no:cacheprovider -o tmp_path_retention_policy=failed --doctest-modules tests common

# The report's browser test needs Chromium: found on PATH, else installed from Debian's packages
# where this user may (root with apt-get); otherwise that one test is skipped with the reason.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	 { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	   { apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	     { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; } && \
	   echo "installed chromium for the report's browser test"; } || \
	 echo "chromium not found and not installable here: the report's browser test will be skipped"

BENCH ?= all
SEEDS ?= 1
bench: $(VENV_OK)  ## ablations on RAW: one row per technique (BENCH=name,... subset; SEEDS=3): DATA/bench/ablation.{csv,md,png}
	$(PY) -m common.ablation --raw $(RAW) --data $(DATA) --config $(CONFIG) $(SET_ARGS) --variants $(BENCH) --seeds $(SEEDS)

bench-targets: $(VENV_OK)  ## the demo's quality/speed targets (fresh make all into DATA/bench; BENCH_ARGS=--variants)
	$(PY) tests/benchmarks.py --raw $(RAW) --data $(DATA)/bench --config $(CONFIG) $(SET_ARGS) $(BENCH_ARGS)

bench-speed: $(VENV_OK)  ## speed ratios: faiss vs sklearn vs numpy search, extraction and training vs bare model (DATA/bench/speed.md)
	$(PY) -m common.speed --data $(DATA) $(SPEED_ARGS)

predict: $(VENV_OK)  ## top-k database matches for new photos: make predict IMAGES="a.jpg b.jpg"
	$(PY) 06_ensemble_submit.py $(ARGS) --predict $(IMAGES)

tensorboard: $(VENV_OK)  ## TensorBoard over every training run in DATA/models
	$(VENV)/bin/tensorboard --logdir $(DATA)/models

clean:  ## remove artifacts (never RAW)
	rm -rf $(addprefix $(DATA)/,clean detector crops models pseudo embeddings submission report .config)

FORCE:
