# `make demo` and `make test` work on a fresh machine: they create .venv when missing and install the
# package with its extras under constraints.txt; later calls reuse it (the stamp file) in seconds.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.bigdit-installed
DEMO_DIR ?= runs/demo
DEMO_DATA ?= runs/data/digits-wds
DEMO_ARGS ?=
SAMPLE_ARGS ?= num_samples=900 labels=balanced batch_size=150 sampler=ddpm steps=100 cfg_scale=1.5
SAMPLE_RANKS ?= 2
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast clean-demo wheelhouse

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip setuptools wheel
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

# Encode the 1,797 real 8x8 digits into WebDataset shards (pixels as "latents"), train a
# class-conditional DiT from them with 2 processes, sample 90 of every digit with guidance on 2 ranks, and
# score the samples on both axes: accuracy (an independent classifier) and digits FD (diversity too).
# Rerunning skips finished shards, resumes runs/demo and skips a finished sample set.
demo: setup
	$(PY) tools/encode_latents.py input=sklearn:digits vae=none format=wds out=$(DEMO_DATA) shard_size=100 flip=false
	PYTHON=$(PY) launchers/torchrun.sh 2 experiment=demo data=digits_wds data.root=$(DEMO_DATA) \
		strategy=deepspeed strategy.zero_stage=2 run.dir=$(DEMO_DIR) $(DEMO_ARGS)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(SAMPLE_RANKS) tools/sample.py run=$(DEMO_DIR) \
		out=$(DEMO_DIR)/samples $(SAMPLE_ARGS)
	$(PY) tools/eval_digits.py samples=$(DEMO_DIR)/samples/samples.npz run=$(DEMO_DIR)

# The SLURM tests (tests/test_slurm.py) need a cluster: as root, launchers/slurm_cluster.sh installs and starts a
# single-node one (a no-op when one already answers); without one those tests skip with the reason (fail under CI).
# Two pytest workers, one test file each at a time: the SLURM and multi-rank tests spend much of their time
# waiting (slowed data, signals, requeues), which the other worker's tests fill.
test: setup
	@if [ "$$(id -u)" = 0 ]; then launchers/slurm_cluster.sh || echo "make test: no SLURM cluster, the SLURM tests will skip"; \
	else launchers/slurm_cluster.sh --check || echo "make test: no SLURM cluster (start one: sudo launchers/slurm_cluster.sh)"; fi
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The fast tier for quick iteration (under 3 minutes here): every test not marked `slow`, i.e. none that
# launches processes (torchrun ranks, tools as subprocesses) or SLURM jobs or runs over ~10 s. `make test` runs both.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow" tests

clean-demo:
	rm -rf $(DEMO_DIR) $(DEMO_DATA)

# The wheels bench/gpu.sh needs on a GPU machine without network (its own Python 3.12 and CUDA torch): hydra-core,
# omegaconf, diffusers and what they require, at constraints.txt's pins, for cp312 manylinux x86_64 (no torch, no
# nvidia packages, no numpy/Pillow/matplotlib: the image has them). Carry wheelhouse/ with the tree (~14 MiB).
wheelhouse: setup
	$(PY) bench/wheelhouse.py build --out wheelhouse
