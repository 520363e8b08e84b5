"""The unit of work of the embed stage: one block of input records -> its two shards.

:func:`embed_block` embeds a block's images and captions with every encoder (no file
written); :func:`write_block` writes the block's image shard and caption shard through
the store.  Every engine (local, Ray) runs exactly these two, so a run started with one
engine can be finished with another; :class:`Models` loads the encoders once per process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from embeddings.decode import decode_provenance
from embeddings.encode import (
    Decoded,
    ImageFiles,
    embed_texts,
    iter_decoded_embeddings,
    iter_image_embeddings,
)
from embeddings.encoders import Encoder, load_encoder
from embeddings.ingest import Block
from embeddings.ingest.sidecar import account
from embeddings.sources import ImageSource, MemorySource
from embeddings.store import (
    MODALITY_KIND,
    Column,
    Run,
    ShardInfo,
    ShardRecord,
    column_name,
    prints_table,
    shard_bytes,
)

from .config import EmbedConfig


@dataclass
class Models:
    """The encoders of a run, loaded on first need (a finished run loads none)."""

    cfg: EmbedConfig
    device: torch.device
    encoders: list[Encoder] = field(default_factory=list)
    columns: dict[str, Column] = field(default_factory=dict)

    def load(self) -> Models:
        if not self.encoders:
            self.encoders = [load_encoder(s, self.device) for s in self.cfg.encoders]
            images = [e for e in self.encoders if "image" in e.modalities]
            # How pixels were made is recorded with the image columns (not identity: the
            # fast path agrees with the exact one to cosine >= 0.9999, tests/test_decode.py).
            path = "exact" if self.cfg.engine == "ray" else self.cfg.decode  # Ray decodes exact
            decode = decode_provenance(path, self.device, images) if images else {}
            self.columns = {
                column_name(e.spec.name, m): Column(
                    column_name(e.spec.name, m), MODALITY_KIND[m], e.spec.name, m,
                    self.cfg.dtype, replace(e.provenance(), extra=decode if m == "image" else {}))
                for e in self.encoders for m in ("image", "text") if m in e.modalities}
        return self


@dataclass
class BlockResult:
    """One embedded block: kept rows, their vectors and the rejects, per kind."""

    image_rows: list[int]
    image_vectors: dict[str, np.ndarray]
    image_rejects: list[tuple[int, str]]
    caption_vectors: dict[str, np.ndarray]
    image_prints: list[Any] | None = None  # per kept row: (digest, phash, pixels) | None


def embed_block(block: Block, source: ImageSource, models: Models, cfg: EmbedConfig,
                decoded: Sequence[Decoded] | None = None) -> BlockResult:
    """Embed the images and captions of one block with every encoder (no file written).

    ``block``: a ready block (:meth:`Block.ready`); its images are read from ``source``,
    or from the bytes the block carries (tar shards).  ``decoded``: the block's images
    already read by :func:`decode_block` (elsewhere, by an engine that decodes apart from
    the models); by default they are read here."""
    encoders = models.load().encoders
    kept: list[int] = []
    prints: list[Any] = []
    failed: list[tuple[int, str]] = []
    parts: dict[str, list[np.ndarray]] = {}
    image_encoders = [e for e in encoders if "image" in e.modalities]
    if block.image_table.num_rows and image_encoders:
        batches = iter_image_embeddings(
            block_source(block, source), block.image_column("image"), encoders,
            device=models.device,
            batch_size=cfg.batch_size, workers=cfg.workers, max_pixels=cfg.max_pixels,
            decode=cfg.decode,
        ) if decoded is None else iter_decoded_embeddings(decoded, encoders,
                                                           batch_size=cfg.batch_size)
        for batch in batches:
            kept += batch.indices
            prints += batch.prints or [None] * len(batch.indices)
            failed += batch.failures
            for name, vec in batch.vectors.items():
                parts.setdefault(column_name(name, "image"), []).append(vec)
    image_vectors = {column_name(e.spec.name, "image"): np.concatenate(
        parts.get(column_name(e.spec.name, "image"), []) or [np.zeros((0, e.dim), np.float32)])
        for e in image_encoders}
    # A whole block per call: text models may reorder it by length to save padding.
    texts = embed_texts(block.caption_column("caption"), encoders, cfg.batch_size)
    caption_vectors = {column_name(n, "text"): v for n, v in texts.items()}
    return BlockResult(kept, image_vectors, failed, caption_vectors, prints)


def decode_block(block: Block, source: ImageSource,
                 transforms: Sequence[Callable[[Any], torch.Tensor]],
                 max_pixels: int) -> list[Decoded]:
    """The CPU half of :func:`embed_block`: read, decode and preprocess the (ready)
    block's images with the image encoders' transforms (:func:`image_transforms`), in
    input order."""
    files = ImageFiles(block_source(block, source), block.image_column("image"), transforms,
                       max_pixels)
    return [files[i] for i in range(len(files))]


def block_source(block: Block, source: ImageSource) -> ImageSource:
    """Where a block's images are read: the bytes it carries (a tar shard read whole),
    else the dataset's source."""
    return MemorySource(block.payload) if block.payload is not None else source


def load_block(block: Block) -> Block:
    """A block with its rows: a pending one (a tar shard) is read now, in this process."""
    return block.ready()


def image_transforms(models: Models) -> list[Callable[[Any], torch.Tensor]]:
    return [e.image_transform for e in models.load().encoders
            if "image" in e.modalities and e.image_transform is not None]


def write_block(run: Run, block: Block, result: BlockResult,
                dtype: str) -> tuple[ShardRecord, ShardRecord]:
    """Write the image shard then the caption shard of ``block``; their records."""
    ids = block.image_column("id")
    ingest = [r.to_dict() for r in block.rejects]
    embed_rejects = [{"kind": "images", "id": ids[i], "reason": why}
                     for i, why in result.image_rejects]
    # Image shards list the rejects of images, tar shards and tar members; caption shards
    # those of captions.
    img_info = ShardInfo(block.index, ids,
                         [r for r in ingest if r["kind"] != "captions"] + embed_rejects)
    cap_info = ShardInfo(block.index, block.caption_column("id"),
                         [r for r in ingest if r["kind"] == "captions"])
    if block.sidecar is not None:  # img2dataset's accounting for this shard
        img_info = replace(img_info, sidecar=account(
            block.sidecar, [ids[i] for i in result.image_rows],
            [r["id"] for r in img_info.rejects]))
    kept = block.image_table.take(pa.array(result.image_rows, pa.int64()))
    img = run.embed.write_shard("images", block.index, shard_bytes(
        "images", kept, result.image_vectors, dtype, img_info,
        prints_table(result.image_prints or None, len(result.image_rows))))
    cap = run.embed.write_shard("captions", block.index, shard_bytes(
        "captions", block.caption_table, result.caption_vectors, dtype, cap_info))
    return img, cap


# ----------------------------------------------------------------- for the engines

Done = dict[int, tuple[ShardRecord, ShardRecord]]


@dataclass
class EngineJob:
    """What an engine needs besides the blocks: where to write, with what, and the
    driver's progress bar (``progress.block_done(block)`` once a block's shards are in)."""

    run: Run
    source: ImageSource  # where the images of blocks without their bytes are read
    models: Models  # loaded on the driver (identity checked); engines may load more
    cfg: EmbedConfig
    progress: Any  # pipeline.embed._Progress
    lease: str = ""  # token of the driver's embed lock: workers write only while it is held
