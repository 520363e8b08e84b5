"""The Ray engine: the embed stage's remaining blocks as one Ray Data pipeline.

One row per block.  Stage 1, CPU tasks (``map_batches``): read the block where it is
pending (a tar shard, local or remote, read whole in the task), then read, decode and
preprocess its images from the image source, which travels with the task
(:func:`pipeline.unit.decode_block`): images need no filesystem shared with the driver.
Stage 2, an actor pool: each actor loads the models once (one GPU each on GPU nodes, as
many actors as GPUs; CPU actors otherwise), embeds the block
(:func:`pipeline.unit.embed_block`) and writes its two shards straight into the run
directory (:func:`pipeline.unit.write_block`), so the run directory must be on a
filesystem every node sees.  Only the shard records come back to the driver, which
reports progress and, after the last block, writes the manifest.

Faults: a task or actor that dies is restarted and its block retried by Ray; shards
appear by atomic rename of uniquely named temporary files, so a retried block rewrites
its shards whole.  A killed driver takes its job's workers with it (Ray may take
seconds to notice): before each block's shards an actor checks that the driver still
holds the run's embed lock (:func:`embeddings.store.still_held`, the lease) and writes
nothing once it does not.  Rerunning the same command resumes from the finished shards,
like the local engine.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.data
import torch
from ray.exceptions import RayError

from embeddings.encode import Decoded
from embeddings.encoders import resolve_device
from embeddings.errors import UserError
from embeddings.ingest import Block
from embeddings.ray_cluster import connect
from embeddings.sources import ImageSource
from embeddings.store import Run, still_held

from .config import EmbedConfig
from .unit import (
    Done,
    EngineJob,
    Models,
    decode_block,
    embed_block,
    image_transforms,
    load_block,
    write_block,
)

log = logging.getLogger(__name__)
DECODE_CPUS = 0.5  # CPUs reserved per decoding task
CPU_THREADS = 4  # torch threads of a CPU actor; one CPU actor per this many cluster CPUs
CRASH_ONCE_ENV = "MMEMB_RAY_CRASH_ONCE"  # fault injection (tests): a marker file path;
# the first actor call that creates it exits at once, mid-block, before writing.


def run_blocks(job: EngineJob, blocks: Iterable[Block]) -> Done:
    """Embed ``blocks`` on the cluster of ``job.cfg.ray_address`` (default: a new local
    one); the records of the blocks finished, as the local engine returns them."""
    started = connect(job.cfg.ray_address)
    try:
        return _run(job, list(blocks))
    finally:
        if started:
            ray.shutdown()


def _run(job: EngineJob, blocks: list[Block]) -> Done:
    cfg = job.cfg
    if not blocks:
        return {}
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    actors = gpus or max(1, cpus // CPU_THREADS)
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # the driver's own bar counts finished blocks
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    items = [{"index": b.index, "block": pickle.dumps(b)} for b in blocks]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(  # half a CPU: reads overlap decoding; unlike the actors' resources,
        # which keeps Ray Data from fusing this stage into the actors (decoding in turn)
        _decode, batch_size=1, batch_format="numpy", num_cpus=DECODE_CPUS,
        fn_kwargs={"source": job.source, "transforms": image_transforms(job.models),
                   "max_pixels": cfg.max_pixels})
    ds = ds.map_batches(
        _Embedder, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if gpus else 0, num_cpus=1,  # dead actors: restarted, block retried
        fn_constructor_kwargs={"cfg": cfg, "run": str(job.run.path.resolve()),
                               "source": job.source, "lease": job.lease,
                               "crash_marker": os.environ.get(CRASH_ONCE_ENV)})
    log.info("ray: %d blocks on %d %s actor(s) (cluster: %d CPUs, %d GPUs)", len(blocks),
             actors, "GPU" if gpus else "CPU", cpus, gpus)
    done: Done = {}
    t0 = time.perf_counter()
    try:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            for index, records in zip(batch["index"], batch["records"]):
                done[int(index)] = pickle.loads(records)
                job.progress.block_done(done[int(index)])
    except RayError as e:
        _raise_user_error(e)
        raise
    seconds = time.perf_counter() - t0
    images = sum(img.inputs for img, _ in done.values())
    log.info("ray: %d blocks, %d images in %.1f s (%.1f images/s)", len(done), images,
             seconds, images / max(seconds, 1e-9))
    return done


def _raise_user_error(error: BaseException) -> None:
    """A user mistake met on a worker (a bad file, a full disk) is said on one line."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, UserError):
            raise seen from None
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__


# ----------------------------------------------------------------- stage 1: CPU tasks

def _decode(batch: dict[str, np.ndarray], source: ImageSource, transforms: list[Any],
            max_pixels: int) -> dict[str, np.ndarray]:
    """Read and preprocess the images of each block of the batch (one, in practice); the
    block goes on with its rows (a pending one read here) but without the image bytes."""
    torch.set_num_threads(1)  # decoding tasks must not fight the models for cores
    out, blocks = [], []
    for raw in batch["block"]:
        block = load_block(pickle.loads(raw))
        items = decode_block(block, source, transforms, max_pixels)
        out.append(pickle.dumps(_pack(items), protocol=pickle.HIGHEST_PROTOCOL))
        blocks.append(raw if block.payload is None and block.pending is None else
                      pickle.dumps(replace(block.without_payload(), pending=None),
                                   protocol=pickle.HIGHEST_PROTOCOL))
    return {"index": batch["index"], "block": np.array(blocks, dtype=object),
            "decoded": np.array(out, dtype=object)}


def _pack(items: list[Decoded]) -> dict[str, Any]:
    """Decoded items as one array per transform (cheap to ship) plus the failures."""
    ok = [(i, t, fp) for i, t, _, fp in items if t is not None]
    n_transforms = len(ok[0][1]) if ok else 0
    return {"n": len(items), "ok": [i for i, _, _ in ok], "prints": [fp for _, _, fp in ok],
            "pixels": [torch.stack([t[k] for _, t, _ in ok]).numpy()
                       for k in range(n_transforms)],
            "failures": [(i, why) for i, t, why, _ in items if t is None]}


def _unpack(packed: dict[str, Any]) -> list[Decoded]:
    items: list[Decoded | None] = [None] * packed["n"]
    pixels = [torch.from_numpy(p) for p in packed["pixels"]]
    for j, (i, fp) in enumerate(zip(packed["ok"], packed["prints"])):
        items[i] = (i, tuple(p[j] for p in pixels), None, fp)
    for i, why in packed["failures"]:
        items[i] = (i, None, why, None)
    return [item for item in items if item is not None]


# ------------------------------------------------------------- stage 2: model actors

class _Embedder:
    """One actor: the models, loaded once; embeds blocks and writes their shards."""

    def __init__(self, cfg: EmbedConfig, run: str, source: ImageSource, lease: str = "",
                 crash_marker: str | None = None) -> None:
        device = _actor_device(cfg)
        if device.type == "cpu":
            torch.set_num_threads(min(CPU_THREADS, os.cpu_count() or 1))
        self.cfg, self.source, self.run = cfg, source, Run(Path(run))
        self.lease = lease
        self.models = Models(cfg, device).load()
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for raw, packed in zip(batch["block"], batch["decoded"]):
            block: Block = pickle.loads(raw)
            result = embed_block(block, self.source, self.models, self.cfg,
                                 decoded=_unpack(pickle.loads(packed)))
            if self.crash_marker and _first_claim(self.crash_marker):
                os._exit(1)  # a dying worker, mid-block (tests only)
            if self.lease and not still_held(self.run.embed.dir, self.lease):
                raise DriverGone(f"the driver of the embed run {self.run.path} is gone (its "
                                 f"lock is no longer held): not writing block {block.index}")
            out.append(pickle.dumps(write_block(self.run, block, result, self.cfg.dtype)))
        return {"index": batch["index"], "records": np.array(out, dtype=object)}


class DriverGone(RuntimeError):
    """A worker found its driver's lock released: the run is no longer being written."""


def _actor_device(cfg: EmbedConfig) -> torch.device:
    """The GPU Ray gave this actor (the only one it sees), else the configured device."""
    if ray.get_gpu_ids():
        return torch.device("cuda")
    if cfg.device == "auto":
        return torch.device("cpu")  # no GPU assigned: do not share someone else's
    return resolve_device(cfg.device)


def _first_claim(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True
