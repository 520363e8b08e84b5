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
# Overrides for `make index / search / eval-retrieval`: OUT (run dir), FACTORY, Q (query
# text), IMAGE (query image), K, SPLIT, ARGS (any other options, e.g. ARGS="--json").
RUN_ARGS = $(if $(OUT),--run $(OUT))
INDEX_ARGS = $(RUN_ARGS) $(if $(FACTORY),--factory "$(FACTORY)") $(ARGS)
SEARCH_ARGS = $(RUN_ARGS) $(if $(Q),"$(Q)") $(if $(IMAGE),--image "$(IMAGE)") \
	$(if $(K),--k $(K)) $(if $(SPLIT),--split $(SPLIT)) $(ARGS)
# Overrides for `make heads / predict`: OUT (run dir), HEADS (comma list, e.g.
# HEADS=logistic,concat,late), HEAD (saved head .json, for predict), PRED (output .parquet).
HEADS_ARGS = $(RUN_ARGS) $(if $(HEADS),--heads $(HEADS))
TINY := models/tiny-clip

.PHONY: setup demo embed tiny-model test lint bench bench-embed bench-embed-gpu clean index search eval-retrieval bench-search heads predict bench-heads

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

# The main job on the bundled demo data, offline (tiny random CLIP + real MiniLM):
# embed, train and compare heads, index, evaluate retrieval.
demo: setup tiny-model
	$(PY) -m pipeline embed --config configs/offline.toml $(EMBED_ARGS)
	$(PY) -m pipeline heads --config configs/offline.toml $(HEADS_ARGS)
	$(PY) -m pipeline index --config configs/offline.toml $(RUN_ARGS)
	$(PY) -m pipeline eval-retrieval --config configs/offline.toml $(RUN_ARGS)

# The default config: pretrained ViT-B-32 + all-MiniLM-L6-v2 (downloads on first use).
embed: setup
	$(PY) -m pipeline embed --config $(CONFIG) $(EMBED_ARGS)

# FAISS indexes over the run's embeddings (incremental: reruns add new shards only).
index: setup
	$(PY) -m pipeline index --config $(CONFIG) $(INDEX_ARGS)

# make search Q="a red bicycle"   |   make search IMAGE=photo.jpg K=5 ARGS="--modality text"
search: setup
	$(PY) -m pipeline search --config $(CONFIG) $(SEARCH_ARGS)

# Text->image and image->text recall@1/5/10, through the index and exactly.
eval-retrieval: setup
	$(PY) -m pipeline eval-retrieval --config $(CONFIG) $(RUN_ARGS) $(if $(SPLIT),--split $(SPLIT)) $(ARGS)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: bench-embed bench-search bench-heads

# Decode paths (naive PIL loop, exact, fast) on generated 640x480 JPEGs, decode-only and
# end to end with the tiny and ViT-B-32 architectures (random weights), CPU.
bench-embed: setup
	$(PY) benchmarks/bench_embed.py $(ARGS)

# The same on one GPU against the encoder-only limit (ViT-B-32, ViT-L-14; >= 20,000 JPEGs).
bench-embed-gpu: setup
	$(PY) benchmarks/bench_embed_gpu.py $(ARGS)

# Brute force (numpy, torch, FAISS Flat) vs the chosen index at 100k and 1M x 512;
# ARGS="--quick" for a short run, ARGS="--sizes 300000" for other sizes.
bench-search: setup
	$(PY) benchmarks/bench_search.py $(ARGS)

clean:
	rm -rf runs models

# Train and compare the [heads] of the config on a run (tables and plots in RUN/heads).
heads: setup
	$(PY) -m pipeline heads --config $(CONFIG) $(HEADS_ARGS)

# A saved head on a run's shards: make predict HEAD=runs/demo/heads/models/NAME.json
predict: setup
	$(if $(HEAD),,$(error set HEAD=RUN/heads/models/NAME.json))
	$(PY) -m pipeline predict --head $(HEAD) --run $(or $(OUT),runs/demo) $(if $(PRED),--out $(PRED))

# Every head on 50,000 x (512 + 512)-d synthetic features, vs scikit-learn defaults.
bench-heads: setup
	$(PY) benchmarks/bench_heads.py $(ARGS)
