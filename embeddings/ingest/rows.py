"""The per-row pass: image keys checked and normalised, ids and field digests computed.

It needs no state but the image source's (a cache of folders), so it runs in the reader
thread, ahead of the grouping.  Adds the columns ``status`` (see ``VALID`` ...), ``rel``
(where the image is read from: the source's normalised key), ``norm`` (the key's lexical
normal form: the id of a row without one), ``rid`` (the id), ``why`` (the source's reject
reason) and ``digest`` (of image, split, label, labels: how repeats of an id are compared),
and strips the caption entries.  Which keys may be read is the source's rule
(:meth:`embeddings.sources.ImageSource.check`), the same one it applies to every read.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..arrow import np_values, take_rows
from ..sources import ImageSource
from .idindex import hashes

VALID, READ_ERROR, NO_IMAGE, NUL, ESCAPE = range(5)  # ESCAPE: refused by the source

__all__ = ["ESCAPE", "NO_IMAGE", "NUL", "READ_ERROR", "VALID", "RowChecker", "np_values",
           "take_rows"]


class RowChecker:
    def __init__(self, source: ImageSource) -> None:
        self.source = source

    def __call__(self, t: pa.Table) -> pa.Table:
        col = {name: t.column(name).combine_chunks() for name in t.column_names}
        image = col["image"]
        if np_values(pc.starts_with(image, "./")).any():
            image = pc.replace_substring_regex(image, r"^(\./)+", "")
        err = np.asarray(col["error"].is_valid())
        noimg = ~err & np.asarray(image.is_null())
        nul = ~err & ~noimg & np_values(pc.match_substring(image, "\x00"))
        cand = ~(err | noimg | nul)
        keys = image if cand.all() else pc.if_else(pa.array(cand), image,
                                                   pa.nulls(len(image), pa.string()))
        checked = self.source.check(keys)
        escape = cand & np.asarray(checked.reasons.is_valid())
        rel = pc.if_else(pa.array(cand), checked.keys, "")
        norm = pc.if_else(pa.array(cand), checked.ids, image)
        status = np.select([err, noimg, nul, escape], [READ_ERROR, NO_IMAGE, NUL, ESCAPE],
                           VALID).astype(np.int8)
        valid = np.flatnonzero(status == VALID)
        labels_key = pc.fill_null(pc.binary_join(col["labels"], "\x1e"), "")
        key = pc.binary_join_element_wise(rel, pc.fill_null(col["split"], ""),
                                          pc.fill_null(col["label"], ""), labels_key, "\x1f")
        digest = np.zeros(len(image), np.int64)
        digest[valid] = hashes(np_values(take_rows(key, valid)))
        captions = col["captions"]
        flat = pc.list_flatten(captions)
        captions = pa.ListArray.from_arrays(
            pc.subtract(captions.offsets, captions.offsets[0]) if len(captions) else
            captions.offsets, pc.utf8_trim_whitespace(flat))
        extra = {"image": image, "captions": captions, "status": pa.array(status),
                 "rel": rel, "norm": norm, "rid": pc.coalesce(col["id"], norm),
                 "why": checked.reasons, "digest": pa.array(digest)}
        names = [*t.column_names, *(k for k in extra if k not in col)]
        return pa.Table.from_arrays([extra.get(k, col.get(k)) for k in names], names=names)
