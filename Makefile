# Quick start:  make demo   (set up, then embed the bundled demo data offline)
#               make test   (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision builds that pip takes from the local wheel cache on our machines;
# override (e.g. TORCH="torch torchvision") to let pip choose.
TORCH ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/default.toml
OUT ?=
# Overrides for `make embed`: MODEL, PRETRAINED, DATA, OUT, DEVICE, BATCH
EMBED_ARGS = $(if $(MODEL),--model $(MODEL)) $(if $(PRETRAINED),--pretrained $(PRETRAINED)) \
	$(if $(DATA),--data $(DATA)) $(if $(OUT),--out $(OUT)) $(if $(DEVICE),--device $(DEVICE)) \
	$(if $(BATCH),--batch-size $(BATCH))
TINY := models/tiny-clip

.PHONY: setup demo embed tiny-model test lint bench bench-embed clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

$(TINY)/open_clip_config.json: | setup
	$(PY) -m pipeline tiny-model --out $(TINY)

tiny-model: $(TINY)/open_clip_config.json

# The main job on the bundled demo data, offline (tiny random CLIP + real MiniLM).
demo: setup tiny-model
	$(PY) -m pipeline embed --config configs/offline.toml $(EMBED_ARGS)

# The default config: pretrained ViT-B-32 + all-MiniLM-L6-v2 (downloads on first use).
embed: setup
	$(PY) -m pipeline embed --config $(CONFIG) $(EMBED_ARGS)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: bench-embed

bench-embed: setup tiny-model
	$(PY) benchmarks/bench_embed.py

clean:
	rm -rf runs models
