"""Cross-modal retrieval evaluation (recall@1/5/10) on the cached embeddings.

Standard multi-caption protocol (as for Flickr30k / COCO Karpathy splits): each caption
is a text->image query with exactly one right image; each image is an image->text query,
right when any of its captions is retrieved.  Captions whose image was rejected by the
embed stage have no right answer and are left out (counted), as are images left with no
caption.  Every number is computed twice: through the built indexes (what users get) and
exactly (numpy brute force), so the cost of approximate search is visible.

Ties (duplicate captions, duplicate images: common in COCO) are counted by one rule,
the same in every recall figure here and in the index stage: **a tie at rank k counts as
a hit**.  A query's rank is the number of candidates scoring strictly more than its best
right item, so a right item whose score equals the k-th score is within the top k, and
the result does not depend on row order.  Scores within ``TIE_EPS`` count as equal (the
same cosine can differ in its last float32 bit between two matrix products).  Through an
index, ``TIE_FETCH`` extra neighbours are fetched so that ties just past rank k are seen.

Output: ``RUN/eval/retrieval.json`` and ``RUN/eval/retrieval.md``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from embeddings import index as ix
from embeddings.errors import InputError, RunMismatch
from embeddings.store import Run, column_name

from .index import open_index
from .leaks import leak_counts, leak_mask

log = logging.getLogger(__name__)
KS = (1, 5, 10)
BLOCK = 1024  # queries per exact-search block (bounds the score matrix in memory)
TIE_EPS = 1e-6  # cosine scores closer than this are a tie
TIE_FETCH = 10  # extra index neighbours fetched to see ties just past rank k


@dataclass(frozen=True)
class Protocol:
    """Which rows take part: gallery image rows, caption rows and their image rows."""

    image_rows: np.ndarray  # image rows in the gallery with at least one caption
    gallery: np.ndarray  # all image rows of the split (t2i searches these)
    caption_rows: np.ndarray  # captions whose image is in the gallery
    caption_image: np.ndarray  # for each of caption_rows: its image row
    excluded: dict[str, int]


def protocol(run: str | Path, split: str | None = None,
             exclude: np.ndarray | None = None) -> Protocol:
    """Rows of the evaluation from the shards' metadata (ids, image ids, splits); image
    rows in ``exclude`` (a mask: the leaks) and their captions take no part."""
    files = Run(run).embed
    images = files.read_table("images", ["id", "split"]).to_pydict()
    captions = files.read_table("captions", ["id", "image_id", "split"]).to_pydict()
    in_split = np.array([split is None or s == split for s in images["split"]], dtype=bool)
    if exclude is not None:
        in_split &= ~exclude
    gallery = np.flatnonzero(in_split)
    row_of = {images["id"][i]: int(i) for i in gallery}
    cap_rows, cap_image, orphans = [], [], 0
    for r, (image_id, s) in enumerate(zip(captions["image_id"], captions["split"])):
        if split is not None and s != split:
            continue
        if image_id in row_of:
            cap_rows.append(r)
            cap_image.append(row_of[image_id])
        else:
            orphans += 1  # its image was rejected (or is in no split we evaluate)
    with_caption = np.unique(np.asarray(cap_image, dtype=np.int64))
    excluded = {"captions_without_image": orphans,
                "images_without_caption": int(len(gallery) - len(with_caption))}
    return Protocol(with_caption, gallery, np.asarray(cap_rows, dtype=np.int64),
                    np.asarray(cap_image, dtype=np.int64), excluded)


def first_right_rank(hits: np.ndarray, right: Sequence[set[int]] | np.ndarray,
                     scores: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of the first right hit per query (len(hits[0]) when none is right).

    With ``scores`` (aligned with ``hits``, best first) ties count as hits: the rank is
    the number of hits scoring more than ``TIE_EPS`` above the best right one.
    """
    k = hits.shape[1]
    out = np.full(len(hits), k, dtype=np.int64)
    for q, row in enumerate(hits):
        ok = right[q]
        for r, h in enumerate(row):
            if (h in ok) if isinstance(ok, set) else h == ok:
                out[q] = r if scores is None else int((scores[q] > scores[q, r] + TIE_EPS).sum())
                break
    return out


def recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) if len(ranks) else float("nan") for k in ks}


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` positions in ``gallery`` by inner product (numpy, in blocks); equal
    scores in row order."""
    k = min(k, len(gallery))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), BLOCK):
        s = queries[start:start + BLOCK] @ gallery.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(s, part, axis=1)), axis=1)
        out[start:start + BLOCK] = np.take_along_axis(part, order, axis=1)
    return out


def exact_ranks(queries: np.ndarray, gallery: np.ndarray,
                right: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Rank of each query's best right item in ``gallery`` under the tie rule: the number
    of gallery rows scoring more than ``TIE_EPS`` above it (``right``: one position per
    query, or an array of positions per query)."""
    out = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), BLOCK):
        s = queries[start:start + BLOCK] @ gallery.T
        for q, row in enumerate(s, start):
            best = row[np.asarray(right[q])].max()
            out[q] = int((row > best + TIE_EPS).sum())
    return out


def evaluate_encoder(run: str | Path, encoder: str, p: Protocol, use_index: bool = True,
                     ks: Sequence[int] = KS) -> list[dict[str, Any]]:
    """Rows (method, direction, R@k...) for one encoder with image and text columns."""
    k = max(ks)
    img = Run(run).embed.read_vectors(column_name(encoder, "image"))
    txt = Run(run).embed.read_vectors(column_name(encoder, "text"))
    cap_q = txt[p.caption_rows]
    img_q = img[p.image_rows]
    caps_of: dict[int, set[int]] = {}
    for r, i in zip(p.caption_rows.tolist(), p.caption_image.tolist()):
        caps_of.setdefault(i, set()).add(r)
    right_caps = [caps_of[i] for i in p.image_rows.tolist()]
    rows = []
    t0 = time.perf_counter()
    # Positions (in the gallery / caption list) of each query's right items.
    at = np.full(img.shape[0], -1, np.int64)
    at[p.gallery] = np.arange(len(p.gallery))
    pos = {r: j for j, r in enumerate(p.caption_rows.tolist())}
    t2i = exact_ranks(cap_q, img[p.gallery], at[p.caption_image])
    i2t = exact_ranks(img_q, txt[p.caption_rows],
                      [np.fromiter((pos[c] for c in cs), np.int64) for cs in right_caps])
    rows.append(_row(encoder, "exact", t2i, i2t, ks, time.perf_counter() - t0))
    if use_index:
        t0 = time.perf_counter()
        image_index, ie = open_index(run, column_name(encoder, "image"))
        text_index, te = open_index(run, column_name(encoder, "text"))
        fetch = k + TIE_FETCH
        s, hits = ix.search_filtered(image_index, cap_q, fetch, _mask(img.shape[0], p.gallery))
        t2i = first_right_rank(hits, p.caption_image, s)
        s, hits = ix.search_filtered(text_index, img_q, fetch,
                                     _mask(txt.shape[0], p.caption_rows))
        i2t = first_right_rank(hits, right_caps, s)
        row = _row(encoder, "index", t2i, i2t, ks, time.perf_counter() - t0)
        row["indexes"] = {"image": ie.factory, "text": te.factory}
        rows.append(row)
    return rows


def evaluate_via(run: str | Path, name: str, p: Protocol, use_index: bool = True,
                 ks: Sequence[int] = KS) -> list[dict[str, Any]]:
    """Text->image rows through adapter ``name``: the run's stored source vectors of the
    caption queries (e.g. ``use_text``) mapped into the target's space and ranked against
    the target model's image column, exactly and through its index."""
    from .via import open_via

    files = Run(run)
    columns = files.embed.manifest().columns
    via = open_via(run, name, columns=columns)
    image_col = column_name(via.target.encoder, "image")
    if image_col not in columns:
        raise InputError(f"adapter {via.name} maps into {via.target.name}, whose model has no "
                         "image column: text->image recall through it needs a target like "
                         "clip_text or clip_image")
    if via.source.name not in columns:
        raise InputError(f"the run has no column {via.source.name} (the adapter's source) to "
                         "take the caption queries from")
    img = files.embed.read_vectors(image_col)
    t0 = time.perf_counter()
    queries = via.map(files.embed.read_vectors(via.source.name)[p.caption_rows])
    at = np.full(img.shape[0], -1, np.int64)
    at[p.gallery] = np.arange(len(p.gallery))
    t2i = exact_ranks(queries, img[p.gallery], at[p.caption_image])
    label = f"{via.target.encoder} via {via.name}"
    rows = [_row(label, "exact", t2i, None, ks, time.perf_counter() - t0)]
    if use_index:
        t0 = time.perf_counter()
        index, entry = open_index(run, image_col)
        s, hits = ix.search_filtered(index, queries, max(ks) + TIE_FETCH,
                                     _mask(img.shape[0], p.gallery))
        row = _row(label, "index", first_right_rank(hits, p.caption_image, s), None, ks,
                   time.perf_counter() - t0)
        row["indexes"] = {"image": entry.factory}
        rows.append(row)
    held = via.adapter.info.get("exclude_splits") or []
    for row in rows:
        row["via"] = {"adapter": via.name, "source": via.source.name,
                      "target": via.target.name, "held_out_splits": held}
    return rows


def _hybrid_rows(run: str | Path, record: dict[str, Any], p: Protocol
                 ) -> list[dict[str, Any]]:
    """Text->image rows of each hybrid source alone and of their fusion (exact)."""
    from .hybrid_eval import hybrid_ranks

    t0 = time.perf_counter()
    ranked = hybrid_ranks(run, record, p)
    info = {"weights": dict(zip((s["name"] for s in record["sources"]), record["weights"])),
            "tuned_on": record["tuned"]["split"], "tuned_queries": record["tuned"]["queries"]}
    seconds = time.perf_counter() - t0
    return [{**_row(label, "exact", r, None, KS, seconds if i == len(ranked) - 1 else 0.0),
             "hybrid": info} for i, (label, r) in enumerate(ranked)]


def _mask(n: int, rows: np.ndarray) -> np.ndarray | None:
    if len(rows) == n:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _row(encoder: str, method: str, t2i: np.ndarray, i2t: np.ndarray | None,
         ks: Sequence[int], seconds: float) -> dict[str, Any]:
    """A result row from the per-query ranks (tie rule applied); no ``i2t``: text->image
    only (an adapter maps queries, not the gallery)."""
    return {"encoder": encoder, "method": method, "t2i": recalls(t2i, ks),
            "i2t": recalls(i2t, ks) if i2t is not None else {f"R@{k}": None for k in ks},
            "queries": {"t2i": len(t2i), "i2t": len(i2t) if i2t is not None else 0},
            "seconds": round(seconds, 3)}


def _leaks(run: str | Path, split: str | None, required: bool
           ) -> tuple[np.ndarray, dict[str, int]] | None:
    """The leak mask of the image rows and the leaks per split evaluated (None: no report)."""
    files = Run(run)
    splits = np.asarray(files.embed.read_table("images", ["split"]).column(0).to_pylist(),
                        dtype=object)
    try:
        mask = leak_mask(files, splits)
    except RunMismatch as e:
        if required:
            raise
        log.warning("leaks not counted: %s", e)
        return None
    if mask is None:
        if required:
            raise InputError(f"--exclude-leaks needs a dedup report: run `python -m pipeline "
                             f"dedup --run {run}` first")
        return None
    counts = leak_counts(mask, splits)
    return mask, {s: n for s, n in counts.items() if split is None or s == split}


def run_retrieval_eval(run: str | Path, split: str | None = None,
                       encoders: Sequence[str] | None = None,
                       use_index: bool = True, exclude_leaks: bool = False,
                       via: Sequence[str] = (), hybrid: bool = False,
                       hybrid_sources: Sequence[str] = (), hybrid_split: str = "val"
                       ) -> dict[str, Any]:
    """Evaluate every encoder with both an image and a text column, text->image through
    each adapter of ``via``, and with ``hybrid`` the fusion of ``hybrid_sources`` tuned on
    ``hybrid_split`` (:mod:`.hybrid_eval`; the weights are saved); write RUN/eval/."""
    columns = Run(run).embed.manifest().columns
    both = [c.encoder for c in columns.values() if c.modality == "image"
            and column_name(c.encoder, "text") in columns]
    chosen = list(encoders) if encoders else both
    for e in chosen:
        if e not in both:
            raise InputError(f"encoder {e!r} has no image+text columns in {run}; "
                             f"those that do: {both}")
    if not chosen:
        raise InputError(f"no encoder of {run} embeds both images and text: "
                         "cross-modal retrieval needs one (e.g. CLIP)")
    if via and split is None:  # the captions the adapters never saw, for every row
        split = _held_out(run, via)
    record = None
    if hybrid:
        from .hybrid_eval import tune_hybrid

        record = tune_hybrid(run, hybrid_sources, protocol(run, hybrid_split), hybrid_split)
        if split is None:  # not the captions the weights were tuned on
            split = "test" if len(protocol(run, "test").caption_rows) else None
        if split in (None, hybrid_split):
            log.warning("hybrid weights are evaluated on the captions they were tuned on "
                        "(split %s): pass --split", split or "all")
    p = protocol(run, split)
    if len(p.caption_rows) == 0:
        where = f" in split {split!r}" if split else ""
        raise InputError(f"no captions with an embedded image{where}: nothing to evaluate")
    rows = [r for e in chosen for r in evaluate_encoder(run, e, p, use_index)]
    rows += [r for name in via for r in evaluate_via(run, name, p, use_index)]
    if record is not None:
        rows += _hybrid_rows(run, record, p)
    leaks = _leaks(run, split, exclude_leaks)
    if exclude_leaks and leaks is not None:
        for r in rows:
            r["leaks"] = "included"
        clean = protocol(run, split, leaks[0])
        if len(clean.caption_rows):
            rows += [{**r, "leaks": "excluded"} for e in chosen
                     for r in evaluate_encoder(run, e, clean, use_index)]
    report = {"split": split, "protocol": "multi-caption (Karpathy)", "ks": list(KS),
              "images": len(p.image_rows), "gallery": len(p.gallery),
              "captions": len(p.caption_rows), "excluded": p.excluded, "results": rows,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if leaks is not None:
        report["leaks"] = leaks[1]
    if record is not None:
        report["hybrid"] = {k: record[k] for k in ("weights", "fusion", "fetch", "tuned")}
    Run(run).eval.write_report("retrieval", report, format_report(report) + "\n")
    return report


def _held_out(run: str | Path, via: Sequence[str]) -> str | None:
    """The split every adapter of ``via`` left out of training (``[align]
    exclude_splits``), so recall through them is measured on captions they never saw."""
    from embeddings.align import load_run_adapter

    held = [set(load_run_adapter(run, name).info.get("exclude_splits") or ()) for name in via]
    common = sorted(set.intersection(*held)) if held else []
    if not common:
        log.warning("the adapters %s share no held-out split: recall through them is "
                    "measured on captions they were trained on (pass --split)", list(via))
        return None
    return "test" if "test" in common else common[0]


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of recall@k, text->image and image->text, per encoder and method."""
    ks = report["ks"]
    leaks = any("leaks" in r for r in report["results"])
    head = ["encoder", "method", *(["leaks"] if leaks else []),
            *[f"t2i R@{k}" for k in ks], *[f"i2t R@{k}" for k in ks]]
    lines = [f"Retrieval, split {report['split'] or 'all'}: {report['captions']} caption "
             f"queries over {report['gallery']} images, {report['images']} image queries "
             f"(excluded: {report['excluded']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        vals = [r["t2i"][f"R@{k}"] for k in ks] + [r["i2t"][f"R@{k}"] for k in ks]
        method = r["method"] + (f" ({r['indexes']['image']})" if "indexes" in r else "")
        first = [r["encoder"], method, *([f"{r['leaks']} ({r['queries']['i2t']} images)"]
                                         if leaks else [])]
        cells = ["-" if v is None else f"{100 * v:.1f}" for v in vals]
        lines.append("| " + " | ".join([*first, *cells]) + " |")
    if "leaks" in report:
        counts = ", ".join(f"{n} {s}" for s, n in report["leaks"].items()) or "none"
        lines += ["", f"Images with a near-duplicate in train (RUN/dedup): {counts}"]
    return "\n".join(lines)
