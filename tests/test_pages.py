"""Point reads of one vector from the Parquet page that holds it (embeddings/store/pages.py):
the same values as decoding the row group, on rows at page and row-group edges, in
float16 and float32; a damaged page is a one-line error; layouts it does not prove fall
back to the row group."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embeddings.errors import FormatError
from embeddings.store import Run, pages
from embeddings.store import columns as C
from embeddings.store.imported import VectorShard, write_vectors_run

COL = "clip_image"
N, DIM = 40_000, 100  # 3 row groups of 16,384, several pages each


def _run(path: Path, dtype: str) -> tuple[Run, np.ndarray]:
    x = np.random.default_rng(0).standard_normal((N, DIM)).astype(dtype)
    shard = VectorShard(ids=[f"r{i}" for i in range(N)], vectors={"clip_image": x})
    return write_vectors_run(path, {"clip_image": DIM}, [shard], dtype=dtype), x


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_vector_from_its_page_equals_the_row_group_read(tmp_path: Path, dtype: str,
                                                          monkeypatch) -> None:
    run, x = _run(tmp_path / "run", dtype)
    reader = run.embed.reader("images")
    path = run.embed.shard_path(run.embed.manifest().shards["images"][0])
    meta = reader._open(0, digest=False, point=True).metadata
    chunk = pages.chunk_of(path, meta, 1, COL, DIM)
    assert chunk is not None and len(chunk.pages) > 1  # several pages in a group
    edges = [16_384 + p.first // DIM + e for p in chunk.pages[1:] for e in (-1, 0)]
    rows = sorted({0, 16_383, 16_384, 32_767, 32_768, N - 1, *edges,
                   *np.random.default_rng(1).integers(0, N, 40).tolist()})
    read = []
    real = pages.read_row
    monkeypatch.setattr(pages, "read_row", lambda *a: read.append(1) or real(*a))
    got = np.concatenate([reader.read_vectors(COL, DIM, [r]) for r in rows])
    assert len(read) == len(rows)  # every one from its page
    np.testing.assert_array_equal(got, x[rows])
    monkeypatch.setattr(C, "PAGE_ROWS", 0)  # the row-group path
    np.testing.assert_array_equal(np.concatenate(
        [reader.read_vectors(COL, DIM, [r]) for r in rows]), x[rows])


def test_a_damaged_page_is_one_error_line(tmp_path: Path) -> None:
    run, _ = _run(tmp_path / "run", "float16")
    reader = run.embed.reader("images", verify=False)
    path = run.embed.shard_path(run.embed.manifest().shards["images"][0])
    meta = reader._open(0, digest=False, point=True).metadata
    page = pages.chunk_of(path, meta, 0, COL, DIM).pages[0]
    data = bytearray(path.read_bytes())
    data[page.at + page.size // 2] ^= 0xFF  # inside the first page's values
    path.write_bytes(bytes(data))
    fresh = run.embed.reader("images", verify=False)
    with pytest.raises(FormatError, match=r"shard .*part.* is corrupt .*CRC"):
        fresh.read_vectors(COL, DIM, [3])


def test_a_layout_it_cannot_prove_falls_back(tmp_path: Path, monkeypatch) -> None:
    run, x = _run(tmp_path / "run", "float16")
    reader = run.embed.reader("images")
    path = run.embed.shard_path(run.embed.manifest().shards["images"][0])
    meta = reader._open(0, digest=False, point=True).metadata
    assert pages.chunk_of(path, meta, 0, COL, DIM + 1) is None  # not rows x dim values
    assert pages.chunk_of(path, meta, 0, "id", DIM) is None  # not a vector column
    monkeypatch.setattr(pages, "HEADER_READ", 8)  # headers cut short: not parsed
    np.testing.assert_array_equal(run.embed.reader("images").read_vectors(COL, DIM, [7, 9]),
                                  x[[7, 9]])
