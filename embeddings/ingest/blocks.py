"""Canonical chunks -> blocks of image and caption records, with every reject rule.

Rules, in the order they apply to a row: a reader error (`invalid JSON`, `not a JSON
object`, `malformed CSV row`); `no image path in row`; `image path contains a NUL byte`;
`image path escapes the dataset root` (the image source's rule: lexically, or through a
symlinked directory or file) (these in ``rows``, ahead in the reader thread); then
grouping, here.  Contiguous rows with the same id (the ``id`` column, else the normalised
image path) are one image; a later repeat of a seen id with the same image, split, label and
labels only adds captions (ids continue the image's ``<id>#k`` counter), and one with other
fields is a `duplicate id` reject.  Caption entries are then checked: `empty caption`,
`caption too long`, `duplicate caption id` (explicit COCO / Karpathy ids).

Memory: a few chunks plus the id index (``idindex``: about 32 bytes + the id per id),
never the dataset.  Everything per row is an Arrow or numpy operation (plus Python's C-level
string hash); Python loops over rows only for rejects, odd paths (``..``, ``//``, absolute)
and symlinked directories.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import InputError
from .idindex import IdIndex, hashes
from .records import CAPTION_SCHEMA, IMAGE_SCHEMA, MAX_CAPTION_CHARS, Block, IngestStats, Reject
from .rows import ESCAPE, NO_IMAGE, NUL, READ_ERROR, VALID, np_values, take_rows


@dataclass
class _Parts:
    images: list[pa.Table] = field(default_factory=list)
    captions: list[pa.Table] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


class Grouper:
    """Turns a stream of canonical chunks into blocks of ``size`` images."""

    def __init__(self, size: int, skip: Container[int], stats: IngestStats) -> None:
        if size < 1:
            raise InputError(f"block size must be at least 1, got {size}")
        self.size, self.skip, self.stats = size, skip, stats
        self.index = IdIndex()
        self.caption_ids: set[str] = set()
        self.n_images = 0  # images before the current chunk
        self.next_block = 0  # the first block not yet yielded or skipped
        self.parts: dict[int, _Parts] = {}

    def run(self, chunks: Iterable[pa.Table]) -> Iterator[Block]:
        it = iter(chunks)
        chunk, carry = next(it, None), None
        while chunk is not None:
            table = chunk if carry is None else pa.concat_tables([carry, chunk])
            chunk = next(it, None)
            carry = self._process(table.combine_chunks(), final=chunk is None)
            yield from self._emit(self._open_block())
        yield from self._emit(self._open_block() + 1)

    def _open_block(self) -> int:
        return max(self.n_images - 1, 0) // self.size

    def _emit(self, upto: int) -> Iterator[Block]:
        while self.next_block < upto and self.stats.rows:
            b, parts = self.next_block, self.parts.pop(self.next_block, _Parts())
            self.next_block += 1
            self.stats.blocks += 1
            if b in self.skip:
                continue
            yield Block(b, _concat(parts.images, IMAGE_SCHEMA),
                        _concat(parts.captions, CAPTION_SCHEMA), tuple(parts.rejects))

    # ---------------------------------------------------------------------- one chunk

    def _process(self, t: pa.Table, final: bool) -> pa.Table | None:
        n = t.num_rows
        col = {name: t.column(name).combine_chunks() for name in t.column_names}
        status = np.asarray(col["status"])
        valid_rows = np.flatnonzero(status == VALID)
        rid = col["rid"]
        rid_v = take_rows(rid, valid_rows)
        start = np.ones(len(rid_v), bool)
        if len(rid_v) > 1:
            start[1:] = np_values(pc.not_equal(rid_v[1:], rid_v[:-1]))
        starts = np.flatnonzero(start)
        cut, m, carry = n, len(valid_rows), None
        if not final and len(starts):  # the last run may go on in the next chunk
            m = starts[-1]
            cut = int(valid_rows[m])
            carry, starts = t.slice(cut), starts[:-1]
        V, rid_v, start = valid_rows[:m], rid_v[:m], start[:m]
        run = np.cumsum(start) - 1
        digest = np.asarray(col["digest"])[V]
        entries = np.asarray(pc.fill_null(pc.list_value_length(col["captions"]), 0))[V]
        accepted, is_new, base = self._dedupe(take_rows(rid_v, starts), digest, starts,
                                              entries)

        new_pos = V[starts[is_new]]
        row_block = self._block_of(np.arange(cut), new_pos)
        self.n_images += len(new_pos)
        self.stats.rows += cut
        self.stats.images += len(new_pos)
        live = np.array([b not in self.skip for b in range(row_block[0], row_block[-1] + 1)]) \
            if cut else np.zeros(0, bool)
        row_live = live[row_block - row_block[0]] if cut else np.zeros(0, bool)

        rejects = self._row_rejects(col, status[:cut], row_live)
        self.stats.rejects += int((~accepted).sum())
        rejects += [(int(p), Reject("images", str(r),
                                    f"duplicate id: row {int(col['row'][int(p)].as_py())} "
                                    "disagrees with an earlier row"))
                    for p, r in zip(V[~accepted], np_values(rid_v.filter(pa.array(~accepted))))
                    if row_live[p]]
        caption_parts = self._captions(col, rid, V[accepted], run[accepted], is_new, base,
                                       row_live)
        rejects += caption_parts.pop()
        self._collect(col, rid, col["rel"], new_pos, row_block, caption_parts, rejects)
        return carry

    def _block_of(self, positions: np.ndarray, new_pos: np.ndarray) -> np.ndarray:
        ordinal = self.n_images + np.searchsorted(new_pos, positions, side="right") - 1
        return np.maximum(ordinal, 0) // self.size

    def _dedupe(self, ids: pa.Array, digest: np.ndarray, starts: np.ndarray,
                entries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which rows are accepted, which runs are new images, and their caption counters.

        Runs of one id (earlier in this chunk or in the index) form a group: its reference
        digest is the first occurrence's; a run's counter starts after the captions of the
        earlier runs of its group."""
        runs = len(starts)
        encoded = pc.dictionary_encode(ids)
        group = np.asarray(encoded.indices, np.int64)  # numbered by first appearance
        order = np.arange(runs) if len(encoded.dictionary) == runs \
            else np.argsort(group, kind="stable")
        group_sorted = group[order]
        first = np.ones(runs, bool)  # in group order: the first run of each group
        first[1:] = group_sorted[1:] != group_sorted[:-1]
        lead = order[first]  # lead[g]: the first run of group g
        lead_ids = take_rows(ids, lead).cast(pa.large_string())  # groups: by first run
        h = hashes(np_values(lead_ids))
        number = self.index.find(h, lead_ids)
        found = number >= 0
        ref, prior = digest[starts[lead]], np.zeros(len(lead), np.int64)
        ref[found], prior[found] = self.index.values(number[found])
        lengths = np.diff(np.append(starts, len(digest)))
        accepted = digest == np.repeat(ref[group], lengths)
        counts = np.add.reduceat(entries * accepted, starts) if runs else prior
        in_order = counts[order]
        before = np.cumsum(in_order) - in_order  # captions of the runs before, all groups
        base = np.empty(runs, np.int64)
        base[order] = prior[group_sorted] + before - before[first][group_sorted]
        totals = prior + (np.add.reduceat(in_order, np.flatnonzero(first)) if runs else 0)
        self.index.set_counts(number[found], totals[found])
        self.index.add(h[~found], lead_ids.filter(pa.array(~found)), ref[~found], totals[~found])
        is_new = np.zeros(runs, bool)
        is_new[lead[~found]] = True
        return accepted, is_new, base

    # ---------------------------------------------------------------------- rejects

    def _row_rejects(self, col: dict[str, pa.Array], status: np.ndarray, live: np.ndarray
                     ) -> list[tuple[int, Reject]]:
        bad = np.flatnonzero((status != VALID) & live)
        self.stats.rejects += int((status != VALID).sum())
        if not len(bad):
            return []
        take = pa.array(bad)
        fields = zip(bad, status[bad], *(col[c].take(take).to_pylist()
                                         for c in ("id", "row", "error", "why", "norm")))
        out = []
        for i, why, rid, row, error, refused, norm in fields:
            reason = {READ_ERROR: error, NO_IMAGE: "no image path in row",
                      NUL: "image path contains a NUL byte", ESCAPE: refused}[why]
            out.append((int(i), Reject("images", rid or (norm if why == ESCAPE else f"row:{row}"),
                                       reason)))
        return out

    # ---------------------------------------------------------------------- captions

    def _captions(self, col: dict[str, pa.Array], rid: pa.Array, rows: np.ndarray,
                  row_run: np.ndarray, is_new: np.ndarray, base: np.ndarray,
                  live: np.ndarray) -> list:
        """Caption entries of the accepted rows: [kept table, per-image lists, rejects]."""
        lists = take_rows(col["captions"], rows)
        parent = np.asarray(pc.list_parent_indices(lists), np.int64)
        text = pc.list_flatten(lists)  # stripped by the row pass
        pos, run = rows[parent], row_run[parent]
        first = np.searchsorted(run, run, side="left")
        k = base[run] + np.arange(len(run)) - first
        length = np.asarray(pc.utf8_length(text))
        blank, long = length == 0, length > MAX_CAPTION_CHARS
        explicit = None
        dup = np.zeros(len(run), bool)
        if col["caption_ids"].null_count < len(col["caption_ids"]):
            explicit = []
            for ids, caps in zip(col["caption_ids"].take(pa.array(rows)).to_pylist(),
                                 lists.to_pylist()):
                explicit += ids if ids is not None else [None] * len(caps)
            for i, cid in enumerate(explicit):
                if cid is not None and not blank[i] and not long[i]:
                    dup[i] = cid in self.caption_ids
                    self.caption_ids.add(cid)
        kept = ~(blank | long | dup)
        self.stats.captions += int(kept.sum())
        self.stats.rejects += int((~kept).sum())
        on = live[pos]
        owner = rid.take(pa.array(pos[on]))
        cid = pc.binary_join_element_wise(owner, pc.cast(pa.array(k[on]), pa.string()), "#")
        if explicit is not None:
            cid = pc.coalesce(pa.array([c for c, o in zip(explicit, on) if o], pa.string()), cid)
        rejects = []
        bad = np.flatnonzero(~kept[on])
        if len(bad):
            lengths, ids = length[on], cid.take(pa.array(bad)).to_pylist()
            for i, c in zip(bad, ids):
                why = ("empty caption" if lengths[i] == 0 else
                       f"caption too long: {lengths[i]} characters (limit {MAX_CAPTION_CHARS})"
                       if lengths[i] > MAX_CAPTION_CHARS else "duplicate caption id")
                rejects.append((int(pos[on][i]), Reject("captions", c, why)))
        keep = pa.array(kept[on])
        at = pa.array(pos[on][kept[on]])
        table = pa.Table.from_arrays(
            [cid.filter(keep), owner.filter(keep), text.filter(pa.array(on)).filter(keep),
             *(col[c].take(at) for c in ("split", "label", "labels"))], schema=CAPTION_SCHEMA)
        # Per new image: the texts of its own run, for the image table's `captions` list.
        mine = kept & is_new[run] & on
        counts = np.bincount(run[mine], minlength=len(is_new))[is_new]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
        per_image = pa.ListArray.from_arrays(pa.array(offsets), text.filter(pa.array(mine)))
        return [table, pos[on][kept[on]], per_image, rejects]

    def _collect(self, col: dict[str, pa.Array], rid: pa.Array, rel: pa.Array,
                 new_pos: np.ndarray, row_block: np.ndarray, caption_parts: list,
                 rejects: list[tuple[int, Reject]]) -> None:
        """Cut this chunk's images, captions and rejects into the blocks they belong to."""
        captions, caption_pos, per_image = caption_parts
        images = pa.Table.from_arrays(
            [*(take_rows(a, new_pos) for a in (rid, rel, col["split"], col["label"],
                                               col["labels"])), per_image], schema=IMAGE_SCHEMA)
        for table, pos, attr in ((images, new_pos, "images"), (captions, caption_pos, "captions")):
            blocks = row_block[pos]  # non-decreasing
            bounds = np.concatenate([[0], np.flatnonzero(np.diff(blocks)) + 1, [len(blocks)]])
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
                b = int(blocks[lo]) if hi > lo else -1
                if b >= 0 and b not in self.skip:
                    getattr(self.parts.setdefault(b, _Parts()), attr).append(
                        table.slice(lo, hi - lo))
        for p, r in sorted(rejects, key=lambda pr: pr[0]):
            self.parts.setdefault(int(row_block[p]), _Parts()).rejects.append(r)


def _concat(tables: list[pa.Table], schema: pa.Schema) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables).combine_chunks() if tables else schema.empty_table()
