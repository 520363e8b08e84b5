"""On-disk inverted lists: the parts a build spills, and the lists file they merge into.

A build that cannot hold every code in memory adds rows to an in-memory IVF index until it
reaches its share of the budget, then *spills* it as a part file (its codes and ids grouped
by list) and empties it.  At the end the parts, in row order, are merged list by list into
one lists file in FAISS's ``OnDiskInvertedLists`` layout (list ``j`` at its offset: its
codes, then its ids), next to an index header FAISS writes (quantizer, codec, list
offsets).  Search memory-maps the lists file, so the index can exceed RAM; merging uses
plain reads and writes, never a mapping, so the build does not grow by the file.  Ray
workers write parts the same way, and the driver merges them with the same code: the same
rows in the same order give the same lists, byte for byte.

Part file: ``MAGIC``, nlist and code size (uint64), the list sizes (uint64 each), then per
list its codes and its ids (int64).  Parts live in the build's scratch folder only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faiss
import numpy as np

from .core import deserialize, ivf_of, list_codes, list_ids, serialize

MAGIC = b"MMEPART1"


class Lists(Protocol):
    """Inverted lists to merge: sizes per list and the codes and ids of one list."""

    sizes: np.ndarray
    code_size: int

    def read(self, j: int) -> tuple[bytes, bytes]: ...


@dataclass
class FileLists:
    """Lists in a file (a spilled part, or the lists file of an index already written),
    read back with ``pread``: no mapping, so merging does not grow the process."""

    path: Path
    sizes: np.ndarray
    code_size: int
    offsets: np.ndarray  # byte offset of each list (its codes, then its ids)

    @property
    def rows(self) -> int:
        return int(self.sizes.sum())

    def read(self, j: int) -> tuple[bytes, bytes]:
        n = int(self.sizes[j])
        if n == 0:
            return b"", b""
        with open(self.path, "rb") as f:
            fd = f.fileno()
            codes = os.pread(fd, n * self.code_size, int(self.offsets[j]))
            ids = os.pread(fd, n * 8, int(self.offsets[j]) + n * self.code_size)
        return codes, ids


def _packed(path: Path, sizes: np.ndarray, code_size: int, base: int) -> FileLists:
    sizes = sizes.astype(np.int64)
    per = sizes * (code_size + 8)
    return FileLists(Path(path), sizes, code_size,
                     base + np.concatenate([[0], np.cumsum(per)[:-1]]).astype(np.int64))


def write_part(index: faiss.Index, path: Path) -> FileLists:
    """Spill the lists of an in-memory IVF index to ``path``; the index is left as is."""
    ivf = ivf_of(index)
    nlist, cs = int(ivf.nlist), int(ivf.code_size)
    sizes = np.array([ivf.invlists.list_size(j) for j in range(nlist)], dtype=np.uint64)
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(np.array([nlist, cs], dtype=np.uint64).tobytes())
        f.write(sizes.tobytes())
        for j in np.flatnonzero(sizes):
            f.write(list_codes(index, int(j)).tobytes())
            f.write(list_ids(index, int(j)).tobytes())
    return _packed(path, sizes, cs, len(MAGIC) + 16 + 8 * nlist)


def read_part(path: Path) -> FileLists:
    with open(path, "rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path} is not a part file")
        nlist, cs = np.frombuffer(f.read(16), dtype=np.uint64)
        sizes = np.frombuffer(f.read(8 * int(nlist)), dtype=np.uint64)
    return _packed(path, sizes, int(cs), len(MAGIC) + 16 + 8 * int(nlist))


def ondisk_lists(index: faiss.Index, lists_path: Path) -> FileLists:
    """The lists file of an on-disk index opened from its header (see ``load_index``)."""
    ivf = ivf_of(index)
    od = faiss.downcast_InvertedLists(ivf.invlists)
    meta = od.lists
    sizes = np.array([meta.at(j).size for j in range(ivf.nlist)], dtype=np.int64)
    offsets = np.array([meta.at(j).offset for j in range(ivf.nlist)], dtype=np.int64)
    return FileLists(Path(lists_path), sizes, int(ivf.code_size), offsets)


@dataclass
class InMemory:
    """The lists of an in-memory IVF index, as a merge input."""

    index: faiss.Index

    def __post_init__(self) -> None:
        ivf = ivf_of(self.index)
        self.code_size = int(ivf.code_size)
        self.sizes = np.array([ivf.invlists.list_size(j) for j in range(ivf.nlist)],
                              dtype=np.int64)

    def read(self, j: int) -> tuple[bytes, bytes]:
        return list_codes(self.index, j).tobytes(), list_ids(self.index, j).tobytes()


def merge(trained: faiss.Index, sources: Sequence[Lists], lists_tmp: Path,
          header_tmp: Path, lists_name: str) -> int:
    """Write the lists of ``sources`` (in order) as one lists file and its index header.

    ``trained``: the empty trained index (its quantizer and codec); ``lists_name``: the
    final name of the lists file, recorded in the header for FAISS's tools (we open it by
    the path the store gives, see ``load_index``).  Returns the number of vectors.
    """
    ivf = ivf_of(trained)
    nlist, cs = int(ivf.nlist), int(ivf.code_size)
    for s in sources:
        if len(s.sizes) != nlist or s.code_size != cs:
            raise ValueError("parts of different indexes cannot be merged")
    sizes = np.sum([s.sizes for s in sources], axis=0).astype(np.uint64) if sources else \
        np.zeros(nlist, dtype=np.uint64)
    with open(lists_tmp, "wb") as f:
        for j in np.flatnonzero(sizes):
            pieces = [s.read(int(j)) for s in sources]
            f.write(b"".join(c for c, _ in pieces))
            f.write(b"".join(i for _, i in pieces))
    write_header(trained, sizes, lists_name, header_tmp)
    return int(sizes.sum())


def write_header(trained: faiss.Index, sizes: np.ndarray, lists_name: str, path: Path) -> None:
    """The index file of on-disk lists: ``trained`` with lists of ``sizes`` in the file."""
    index = deserialize(serialize(trained))
    ivf = ivf_of(index)
    sizes = np.ascontiguousarray(sizes, dtype=np.uint64)
    od = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, lists_name)
    od.set_all_lists_sizes(faiss.swig_ptr(sizes))  # capacity = size, contiguous lists
    od.totsize = int((sizes * np.uint64(ivf.code_size + 8)).sum())
    ivf.replace_invlists(od, True)
    od.this.disown()
    index.ntotal = ivf.ntotal = int(sizes.sum())
    faiss.write_index(index, str(path))


def assemble(trained: faiss.Index, sources: Sequence[Lists]) -> faiss.Index:
    """The lists of ``sources`` (in order) in an in-memory copy of ``trained``."""
    index = deserialize(serialize(trained))
    ivf = ivf_of(index)
    total = 0
    for j in range(ivf.nlist):
        pieces = [s.read(j) for s in sources if s.sizes[j]]
        if not pieces:
            continue
        codes = np.frombuffer(b"".join(c for c, _ in pieces), dtype=np.uint8)
        ids = np.frombuffer(b"".join(i for _, i in pieces), dtype=np.int64)
        ivf.invlists.add_entries(j, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        total += len(ids)
    index.ntotal = ivf.ntotal = total
    return index
