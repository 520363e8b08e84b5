"""What ``verify`` checks: every recorded file, every JSON file's digest and seal, no link
anywhere in the run, and the files a killed stage left behind.

Problems (exit 2): a missing, truncated or altered shard, derived column part, index,
head, adapter or latent model weights file; a manifest, run identity or model description
whose content does not match its digest; a link or special file inside the run; a JSON
file not sealed like the rest of a run that was sealed on this machine (edited and
re-digested); a manifest whose dataset differs from the run identity's.  Leftovers
(listed, removed by the stage's next run): temporary files, index, lists, recall state
or weights files no manifest or description names, index build scratch folders, filter
bitmaps of shards the embed manifest no longer lists, derived column parts no manifest
names.  Notes: a run not sealed on this machine, a derived column the embed stage has
moved past (stale: its stage's rerun brings it up to date).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import MissingError, UserError
from .embed import KINDS
from .files import TMP_SUFFIX, tampered
from .trained import ADAPTER, HEAD, LATENT, load_model_files

if TYPE_CHECKING:
    from . import Run

T = TypeVar("T")


@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    leftovers: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify_run(run: Run) -> Report:
    """Check the whole run; MissingError when there is no run to check."""
    if not run.path.is_dir():
        raise MissingError(f"no run directory at {run.path}: nothing to verify")
    r = Report()
    _links(run.path, r)
    if not os.path.lexists(run.embed.manifest_path):
        if not any(os.path.lexists(p) for p in (run.index.manifest_path, run.heads.models,
                                                 run.align.dir, run.latent.dir)):
            raise MissingError(f"{run.path} holds no run (no {run.embed.manifest_path}): "
                               "nothing to verify; run `python -m pipeline embed` first")
        r.problems.append(f"embed manifest {run.embed.manifest_path} is missing: rerun "
                          "`python -m pipeline embed`")
    if r.problems:  # links: nothing else is read
        return r
    sealed = _embed(run, r)
    trusted_index = _guard(r, lambda: _index(run, r))
    if sealed and trusted_index is False and os.path.lexists(run.index.manifest_path):
        r.problems.append(_unsealed(run.index.manifest_path, "`python -m pipeline index "
                                    "--rebuild`"))
    models = [(run.heads.descriptions, HEAD), (run.align.descriptions, ADAPTER),
              (run.latent.descriptions, LATENT)]
    for listing, fmt in models:
        for desc in _guard(r, listing) or []:
            try:
                meta, _ = load_model_files(desc, fmt)
            except UserError as e:
                r.problems.append(str(e))
                continue
            if sealed and not meta["sealed"]:
                r.problems.append(_unsealed(desc, fmt.remedy))
    r.problems += run.dedup.verify()
    r.problems += _guard(r, run.embed.hits.verify) or []
    r.problems += run.derived.verify()
    r.notes += _stale(run)
    for leftovers in (run.index.leftovers, run.filters.leftovers, run.embed.hits.leftovers,
                      run.heads.leftovers, run.align.leftovers, run.latent.leftovers,
                      run.derived.leftovers):
        r.leftovers += _guard(r, leftovers) or []
    r.leftovers += [p for p in run.path.rglob(f".*{TMP_SUFFIX}") if p.is_file()]
    return r


def _embed(run: Run, r: Report) -> bool:
    """The embed stage's checks; whether its identity is sealed on this machine."""
    try:
        identity = run.embed.read_identity()
        manifest = run.embed.manifest()
    except UserError as e:
        r.problems.append(str(e))
        return False
    for kind in KINDS:
        for rec in manifest.shards[kind]:
            try:
                run.embed.check_shard(rec)  # size and digest cover every byte
            except UserError as e:
                r.problems.append(str(e))
    if identity is None:
        r.problems.append(f"run identity file {run.embed.spec_path} is missing: delete "
                          f"{run.embed.dir} and embed again")
        return False
    data = identity.spec.get("data", {})
    recorded = {"root": data.get("root"), "format": data.get("format"),
                # runs of local files record their image source in the manifest only
                "image_source": data.get("image_source")
                or {"kind": "files", "root": data.get("root")}}
    for key, value in recorded.items():
        found = manifest.image_source if key == "image_source" else manifest.dataset.get(key)
        if found != value:
            r.problems.append(f"embed manifest {run.embed.manifest_path} records dataset {key} "
                              f"{found!r}, the run identity {value!r}: one of them was edited")
    if {n: c.provenance for n, c in manifest.own_columns.items()} != \
            {n: c.provenance for n, c in identity.columns.items()}:
        r.problems.append(f"embed manifest {run.embed.manifest_path} and the run identity "
                          "disagree on the columns' models: one of them was edited")
    if identity.trusted and not manifest.trusted:
        r.problems.append(_unsealed(run.embed.manifest_path, "rerun `python -m pipeline "
                                    "embed` to rewrite it"))
    if not identity.trusted:
        r.notes.append(f"{run.path} was not sealed on this machine (made elsewhere or by an "
                       "older version, or edited): its dataset root and local model paths "
                       "are not trusted (serve needs --root; local models must be named in "
                       "your config)")
    return identity.trusted


def _stale(run: Run) -> list[str]:
    """Derived columns the embed stage has moved past (rerunning their stage fixes it)."""
    try:
        return [why for why in run.embed.manifest().derived.values() if why]
    except UserError:
        return []  # said above


def _index(run: Run, r: Report) -> bool:
    r.problems += run.index.verify()
    return run.index.trusted


def _unsealed(path: Path, remedy: str) -> str:
    return (f"{path} is not sealed like the rest of this run (edited after it was written, "
            f"or written by an older version): {remedy}")


def _guard(r: Report, fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except UserError as e:
        r.problems.append(str(e))
        return None


def _links(root: Path, r: Report) -> None:
    """Every link or special file inside the run (nothing is followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                r.problems.append(str(tampered(path)))
            elif not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                r.problems.append(str(tampered(path, "special file")))


__all__ = ["Report", "verify_run"]
