"""Tuning and evaluating hybrid retrieval on the run's captions (``eval-retrieval
--hybrid``).

The protocol is the evaluation's (:func:`pipeline.evaluate.protocol`): each caption is a
text->image query with one right image.  Each source's candidates are exact (numpy, from
the stored vectors): the caption's stored query vector (``clip_text``, ``minilm_text``,
``use_text`` through an adapter) against the split's images, or against its captions, a
caption source scoring an image by its best caption **other than the query itself**
(leave one out: the query is one of the captions; with one caption per image a caption
source cannot find the right image, and fusion learns to give it no weight).  The
weights are tuned for recall@10 on one split (``val``), saved through the store, and
reported on the evaluated split beside each source alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import hybrid as hy
from embeddings.errors import InputError
from embeddings.store import Run

from .hybrid import FETCH, Source, describe, resolve

log = logging.getLogger(__name__)
BLOCK = 1024  # queries per block of exact scores
STEP = 0.05  # grid of the weights (the simplex in steps of 0.05)


def _topk(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` positions and scores per row (ties: the smaller position first); rows
    with fewer finite scores are padded with -1 / -inf."""
    k = min(k, s.shape[1])
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(s, part, axis=1)), axis=1)
    ids = np.take_along_axis(part, order, axis=1)
    scores = np.take_along_axis(s, ids, axis=1)
    return np.where(np.isfinite(scores), ids, -1), scores


def best_caption(sims: np.ndarray, own: np.ndarray, starts: np.ndarray,
                 groups: np.ndarray, n_images: int) -> np.ndarray:
    """Image scores from caption scores: each image's best caption, leaving out each
    query's ``own`` caption column.  Captions are grouped by image: group ``g`` starts at
    column ``starts[g]`` and belongs to image ``groups[g]``; an image without another
    caption scores -inf."""
    sims = np.array(sims, np.float32)
    sims[np.arange(len(sims)), own] = -np.inf  # leave the query out
    out = np.full((len(sims), n_images), -np.inf, np.float32)
    if len(starts):
        out[:, groups] = np.maximum.reduceat(sims, starts, axis=1)
    return out


def candidates(run: str | Path, s: Source, p: Any, fetch: int = FETCH) -> hy.Ranked:
    """Source ``s``'s exact top ``fetch`` gallery positions for the captions of ``p``."""
    embed = Run(run).embed
    q = embed.read_vectors(s.query)[p.caption_rows]
    if s.via:
        from .via import open_via

        q = open_via(run, s.via).map(q)
    if s.kind == "images":
        gallery = embed.read_vectors(s.column)[p.gallery]
    else:  # the split's captions, grouped by their image's gallery position
        at = np.full(int(p.gallery.max()) + 1 if len(p.gallery) else 0, -1, np.int64)
        at[p.gallery] = np.arange(len(p.gallery))
        image_pos = at[p.caption_image]
        order = np.argsort(image_pos, kind="stable")
        gallery = embed.read_vectors(s.column)[p.caption_rows[order]]
        groups, starts = np.unique(image_pos[order], return_index=True)
        where_self = np.empty(len(order), np.int64)
        where_self[order] = np.arange(len(order))  # query j's own caption's column
    ids, scores = [], []
    for b in range(0, len(q), BLOCK):
        sims = q[b:b + BLOCK] @ gallery.T
        if s.kind == "captions":
            sims = best_caption(sims, where_self[b:b + len(sims)], starts, groups,
                                len(p.gallery))
        i, sc = _topk(sims, fetch)
        ids.append(i)
        scores.append(sc)
    return hy.Ranked(np.concatenate(ids).astype(np.int64),
                     np.concatenate(scores).astype(np.float32))


def _right(p: Any) -> np.ndarray:
    at = np.full(int(p.gallery.max()) + 1 if len(p.gallery) else 0, -1, np.int64)
    at[p.gallery] = np.arange(len(p.gallery))
    return at[p.caption_image]


def tune_hybrid(run: str | Path, names: Sequence[str], p: Any, split: str
                ) -> dict[str, Any]:
    """Tune the weights on the captions of protocol ``p`` (of ``split``), save them
    through the store, and return the saved record."""
    columns = Run(run).embed.manifest().columns
    sources = resolve(run, names, columns)
    if len(p.caption_rows) == 0:
        raise InputError(f"no captions with an embedded image in split {split!r} to tune the "
                         "hybrid weights on: pass --hybrid-split (a validation split)")
    t0 = time.perf_counter()
    tuned = hy.tune([candidates(run, s, p) for s in sources], _right(p), step=STEP)
    record = {"sources": describe(run, sources, columns), "weights": list(tuned.weights),
              "fusion": "zscore", "fetch": FETCH, "step": STEP,
              "tuned": {"split": split, "queries": len(p.caption_rows), "k": 10,
                        "recall": tuned.recall,
                        "by_source": {s.name: r for s, r in zip(sources, tuned.by_source)},
                        "seconds": round(time.perf_counter() - t0, 3)},
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Run(run).eval.write_hybrid(record)
    log.info("hybrid weights %s tuned on %d %s captions: R@10 %.3f (alone: %s)",
             tuned.weights, len(p.caption_rows), split, tuned.recall["R@10"],
             {s.name: round(r["R@10"], 3) for s, r in zip(sources, tuned.by_source)})
    return record


def hybrid_ranks(run: str | Path, record: dict[str, Any], p: Any
                 ) -> list[tuple[str, np.ndarray]]:
    """Per-query ranks of the right image on the captions of ``p``: each source alone
    (``hybrid source NAME``), then the fused weights (``hybrid W1 NAME1 + ...``)."""
    columns = Run(run).embed.manifest().columns
    sources = resolve(run, [s["name"] for s in record["sources"]], columns)
    weights = tuple(record["weights"])
    u = hy.union([candidates(run, s, p) for s in sources])
    right = _right(p)
    out = [(f"hybrid source {s.name}",
            hy.ranks(u, tuple(float(i == j) for j in range(len(sources))), right))
           for i, s in enumerate(sources)]
    label = "hybrid " + " + ".join(f"{w:g} {s.name}" for s, w in zip(sources, weights))
    return [*out, (label, hy.ranks(u, weights, right))]


__all__ = ["best_caption", "candidates", "hybrid_ranks", "tune_hybrid"]
