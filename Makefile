# `make test` / `make demo` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned here (local wheels on our dev machines); requirements.txt holds the
# ranges cluster users may satisfy with their own CUDA build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DINOV2_REF := dinov2==0.0.1.dev2

.PHONY: setup mmseg dali test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) -r requirements.txt
	# Test-only numerical reference: FAIR's DINOv2 model code (PyPI snapshot, Apr 2023). --no-deps:
	# its pins (torch 2.0, xformers, cuML) concern training code our tests never import.
	$(PY) -m pip install -q --no-deps $(DINOV2_REF)
	touch $@

# mmsegmentation 1.2.2 for segmentation/ and depth/: mmcv 2.1.0 is built from source against the
# installed torch by scripts/build_mmcv.sh (~25 min on 2 cores the first time, then a cached wheel).
# GPU machines: FORCE_CUDA=1 make mmseg  (builds the CUDA ops as well).
MMSEG_PINS := mmengine==0.10.7 mmsegmentation==1.2.2 ftfy regex albumentations

mmseg: $(VENV)/.mmseg

$(VENV)/.mmseg: $(VENV)/.installed scripts/build_mmcv.sh
	$(PY) -m pip install -q $(MMSEG_PINS)
	PYTHON=$(PY) FORCE_CUDA=$${FORCE_CUDA:-0} bash scripts/build_mmcv.sh
	touch $@

# NVIDIA DALI for --loader dali (requirements-dali.txt: pick the wheel of torch's CUDA major version).
dali: $(VENV)/.dali

$(VENV)/.dali: $(VENV)/.installed requirements-dali.txt
	$(PY) -m pip install -q -r requirements-dali.txt
	touch $@

test: setup mmseg dali
	$(PY) -m pytest -q --durations=20

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: setup
	TEACHER="$(TEACHER)" TEACHER_CHECKPOINT="$(TEACHER_CHECKPOINT)" $(PY) -m pretrain.demo

clean:
	rm -rf $(VENV) demo_output
