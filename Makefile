# echosearch: `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On this machine torch/torchvision come from local disk; elsewhere override, e.g.
#   make setup TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS_HASH := $(shell cat pyproject.toml | sha256sum | cut -c1-16)
CACHE_DIR ?= $(HOME)/.cache/echosearch/venv-$(DEPS_HASH)
STAMP := $(VENV)/.setup-$(DEPS_HASH)
DEMO_DIR ?= indexes/demo
export ECHOSEARCH_LOG_LEVEL ?= WARNING

.PHONY: setup demo test browser orthanc bench bench-model app lint typecheck clean-demo demo-model device-prep

setup: $(STAMP)

# The ~6.8 GB environment is built once per dependency spec (cached under ~/.cache/echosearch) and
# linked as .venv; the project itself is installed editable into it (fast).
$(STAMP): pyproject.toml
	@set -e; \
	if [ -d "$(VENV)" ] && [ ! -L "$(VENV)" ]; then \
	  echo "updating the existing $(VENV) in place"; \
	  "$(BIN)/pip" install -q -e ".[dev]"; \
	else \
	  if [ ! -f "$(CACHE_DIR)/.complete" ]; then \
	    echo "building environment in $(CACHE_DIR) (once per dependency spec, several minutes)"; \
	    rm -rf "$(CACHE_DIR)"; mkdir -p "$$(dirname $(CACHE_DIR))"; \
	    $(PY) -m venv "$(CACHE_DIR)"; \
	    "$(CACHE_DIR)/bin/pip" install -q --upgrade pip setuptools wheel; \
	    "$(CACHE_DIR)/bin/pip" install -q $(TORCH_SPEC); \
	    "$(CACHE_DIR)/bin/pip" install -q -e ".[dev]"; \
	    touch "$(CACHE_DIR)/.complete"; \
	  fi; \
	  ln -sfn "$(CACHE_DIR)" "$(VENV)"; \
	  "$(BIN)/pip" install -q --no-deps --no-build-isolation -e . ; \
	fi; \
	rm -f $(VENV)/.setup-*; touch "$(STAMP)"

demo: setup
	$(BIN)/python -m echosearch.demo --out $(DEMO_DIR)

# The browser test drives Debian's Chromium, the intake tests Debian's Orthanc; install them when missing
# (these machines run as root).
test: setup browser orthanc
	$(BIN)/python -m pytest -q

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium: the browser test will be skipped"; }

orthanc:
	@command -v Orthanc >/dev/null 2>&1 && dpkg -s orthanc-dicomweb >/dev/null 2>&1 || { \
	  echo "installing Debian's orthanc and orthanc-dicomweb for the intake tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    orthanc orthanc-dicomweb >/dev/null && (systemctl disable --now orthanc >/dev/null 2>&1 || true)) \
	  || echo "warning: could not install orthanc: the intake tests against Orthanc will be skipped"; }

bench: setup
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/encode.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/context_search.py

# Model quality over several fresh small cohorts (mean and spread; ~20 s per cohort and model).
bench-model: setup
	$(BIN)/python bench/model_quality.py

# For a session lent a GPU machine (no network there, 64 MiB a call): the wheels its image lacks and the echo
# DICOMs of shared/testdata, then the one command to run there (docs/encode.md, "GPU check").
REAL_DICOM ?= ../shared/testdata/real-dicom
DEVICE_WHEELS := open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 pydicom==3.0.2 pylibjpeg==2.1.0 \
	pylibjpeg-libjpeg==2.5.0 pylibjpeg-openjpeg==2.6.0 pylibjpeg-rle==2.2.0
device-prep: setup
	@set -e; mkdir -p .whl .devdata; \
	for w in $(DEVICE_WHEELS); do \
	  $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    $(foreach n,17 24 27 28 31 34 35 38 39,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 \
	    -d .whl $$w; done; \
	cp $(REAL_DICOM)/*echo*.dcm $(REAL_DICOM)/US1_J2KR.dcm .devdata/; \
	du -sh .whl .devdata; \
	echo 'device run, carry [".whl", ".devdata"], timeout_s 540:'; \
	echo 'python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$$PWD/.site:$$PWD PYTHONUNBUFFERED=1 && timeout 480 python3 bench/device_check.py --data .devdata --json $$OUT/device.json 2>&1 | tee $$OUT/log'

app: setup
	@test -f $(DEMO_DIR)/index/catalog.duckdb || $(MAKE) demo
	@# the demo's own key (synthetic data only): file locations are sealed with it
	@ECHOSEARCH_SECRET="$$(cat $(DEMO_DIR)/demo-secret.txt)" $(BIN)/echosearch serve --index $(DEMO_DIR)/index

lint: setup
	$(BIN)/ruff check echosearch app tests bench
	$(BIN)/mypy

# Retrain the shipped demo model (documented seed and cohort; ~15-25 min on 2 CPU cores).
demo-model: setup
	$(BIN)/python -m echosearch.model.demo_model --out echosearch/data/echosearch-demo

clean-demo:
	rm -rf $(DEMO_DIR)
