# `make demo` and `make test` work on a fresh machine: they create .venv when missing and install the
# package with its extras under constraints.txt; later calls reuse it (the stamp file) in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bigdit-installed
DEMO_DIR ?= runs/demo
DEMO_ARGS ?=
SAMPLE_ARGS ?= per_class=50 sampler=ddpm steps=100 cfg_scale=4.0
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test clean-demo

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

# Train a class-conditional DiT on the 1,797 real 8x8 digits with 2 processes, sample every class with
# guidance, and score the samples with an independent classifier. Rerunning resumes/reuses runs/demo.
demo: setup
	PYTHON=$(PY) launchers/torchrun.sh 2 experiment=demo run.dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(PY) tools/sample.py run=$(DEMO_DIR) $(SAMPLE_ARGS)
	$(PY) tools/eval_digits.py samples=$(DEMO_DIR)/samples/samples.npz run=$(DEMO_DIR)

test: setup
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf $(DEMO_DIR)
