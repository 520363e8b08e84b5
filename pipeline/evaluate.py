"""Cross-modal retrieval evaluation (recall@1/5/10) on the cached embeddings.

Standard multi-caption protocol (as for Flickr30k / COCO Karpathy splits): each caption
is a text->image query with exactly one right image; each image is an image->text query,
right when any of its captions is retrieved.  Captions whose image was rejected by the
embed stage have no right answer and are left out (counted), as are images left with no
caption.  Every number is computed twice: through the built indexes (what users get) and
exactly (numpy brute force), so the cost of approximate search is visible.

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
from embeddings.errors import InputError
from embeddings.store import Run, column_name

from .index import open_index

log = logging.getLogger(__name__)
KS = (1, 5, 10)
BLOCK = 1024  # queries per exact-search block (bounds the score matrix in memory)


@dataclass(frozen=True)
class Protocol:
    """Which rows take part: gallery image rows, caption rows and their image rows."""

    image_rows: np.ndarray  # image rows in the gallery with at least one caption
    gallery: np.ndarray  # all image rows of the split (t2i searches these)
    caption_rows: np.ndarray  # captions whose image is in the gallery
    caption_image: np.ndarray  # for each of caption_rows: its image row
    excluded: dict[str, int]


def protocol(run: str | Path, split: str | None = None) -> Protocol:
    """Rows of the evaluation from the shards' metadata (ids, image ids, splits)."""
    files = Run(run).embed
    images = files.read_table("images", ["id", "split"]).to_pydict()
    captions = files.read_table("captions", ["id", "image_id", "split"]).to_pydict()
    in_split = np.array([split is None or s == split for s in images["split"]], dtype=bool)
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


def first_right_rank(hits: np.ndarray, right: Sequence[set[int]] | np.ndarray) -> np.ndarray:
    """0-based rank of the first right hit per query (len(hits[0]) when none is right)."""
    k = hits.shape[1]
    out = np.full(len(hits), k, dtype=np.int64)
    for q, row in enumerate(hits):
        ok = right[q]
        for r, h in enumerate(row):
            if (h in ok) if isinstance(ok, set) else h == ok:
                out[q] = r
                break
    return out


def recalls(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    return {f"R@{k}": float(np.mean(ranks < k)) if len(ranks) else float("nan") for k in ks}


def exact_topk(queries: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Exact top-``k`` positions in ``gallery`` by inner product (numpy, in blocks)."""
    k = min(k, len(gallery))
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), BLOCK):
        s = queries[start:start + BLOCK] @ gallery.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1, kind="stable")
        out[start:start + BLOCK] = np.take_along_axis(part, order, axis=1)
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
    t2i = p.gallery[exact_topk(cap_q, img[p.gallery], k)]
    i2t = p.caption_rows[exact_topk(img_q, txt[p.caption_rows], k)]
    rows.append(_row(encoder, "exact", t2i, p.caption_image, i2t, right_caps, ks,
                     time.perf_counter() - t0))
    if use_index:
        t0 = time.perf_counter()
        image_index, ie = open_index(run, column_name(encoder, "image"))
        text_index, te = open_index(run, column_name(encoder, "text"))
        _, t2i = ix.search_filtered(image_index, cap_q, k, _mask(img.shape[0], p.gallery))
        _, i2t = ix.search_filtered(text_index, img_q, k, _mask(txt.shape[0], p.caption_rows))
        row = _row(encoder, "index", t2i, p.caption_image, i2t, right_caps, ks,
                   time.perf_counter() - t0)
        row["indexes"] = {"image": ie.factory, "text": te.factory}
        rows.append(row)
    return rows


def _mask(n: int, rows: np.ndarray) -> np.ndarray | None:
    if len(rows) == n:
        return None
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return mask


def _row(encoder: str, method: str, t2i: np.ndarray, right_image: np.ndarray,
         i2t: np.ndarray, right_caps: list[set[int]], ks: Sequence[int],
         seconds: float) -> dict[str, Any]:
    return {"encoder": encoder, "method": method,
            "t2i": recalls(first_right_rank(t2i, right_image), ks),
            "i2t": recalls(first_right_rank(i2t, right_caps), ks),
            "queries": {"t2i": len(t2i), "i2t": len(i2t)}, "seconds": round(seconds, 3)}


def run_retrieval_eval(run: str | Path, split: str | None = None,
                       encoders: Sequence[str] | None = None,
                       use_index: bool = True) -> dict[str, Any]:
    """Evaluate every encoder with both an image and a text column; write RUN/eval/."""
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
    p = protocol(run, split)
    if len(p.caption_rows) == 0:
        where = f" in split {split!r}" if split else ""
        raise InputError(f"no captions with an embedded image{where}: nothing to evaluate")
    rows = [r for e in chosen for r in evaluate_encoder(run, e, p, use_index)]
    report = {"split": split, "protocol": "multi-caption (Karpathy)", "ks": list(KS),
              "images": len(p.image_rows), "gallery": len(p.gallery),
              "captions": len(p.caption_rows), "excluded": p.excluded, "results": rows,
              "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Run(run).eval.write_report("retrieval", report, format_report(report) + "\n")
    return report


def format_report(report: dict[str, Any]) -> str:
    """A Markdown table of recall@k, text->image and image->text, per encoder and method."""
    ks = report["ks"]
    head = ["encoder", "method", *[f"t2i R@{k}" for k in ks], *[f"i2t R@{k}" for k in ks]]
    lines = [f"Retrieval, split {report['split'] or 'all'}: {report['captions']} caption "
             f"queries over {report['gallery']} images, {report['images']} image queries "
             f"(excluded: {report['excluded']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["results"]:
        vals = [r["t2i"][f"R@{k}"] for k in ks] + [r["i2t"][f"R@{k}"] for k in ks]
        method = r["method"] + (f" ({r['indexes']['image']})" if "indexes" in r else "")
        lines.append("| " + " | ".join([r["encoder"], method, *[f"{100 * v:.1f}" for v in vals]])
                     + " |")
    return "\n".join(lines)
