"""Embed stage: dataset -> Parquet embedding shards + manifest, resumable and idempotent.

Order of work, under the run's embed lock: open the dataset; check the run's identity
(the config it was made with, the models that made its columns); find the finished
blocks (every shard checked, a corrupt one is said and redone); embed the rest block by
block, each block written as one image shard and one caption shard by atomic renames;
finally write ``rejects.jsonl`` and the manifest (last).  A crash or Ctrl-C loses at most
the block in progress; rerunning the same command finishes the job with exactly the rows
of an uninterrupted run.  The unit of work, :func:`embed_block`, is what any engine runs.
"""

from __future__ import annotations

import itertools
import logging
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from embeddings.encoders import resolve_device
from embeddings.errors import FormatError, InputError, RunMismatch
from embeddings.ingest import Block, Source, TarDataset, open_dataset
from embeddings.ingest.sidecar import summary as sidecar_summary
from embeddings.ingest.sidecar import totals as sidecar_totals
from embeddings.store import (
    KINDS,
    Column,
    EmbedManifest,
    Run,
    RunIdentity,
    ShardInfo,
    ShardRecord,
    check_same_model,
)

from .config import EmbedConfig
from .engines import ENGINES, EngineJob, check_engine
from .unit import Models

log = logging.getLogger(__name__)
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
    throughput: dict[str, float] = field(default_factory=dict)  # items/s of this run's work
    sidecar: dict[str, Any] | None = None  # img2dataset accounting (tar shards with sidecars)

    def rate_summary(self) -> str:
        return ", ".join(f"{k} {v:.1f}/s" for k, v in self.throughput.items())


def run_embed(cfg: EmbedConfig) -> EmbedResult:
    """Run (or resume) the embed stage described by ``cfg``."""
    check_engine(cfg.engine, cfg.ray_address)  # a missing engine fails before any work
    t0 = time.perf_counter()
    run = Run(cfg.run)
    # Under Ray the driver's models serve only the identity checks: the actors embed.
    models = Models(cfg, resolve_device("cpu" if cfg.engine == "ray" else cfg.device))
    source = open_dataset(cfg.data.path, cfg.data.root, cfg.data.format,
                          fields=cfg.data.fields(), net=cfg.data.network())
    with run.lock("embed") as lock:
        spec = _spec(cfg, source)
        recorded = run.embed.read_identity()
        if recorded is not None and _more_shards(recorded.spec, spec):
            recorded = RunIdentity(spec, recorded.columns)  # shards appended: a longer list
            run.embed.write_identity(recorded)
        _check_spec(run, recorded, spec)
        if recorded is not None and _names_other_weights(recorded, cfg):
            _check_columns(run, recorded, models.load().columns)  # even with nothing to do
        done = _finished(run, cfg)
        full = _final_blocks(run, cfg, source, done)
        stats = _Progress(cfg)
        todo = _todo(run, source.blocks(cfg.shard_size, skip=full), done)
        try:
            first = next(todo, None)
            if first is not None:  # models are loaded, and checked, only when there is work
                models.load()
                if recorded is None:
                    recorded = RunIdentity(spec, models.columns)
                    run.embed.write_identity(recorded)
                _check_columns(run, recorded, models.columns)
                job = EngineJob(run, source.image_source, models, cfg, stats, lock.token)
                done.update(ENGINES[cfg.engine](job, itertools.chain([first], todo)))
        except KeyboardInterrupt:
            log.warning("interrupted: the %d block(s) finished in this run are kept (%d in "
                        "all); rerun the same command to resume", stats.blocks,
                        len(done) + stats.blocks)
            raise
        finally:
            stats.close()
        if not done:
            raise InputError(f"{cfg.data.path}: the dataset has no rows to embed")
        if not any(img.rows for img, _ in done.values()):
            _nothing_embedded(run, cfg, source, done)
        if not stats.blocks and run.embed.has_manifest() and _listed(run, done) \
                and _sealed(run, recorded):
            m = run.embed.manifest()
            log.info("nothing to do: %s is complete", run.embed.dir)
            return EmbedResult(run.path, 0, {k: m.rows(k) for k in KINDS},
                               m.reject_counts(), time.perf_counter() - t0, True,
                               sidecar=m.sidecar)
        if recorded is None:
            raise FormatError(f"{run.embed.spec_path} is missing: delete {run.embed.dir} and "
                              "rerun to start over")
        if not recorded.trusted:  # it matches this config (checked above): seal it here
            log.info("sealing %s: its dataset and models are the ones your config names",
                     run.path)
            run.embed.write_identity(recorded)
        manifest = _finalise(run, cfg, source, recorded, done)
    return EmbedResult(run.path, stats.blocks, {k: manifest.rows(k) for k in KINDS},
                       manifest.reject_counts(), time.perf_counter() - t0,
                       throughput=stats.rates(), sidecar=manifest.sidecar)


# -------------------------------------------------------------------- identity, resume

def _spec(cfg: EmbedConfig, source: Source | TarDataset) -> dict[str, Any]:
    """What must not change within a run (models are checked through their columns)."""
    return {"data": source.describe(),
            "encoders": [{"name": e.name, "type": e.type} for e in cfg.encoders],
            "dtype": cfg.dtype, "shard_size": cfg.shard_size, "max_pixels": cfg.max_pixels}


def _more_shards(old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Whether ``new`` only appends tar shards to ``old``'s (block k stays shard k)."""
    before, after = old.get("data", {}), new.get("data", {})
    was, now = before.get("image_source", {}), after.get("image_source", {})
    if was.get("kind") != "webdataset" or now.get("kind") != "webdataset":
        return False
    shards, longer = was.get("shards", []), now.get("shards", [])
    same_rest = ({**old, "data": {}} == {**new, "data": {}} and
                 {k: v for k, v in before.items() if k not in ("source", "image_source")} ==
                 {k: v for k, v in after.items() if k not in ("source", "image_source")} and
                 {**was, "shards": None} == {**now, "shards": None})
    return same_rest and len(longer) > len(shards) and longer[:len(shards)] == shards


def _check_spec(run: Run, recorded: RunIdentity | None, spec: dict[str, Any]) -> None:
    if recorded is None:
        return
    old = recorded.spec
    if old != spec:
        raise RunMismatch(f"{run.path} was made with a different config ({_diff(old, spec)}); "
                          f"refusing to mix them: use another run directory (--run) or delete "
                          f"{run.embed.dir} to start over")


def _check_columns(run: Run, recorded: RunIdentity, columns: dict[str, Column]) -> None:
    old = recorded.columns
    if set(old) != set(columns):
        raise RunMismatch(f"{run.path} has columns {sorted(old)}, this config makes "
                          f"{sorted(columns)}: use another run directory (--run)")
    for name, col in columns.items():
        check_same_model(old[name].provenance, col.provenance, f"column {name} of {run.path}",
                         "use another run directory (--run) or delete "
                         f"{run.embed.dir} to start over")


def _names_other_weights(recorded: RunIdentity, cfg: EmbedConfig) -> bool:
    """Whether an encoder now names another model than the one recorded for its columns:
    then the models are loaded and checked even when no block is left to embed."""
    now = {e.name: (e.model, e.pretrained) for e in cfg.encoders}
    was = {c.encoder: (c.provenance.model, c.provenance.pretrained)
           for c in recorded.columns.values()}
    return was != now


def _diff(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if old.get(k) != new.get(k):
                return _diff(old.get(k), new.get(k), f"{path}.{k}" if path else k)
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            if a != b:
                return _diff(a, b, f"{path}[{i}]")
    return f"{path or 'value'}: was {old!r}, now {new!r}"


def _finished(run: Run, cfg: EmbedConfig) -> dict[int, tuple[ShardRecord, ShardRecord]]:
    """Blocks whose two shards are on disk and sound; a bad one is said and removed."""
    recorded: dict[str, ShardRecord] = {}
    if run.embed.has_manifest():
        try:
            m = run.embed.manifest()
            recorded = {r.file: r for k in KINDS for r in m.shards[k]}
        except FormatError as e:
            log.warning("%s: checking every shard instead", e)
    files = {k: run.embed.shard_files(k) for k in KINDS}
    done = {}
    for block in sorted(set(files["images"]) | set(files["captions"])):
        pair = []
        for kind in KINDS:
            path = files[kind].get(block)
            try:
                if path is None:
                    raise FormatError(f"shard {kind} of block {block} is missing")
                pair.append(run.embed.verify_shard(kind, block, recorded))
            except FormatError as e:
                log.warning("%s: re-embedding block %d", e, block)
                run.embed.withdraw([block])
                for p in (files[k].get(block) for k in KINDS):
                    if p is not None:
                        p.unlink(missing_ok=True)
                break
        else:
            done[block] = (pair[0], pair[1])
    return done


def _final_blocks(run: Run, cfg: EmbedConfig, source: Source | TarDataset,
                  done: dict[int, tuple[ShardRecord, ShardRecord]]) -> set[int]:
    """Finished blocks that are not read again: full blocks of a manifest (a partial last
    block is re-read, the dataset may have grown into it); every tar shard, but one that
    could not be read at all (tried again: the network may be back, the file there)."""
    if not source.fixed_blocks:
        return {k for k, (img, _) in done.items() if img.inputs == cfg.shard_size}
    return {k for k, (img, _) in done.items()
            if img.inputs or not _unreachable(run.embed.shard_info(run.embed.shard_path(img)))}


def _unreachable(info: ShardInfo) -> bool:
    return any(r["kind"] == "shards" and r["reason"].startswith(("unreachable", "not found"))
               for r in info.rejects)


def _todo(run: Run, blocks: Iterator[Block],
          done: dict[int, tuple[ShardRecord, ShardRecord]]) -> Iterator[Block]:
    """The blocks still to embed.  A finished block the dataset grew into is redone, and a
    tar shard handed back by :func:`_final_blocks` (not read here) is tried again; either is
    withdrawn from the manifest first: readers never meet a listed shard being replaced."""
    for b in blocks:
        if b.index in done:
            if b.pending is None and _same_inputs(run, done[b.index], b):
                continue
            run.embed.withdraw([b.index])
        yield b


def _nothing_embedded(run: Run, cfg: EmbedConfig, source: Source | TarDataset,
                      done: dict[int, tuple[ShardRecord, ShardRecord]]) -> None:
    """Not one image survived: say why in one line, keep the rejects for the details and
    leave no identity behind, so the same command with the right options starts afresh."""
    rejects = [r for kind in KINDS for b in sorted(done)
               for r in run.embed.shard_info(run.embed.shard_path(done[b][KINDS.index(kind)]))
               .rejects]
    inputs = sum(img.inputs for img, _ in done.values()) or len(rejects)
    why = Counter(_reason_class(r["reason"]) for r in rejects)
    detail = ", ".join(f"{k}: {n}" for k, n in why.most_common(4)) or "no image rows"
    run.embed.discard(rejects)
    raise InputError(
        f"nothing to embed: all {inputs} input row(s) of {cfg.data.path} were rejected "
        f"({detail}); check the dataset root ({source.root}), the format ({source.format}) "
        f"and the pixel budget (max_pixels {cfg.max_pixels}); each item's reason is in "
        f"{run.embed.rejects_path}")


def _same_inputs(run: Run, records: tuple[ShardRecord, ShardRecord], block: Block) -> bool:
    """A re-read partial block is done only if the dataset did not grow into it."""
    info = run.embed.shard_info(run.embed.shard_path(records[0]))
    return info.inputs == block.image_column("id")


def _sealed(run: Run, recorded: RunIdentity | None) -> bool:
    """Whether the identity and the manifest were sealed on this machine.  A run made
    elsewhere (or by an older version) that matches the user's config, dataset and models
    (the checks before this) gets its files rewritten and sealed: the config vouches."""
    try:
        return recorded is not None and recorded.trusted and run.embed.manifest().trusted
    except FormatError:
        return False


def _listed(run: Run, done: dict[int, tuple[ShardRecord, ShardRecord]]) -> bool:
    try:
        m = run.embed.manifest()
    except FormatError:
        return False
    return [r.file for r in m.shards["images"]] == [done[b][0].file for b in sorted(done)]


# ------------------------------------------------------------------------- manifest

class _Progress:
    def __init__(self, cfg: EmbedConfig) -> None:
        self.blocks = 0
        self.items = Counter[str]()
        self.t0 = time.perf_counter()
        self.show = cfg.progress
        self._bar: tqdm | None = None  # made on the first block: a finished run shows none

    @property
    def bar(self) -> tqdm:
        if self._bar is None:
            self._bar = tqdm(unit="img", desc="embed", disable=not self.show,
                             dynamic_ncols=True, smoothing=0.1)
        return self._bar

    def block_done(self, records: tuple[ShardRecord, ShardRecord]) -> None:
        """A block's two shards are in (their records count its inputs)."""
        self.blocks += 1
        n = records[0].inputs
        self.items.update(images=n, captions=records[1].inputs)
        self.bar.update(n)
        self.bar.set_postfix(captions=self.items["captions"], blocks=self.blocks, refresh=False)

    def rates(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        return {k: n / seconds for k, n in self.items.items() if n}

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _finalise(run: Run, cfg: EmbedConfig, source: Source | TarDataset,
              recorded: RunIdentity,
              done: dict[int, tuple[ShardRecord, ShardRecord]]) -> EmbedManifest:
    blocks = sorted(done)
    shards = {kind: [done[b][i] for b in blocks] for i, kind in enumerate(KINDS)}
    infos = {kind: [run.embed.shard_info(run.embed.shard_path(rec)) for rec in shards[kind]]
             for kind in KINDS}
    rejects = [r for kind in KINDS for info in infos[kind] for r in info.rejects]
    by_reason = Counter(_reason_class(r["reason"]) for r in rejects)
    columns = recorded.columns
    dataset = {"source": source.source, "format": source.format, "root": str(source.root),
               "image_source": source.image_source.describe(),
               "images": sum(r.inputs for r in shards["images"]),
               "captions": sum(r.inputs for r in shards["captions"])}
    accounting = sidecar_totals(i.sidecar for i in infos["images"] if i.sidecar is not None)
    if accounting is not None:
        dataset["sidecar"] = accounting
        if not accounting["reconciled"]:
            log.warning("the sidecar accounting does not add up (%s): please report this",
                        sidecar_summary(accounting))
    manifest = EmbedManifest(
        dataset=dataset,
        config={"dtype": cfg.dtype, "shard_size": cfg.shard_size,
                "max_pixels": cfg.max_pixels, "normalized": True},
        columns=columns, shards=shards,
        rejects={"count": len(rejects), "by_reason": dict(sorted(by_reason.items())),
                 "file": run.embed.rejects_path.name},
        versions=_versions(), updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    run.embed.write_manifest(manifest, rejects)
    return manifest


def _reason_class(reason: str) -> str:
    """The reason without its specifics, for counting ("image too large: 9000x9000")."""
    return reason.split(":")[0].split(" (")[0]

