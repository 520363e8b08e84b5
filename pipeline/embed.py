"""Embed stage: dataset -> Parquet embedding shards + manifest, resumable and idempotent.

Order of work: ingest the dataset; check the run directory's lock (the config it was
made with); skip the input records already covered by finished shards; embed the rest
block by block, each block written as one shard through an atomic rename; finally write
``rejects.jsonl`` and ``manifest.json`` (last).  A crash or Ctrl-C loses at most the
shard in progress; a rerun finishes the job with exactly the same rows.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from embeddings import shards
from embeddings.encode import embed_texts, iter_image_embeddings
from embeddings.encoders import Encoder, load_encoder, resolve_device
from embeddings.errors import RunMismatch
from embeddings.records import CaptionRecord, Dataset, ImageRecord, load_dataset

from .config import EmbedConfig

log = logging.getLogger(__name__)
LOCK = "config.json"
PACKAGES = ("torch", "open_clip_torch", "sentence-transformers", "pyarrow", "numpy", "pillow",
            "multimodal-embeddings")


@dataclass
class EmbedResult:
    run_dir: Path
    new_shards: int
    rows: dict[str, int]
    rejects: dict[str, int]
    seconds: float
    nothing_to_do: bool = False
    throughput: dict[str, float] | None = None  # items/s per kind for this run's new work

    def rate_summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}/s" for k, v in (self.throughput or {}).items())


def run_embed(cfg: EmbedConfig) -> EmbedResult:
    """Run (or resume) the embed stage described by ``cfg``."""
    t0 = time.perf_counter()
    ds = load_dataset(cfg.data.path, cfg.data.root, cfg.data.format)
    log.info("ingest: %s", ds.summary())
    base = shards.stage_dir(cfg.out)
    spec = _lock_spec(cfg, ds)
    _check_lock(base, "spec", spec)
    for tmp in base.glob("*/.part-*.tmp"):  # left over by an interrupted run
        tmp.unlink()

    done = {kind: _finished(base, kind) for kind in shards.KINDS}
    todo_images = _todo(ds.images, done["images"])
    todo_captions = _todo(ds.captions, done["captions"])
    manifest_path = base / shards.MANIFEST
    if not todo_images and not todo_captions and manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("complete"):
            log.info("nothing to do: %s is complete (%d image rows, %d caption rows)",
                     base, manifest["rows"]["images"], manifest["rows"]["captions"])
            return EmbedResult(Path(cfg.out), 0, manifest["rows"],
                               manifest["rejects"]["by_reason"], time.perf_counter() - t0, True)

    device = resolve_device(cfg.device)
    encoders = [load_encoder(s, device) for s in cfg.encoders]
    columns = _columns(encoders, cfg.dtype)
    base.mkdir(parents=True, exist_ok=True)
    _check_lock(base, "columns", columns)
    _write_lock(base, spec, columns)

    new = 0
    rates: dict[str, float] = {}
    try:
        t = time.perf_counter()
        new += _embed_images(cfg, ds, todo_images, encoders, device,
                             _next_index(done["images"]))
        if todo_images:
            rates["images"] = len(todo_images) / (time.perf_counter() - t)
        t = time.perf_counter()
        new += _embed_captions(cfg, todo_captions, encoders, _next_index(done["captions"]))
        if todo_captions:
            rates["captions"] = len(todo_captions) / (time.perf_counter() - t)
    except KeyboardInterrupt:
        log.warning("interrupted: the %d shard(s) finished so far are kept; rerun to resume", new)
        raise
    manifest = _finalise(cfg, ds, columns)
    return EmbedResult(Path(cfg.out), new, manifest["rows"], manifest["rejects"]["by_reason"],
                       time.perf_counter() - t0, throughput=rates)


# ------------------------------------------------------------------------- lock file

def _lock_spec(cfg: EmbedConfig, ds: Dataset) -> dict[str, Any]:
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "data": {"source": str(Path(ds.source).resolve()), "root": str(ds.root),
                 "format": ds.format},
        "encoders": [asdict(e) for e in cfg.encoders],
        "dtype": cfg.dtype, "shard_size": cfg.shard_size, "max_pixels": cfg.max_pixels,
    }


def _check_lock(base: Path, key: str, value: Any) -> None:
    path = base / LOCK
    if not path.exists():
        return
    old = json.loads(path.read_text()).get(key)
    if old is not None and old != json.loads(json.dumps(value)):
        diff = _diff(old, value)
        raise RunMismatch(
            f"{base.parent} was made with a different {'model' if key == 'columns' else 'config'}"
            f" ({diff}); refusing to mix them. Use another output directory (--out) or delete "
            f"{base} to start over.")


def _diff(old: Any, new: Any, path: str = "") -> str:
    new = json.loads(json.dumps(new))
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _diff(a, b, f"{path}[{i}]")
    return f"{path or 'value'}: was {old!r}, now {new!r}"


def _write_lock(base: Path, spec: dict[str, Any], columns: dict[str, Any]) -> None:
    path = base / LOCK
    if not path.exists():
        shards.atomic_write_json(path, {"spec": spec, "columns": columns})


def _columns(encoders: Sequence[Encoder], dtype: str) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    for e in encoders:
        prov = e.provenance()
        for modality, kind in (("image", "images"), ("text", "captions")):
            if modality in e.modalities:
                cols[f"{e.spec.name}_{modality}"] = {
                    "kind": kind, "encoder": e.spec.name, "modality": modality,
                    "dtype": dtype, **prov}
    return cols


# ------------------------------------------------------------------------ resumption

def _finished(base: Path, kind: str) -> dict[int, dict[str, Any]]:
    """Finished shards of ``kind``: index -> shard info (inputs covered, rejects)."""
    out = {}
    for path in sorted((base / kind).glob("part-*.parquet")):
        out[int(path.stem.split("-")[1])] = shards.shard_info(path)
    return out


def _todo(records: Sequence[Any], done: dict[int, dict[str, Any]]) -> list[Any]:
    covered = {rid for info in done.values() for rid in info["inputs"]}
    return [r for r in records if r.id not in covered]


def _next_index(done: dict[int, Any]) -> int:
    return max(done, default=-1) + 1


def _blocks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def _bar(cfg: EmbedConfig, total: int, unit: str, desc: str) -> tqdm:
    return tqdm(total=total, unit=unit, desc=desc, disable=not cfg.progress, dynamic_ncols=True,
                smoothing=0.1)


# ------------------------------------------------------------------------- embedding

def _image_rows(records: Sequence[ImageRecord]) -> dict[str, list[Any]]:
    return {"id": [r.id for r in records], "image": [r.image for r in records],
            "split": [r.split for r in records], "label": [r.label for r in records],
            "labels": [list(r.labels) for r in records],
            "captions": [list(r.captions) for r in records]}


def _caption_rows(records: Sequence[CaptionRecord]) -> dict[str, list[Any]]:
    return {"id": [r.id for r in records], "image_id": [r.image_id for r in records],
            "caption": [r.caption for r in records], "split": [r.split for r in records],
            "label": [r.label for r in records], "labels": [list(r.labels) for r in records]}


def _write(cfg: EmbedConfig, kind: str, index: int, inputs: Sequence[Any], kept: list[int],
           vectors: dict[str, np.ndarray], rejects: list[tuple[int, str]]) -> None:
    records = [inputs[i] for i in kept]
    rows = _image_rows(records) if kind == "images" else _caption_rows(records)
    info = {"inputs": [r.id for r in inputs],
            "rejects": [{"kind": kind, "id": inputs[i].id, "reason": why} for i, why in rejects]}
    shards.write_shard(shards.stage_dir(cfg.out) / shards.shard_name(kind, index), kind, rows,
                       vectors, cfg.dtype, info)


def _embed_images(cfg: EmbedConfig, ds: Dataset, todo: list[ImageRecord],
                  encoders: Sequence[Encoder], device: Any, first: int) -> int:
    image_encoders = [e for e in encoders if "image" in e.modalities]
    if not todo or not image_encoders:
        return 0
    blocks = _blocks(len(todo), cfg.shard_size)
    pending = {e.spec.name: [np.zeros((0, e.dim), np.float32)] for e in image_encoders}
    kept: list[int] = []
    failed: list[tuple[int, str]] = []
    b = seen = 0
    with _bar(cfg, len(todo), "img", "images") as bar:
        stream = iter_image_embeddings(ds.root, [r.image for r in todo], encoders, device=device,
                                       batch_size=cfg.batch_size, workers=cfg.workers,
                                       max_pixels=cfg.max_pixels)
        for batch in stream:
            kept += batch.indices
            failed += batch.failures
            for name, vec in batch.vectors.items():
                pending[name].append(vec)
            seen += len(batch.indices) + len(batch.failures)
            bar.update(len(batch.indices) + len(batch.failures))
            bar.set_postfix(skipped=len(failed), refresh=False)
            # Batches never overlap blocks out of order, so flush every block now complete.
            while b < len(blocks) and seen >= blocks[b].stop:
                _flush_block(cfg, "images", first + b, todo, blocks[b], kept, failed, pending)
                b += 1
    return len(blocks)


def _flush_block(cfg: EmbedConfig, kind: str, index: int, todo: Sequence[Any], block: range,
                 kept: list[int], failed: list[tuple[int, str]],
                 pending: dict[str, list[np.ndarray]]) -> None:
    """Write the rows of ``block`` (absolute positions in ``todo``) and drop them."""
    mine = [i for i in kept if i < block.stop]
    vectors = {}
    for name, parts in pending.items():
        allv = np.concatenate(parts)
        vectors[f"{name}_image"] = allv[:len(mine)]
        pending[name] = [allv[len(mine):]]
    bad = [(i, r) for i, r in failed if i < block.stop]
    inputs = list(todo[block.start:block.stop])
    _write(cfg, kind, index, inputs, [i - block.start for i in mine], vectors,
           [(i - block.start, r) for i, r in bad])
    kept[:] = [i for i in kept if i >= block.stop]
    failed[:] = [(i, r) for i, r in failed if i >= block.stop]


def _embed_captions(cfg: EmbedConfig, todo: list[CaptionRecord], encoders: Sequence[Encoder],
                    first: int) -> int:
    if not todo or not any("text" in e.modalities for e in encoders):
        return 0
    blocks = _blocks(len(todo), cfg.shard_size)
    with _bar(cfg, len(todo), "txt", "captions") as bar:
        for b, block in enumerate(blocks):
            inputs = todo[block.start:block.stop]
            # A whole block per call: text models may reorder it by length to save padding.
            vectors = embed_texts([r.caption for r in inputs], encoders, cfg.batch_size)
            _write(cfg, "captions", first + b, inputs, list(range(len(inputs))),
                   {f"{name}_text": vec for name, vec in vectors.items()}, [])
            bar.update(len(inputs))
    return len(blocks)


# -------------------------------------------------------------------------- manifest

def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _finalise(cfg: EmbedConfig, ds: Dataset, columns: dict[str, Any]) -> dict[str, Any]:
    base = shards.stage_dir(cfg.out)
    shard_list: dict[str, list[dict[str, Any]]] = {}
    rejects = [r.to_dict() for r in ds.rejects]
    for kind in shards.KINDS:
        shard_list[kind] = []
        for index, info in sorted(_finished(base, kind).items()):
            name = shards.shard_name(kind, index)
            n_in, n_bad = len(info["inputs"]), len(info["rejects"])
            shard_list[kind].append({"file": name, "rows": n_in - n_bad, "inputs": n_in,
                                     "rejects": n_bad})
            rejects += info["rejects"]
    rows = {k: sum(s["rows"] for s in v) for k, v in shard_list.items()}
    by_reason = Counter(_reason_class(r["reason"]) for r in rejects)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
    shards.atomic_write_bytes(base / shards.REJECTS, lines.encode())
    manifest = {
        "schema_version": shards.SCHEMA_VERSION,
        "stage": "embed",
        "complete": True,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "dataset": {"source": ds.source, "format": ds.format, "root": str(ds.root),
                    "images": len(ds.images), "captions": len(ds.captions)},
        "config": {"dtype": cfg.dtype, "shard_size": cfg.shard_size,
                   "max_pixels": cfg.max_pixels, "normalized": True},
        "columns": columns,
        "rows": rows,
        "shards": shard_list,
        "rejects": {"count": len(rejects), "by_reason": dict(sorted(by_reason.items())),
                    "file": shards.REJECTS, "items": rejects},
        "versions": _versions(),
    }
    shards.atomic_write_json(base / shards.MANIFEST, manifest)
    return manifest


def _reason_class(reason: str) -> str:
    """The reason without its specifics, for counting ("image too large: 9000x9000")."""
    return reason.split(":")[0].split(" (")[0]
