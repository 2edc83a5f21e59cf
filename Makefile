# `make test` / `make demo` work on a fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch/torchvision pinned here (local wheels on our dev machines); requirements.txt holds the
# ranges cluster users may satisfy with their own CUDA build.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DINOV2_REF := dinov2==0.0.1.dev2

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PINS) -r requirements.txt
	# Test-only numerical reference: FAIR's DINOv2 model code (PyPI snapshot, Apr 2023). --no-deps:
	# its pins (torch 2.0, xformers, cuML) concern training code our tests never import.
	$(PY) -m pip install -q --no-deps $(DINOV2_REF)
	touch $@

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

demo: setup
	TEACHER="$(TEACHER)" TEACHER_CHECKPOINT="$(TEACHER_CHECKPOINT)" $(PY) -m pretrain.demo

clean:
	rm -rf $(VENV) demo_output
