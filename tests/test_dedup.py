"""Duplicate grouping against brute force: union-find, k-NN graphs, Hamming buckets,
per-cluster pairs, keep rules, the report and the contact sheet (seeded data)."""

from __future__ import annotations

import io
from collections import deque

import numpy as np
import pytest
from PIL import Image

from embeddings.dedup import (
    REPORT_SCHEMA,
    UnionFind,
    cluster_groups,
    connected_components,
    contact_sheet,
    dense_groups,
    exact_groups,
    exact_neighbours,
    group_report,
    hash_groups,
    hash_similarity_of,
    keep_mask,
    knn_groups,
    leaks,
    representatives,
    summary,
    to_png,
    vector_similarity,
)
from embeddings.fingerprint import content_digest, hamming
from embeddings.store import digest_file


def bfs_labels(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The oracle: breadth-first search, each row labelled by its component's min row."""
    adj: list[list[int]] = [[] for _ in range(n)]
    for x, y in zip(a.tolist(), b.tolist()):
        adj[x].append(y)
        adj[y].append(x)
    labels = np.full(n, -1, dtype=np.int64)
    for s in range(n):
        if labels[s] >= 0:
            continue
        labels[s] = s
        todo = deque([s])
        while todo:
            for y in adj[todo.popleft()]:
                if labels[y] < 0:
                    labels[y] = s
                    todo.append(y)
    return labels


def random_graph(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, n, m), rng.integers(0, n, m)


@pytest.mark.parametrize("seed", range(6))
def test_union_find_matches_bfs_in_any_batching(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    a, b = random_graph(rng, n, int(rng.integers(0, 2 * n)))
    want = bfs_labels(n, a, b)
    assert np.array_equal(connected_components(n, a, b), want)
    uf = UnionFind(n)
    order = rng.permutation(len(a))
    for chunk in np.array_split(order, int(rng.integers(1, 20))):
        uf.union(b[chunk], a[chunk])  # reversed edges, shuffled, batched
    assert np.array_equal(uf.labels(), want)


def test_union_find_long_chains_and_counts() -> None:
    rng = np.random.default_rng(1)
    n = 50_000
    perm = rng.permutation(n)
    uf = UnionFind(n)
    assert uf.union(perm[:-1], perm[1:]) == n - 1  # one batch: a chain through every row
    assert np.array_equal(uf.labels(), np.zeros(n, dtype=np.int64))
    uf = UnionFind(n)
    for s in range(0, n - 1, 999):  # the same chain over many batches
        e = min(s + 999, n - 1)
        uf.union(perm[s:e], perm[s + 1:e + 1])
    assert (uf.labels() == 0).all()
    assert UnionFind(3).union([0, 1, 2], [0, 1, 2]) == 0  # self loops merge nothing
    with pytest.raises(ValueError, match="rows 0..2"):
        UnionFind(3).union([0], [3])
    assert len(UnionFind(0).labels()) == 0


def test_dense_groups_number_largest_first() -> None:
    labels = np.array([0, 0, 2, 3, 2, 2, 6, 0, 8, 8])
    group, sizes = dense_groups(labels)
    assert sizes.tolist() == [3, 3, 2]  # groups of 0 and 2 tie on size: smaller root first
    assert group.tolist() == [0, 0, 1, -1, 1, 1, -1, 0, 2, 2]


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(rng: np.random.Generator, n_base: int, copies: int, d: int = 64,
            noise: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``n_base`` random unit vectors and ``copies`` noisy copies of random ones (cos
    about 1 / sqrt(1 + noise^2 d)); returns vectors and each row's source row."""
    base = unit(rng.standard_normal((n_base, d)))
    src = rng.integers(0, n_base, copies)
    dup = unit(base[src] + noise * rng.standard_normal((copies, d)))
    return np.vstack([base, dup]), np.r_[np.arange(n_base), src]


def threshold_labels(x: np.ndarray, t: float) -> np.ndarray:
    sims = x @ x.T
    a, b = np.nonzero(np.triu(sims >= t, 1))
    return bfs_labels(len(x), a, b)


def test_knn_groups_equal_the_threshold_graph() -> None:
    rng = np.random.default_rng(2)
    x, _ = planted(rng, 300, 200, d=16, noise=0.05)
    for t in (0.8, 0.9, 0.97):
        want = threshold_labels(x, t)
        assert len(np.unique(want)) < 450
        got = knn_groups(len(x), exact_neighbours(x, k=len(x), batch_size=37), t).labels()
        assert np.array_equal(got, want)
    # with a small k the planted groups are still found (each copy's source is near)
    got = knn_groups(len(x), exact_neighbours(x, k=5), 0.9).labels()
    assert np.array_equal(got, threshold_labels(x, 0.9))


def test_knn_batches_may_hold_missing_neighbours() -> None:
    ids = np.array([0, 1, 2])
    nbrs = np.array([[0, 1], [1, -1], [2, 0]])
    sims = np.array([[1.0, 0.99], [1.0, 0.0], [1.0, 0.2]], dtype=np.float32)
    assert knn_groups(3, [(ids, nbrs, sims)], 0.9).labels().tolist() == [0, 0, 2]
    with pytest.raises(ValueError, match="neighbour batch"):
        knn_groups(3, [(ids, nbrs[:, 0], sims)], 0.9)


def test_per_cluster_path_equals_global_path_when_clusters_cover_groups() -> None:
    rng = np.random.default_rng(3)
    x, _ = planted(rng, 400, 300, d=32, noise=0.05)
    want = threshold_labels(x, 0.9)
    assert len(np.unique(want)) < 500  # most copies joined their source
    group_of = want  # every true group wholly in one cluster, many groups per cluster
    clusters = (group_of * 7919) % 13
    got = cluster_groups(clusters, x, 0.9).labels()
    assert np.array_equal(got, want)
    # as a row getter (one cluster's vectors in memory) and with two clusters per row
    two = np.stack([clusters, (clusters + 1) % 13], axis=1)
    assert np.array_equal(cluster_groups(two, lambda r: x[r], 0.9).labels(), want)
    # a cluster split across a group loses exactly those links
    split = rng.integers(0, 13, len(x))
    assert len(np.unique(cluster_groups(split, x, 0.9).labels())) > len(np.unique(want))


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Hashes with 32 bits set, as the median threshold of pHash makes them."""
    bits = np.argsort(rng.random((n, 64)), axis=1)[:, :32].astype(np.uint64)
    return np.bitwise_or.reduce(np.uint64(1) << bits, axis=1)


def near(rng: np.random.Generator, h: np.ndarray, d: int) -> np.ndarray:
    """Each hash with ``d`` bits flipped (d/2 ones off, d/2 on: still 32 set)."""
    bits = (h[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    keys = rng.random(bits.shape)
    off = np.argsort(np.where(bits == 1, keys, 2.0), axis=1)[:, :d // 2]
    on = np.argsort(np.where(bits == 0, keys, 2.0), axis=1)[:, :d // 2]
    flips = np.bitwise_or.reduce(np.uint64(1) << np.c_[off, on].astype(np.uint64), axis=1)
    return h ^ flips


@pytest.mark.parametrize("method", ["exact", "lsh", "auto"])
def test_hash_groups_equal_brute_force(method: str) -> None:
    rng = np.random.default_rng(4)
    h = random_hashes(rng, 1500)
    src = rng.integers(0, 1500, 400)
    h = np.r_[h, near(rng, h[src[:200]], 4), near(rng, h[src[200:]], 10), h[src[:50]]]
    assert (hamming(h[1500:1700], h[src[:200]]) == 4).all()
    dist = hamming(h[:, None], h[None, :])
    for r in (0, 4, 10):
        a, b = np.nonzero(np.triu(dist <= r, 1))
        want = bfs_labels(len(h), a, b)
        got = hash_groups(h, r, method=method).labels()
        assert np.array_equal(got, want), (method, r)
    with pytest.raises(ValueError, match="max_distance"):
        hash_groups(h, 64)


def test_empty_and_single_inputs() -> None:
    empty = np.zeros(0, dtype=np.uint64)
    assert len(hash_groups(empty, 4).labels()) == 0
    assert hash_groups(np.array([7], dtype=np.uint64), 4).labels().tolist() == [0]
    assert len(knn_groups(0, [], 0.9).labels()) == 0
    assert len(cluster_groups(np.zeros(0, dtype=np.int64), np.zeros((0, 4)), 0.9)) == 0
    report = group_report(np.arange(2), np.arange(2))
    assert len(report) == 0 and report.groups == 0 and report.to_arrow().num_rows == 0
    assert summary(np.arange(2))["groups"] == 0


def test_exact_groups_by_content_digest(tmp_path) -> None:
    blobs = [b"a", b"b", b"a", b"", b"b" * 3, b""]
    digests = [content_digest(x) for x in blobs]
    want = [0, 1, 0, 3, 4, 3]
    assert exact_groups(digests).labels().tolist() == want
    assert exact_groups([d.hex() for d in digests]).labels().tolist() == want
    (tmp_path / "f").write_bytes(b"some image bytes")
    assert content_digest(b"some image bytes").hex() == digest_file(tmp_path / "f")


def test_keep_rules() -> None:
    labels = np.array([0, 0, 0, 3, 3, 5])
    pixels = np.array([10, 40, 40, 5, 9, 1])
    split = ["test", "val", "train", "test", "val", "test"]
    assert representatives(labels).tolist() == [0, 0, 0, 3, 3, 5]
    assert representatives(labels, "resolution", pixels=pixels).tolist() == [1, 1, 1, 4, 4, 5]
    assert representatives(labels, "split", split=split).tolist() == [2, 2, 2, 4, 4, 5]
    rep = representatives(labels, ["split", "resolution"], split=split, pixels=pixels,
                          prefer=["test", "val"])
    assert rep.tolist() == [0, 0, 0, 3, 3, 5]
    assert representatives(labels, ["resolution", "split"], pixels=pixels, split=split,
                           prefer=["val"]).tolist() == [1, 1, 1, 4, 4, 5]
    assert keep_mask(rep).tolist() == [True, False, False, True, False, True]
    with pytest.raises(ValueError, match="pixel count"):
        representatives(labels, "resolution")
    with pytest.raises(ValueError, match="unknown keep rule 'largest'"):
        representatives(labels, "largest")


def test_report_summary_and_leaks() -> None:
    rng = np.random.default_rng(5)
    x = unit(rng.standard_normal((8, 8)))
    x[3] = unit((x[0] + 0.05)[None])[0]
    labels = np.array([0, 1, 1, 0, 4, 0, 6, 7])
    split = np.array(["train", "train", "test", "test", "val", "val", "test", "train"])
    rep = representatives(labels)
    report = group_report(labels, rep, vector_similarity(x), ids=[f"i{k}" for k in range(8)],
                          split=split)
    assert report.group.tolist() == [0, 0, 0, 1, 1]
    assert report.row[:1].tolist() == [0] and sorted(report.row[1:3].tolist()) == [3, 5]
    assert report.representative.tolist() == [True, False, False, True, False]
    assert report.similarity[0] == 1.0
    assert report.similarity[1] == pytest.approx(float(x[0] @ x[report.row[1]]), abs=1e-6)
    assert report.similarity[1] >= report.similarity[2]  # members by similarity
    assert report.members(1).tolist() == [1, 2]
    table = report.to_arrow()
    assert table.schema == REPORT_SCHEMA and table.num_rows == 5
    assert table.column("id").to_pylist() == [f"i{r}" for r in report.row]
    s = summary(labels, split)
    assert s == {"rows": 8, "groups": 2, "rows_in_groups": 5, "removable": 3, "largest": 3,
                 "sizes": {2: 1, 3: 1}, "cross_split_groups": 2,
                 "leaks": {"test": 2, "val": 1}}
    assert np.flatnonzero(leaks(labels, split)).tolist() == [2, 3, 5]
    h = np.array([0, 3, 3, 1, 0, 7, 0, 0], dtype=np.uint64)
    sims = group_report(labels, rep, hash_similarity_of(h)).similarity
    assert sims.tolist() == [1.0, pytest.approx(63 / 64), pytest.approx(61 / 64), 1.0, 1.0]


def test_contact_sheet_png() -> None:
    labels = np.array([0, 0, 0, 3, 3, 5])
    report = group_report(labels, representatives(labels), split=["a"] * 6)
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (9, 9, 9), (99, 99, 99), (0, 0, 0)]

    def thumb(row: int) -> Image.Image | None:
        return None if row == 4 else Image.new("RGB", (40, 30), colours[row])

    sheet = contact_sheet(report, thumb, groups=5, per_group=2, size=64)
    png = to_png(sheet)
    again = Image.open(io.BytesIO(png))
    assert again.format == "PNG" and again.size == sheet.size
    assert sheet.height < 2 * (64 + 40 + 20)  # two bands: only groups of two or more
    arr = np.asarray(sheet)
    assert (arr == (200, 0, 0)).all(axis=2).any()  # the first group's representative
    assert not (arr == (0, 0, 200)).all(axis=2).any()  # beyond per_group: not drawn
    empty = contact_sheet(group_report(np.arange(3), np.arange(3)), thumb)
    assert empty.size[0] > 0


def test_memory_stays_bounded_on_300k_vectors(tmp_path) -> None:
    """The grouping paths at a few hundred thousand rows, with traced peak memory far
    below the vectors themselves (no pair list, no dense similarity matrix).

    The neighbour batches are made here (each row's source row and seven random rows, with
    their true cosines) so that the test measures the grouping, not a search."""
    import tracemalloc

    rng = np.random.default_rng(6)
    x, src = planted(rng, 200_000, 100_000, d=64, noise=0.03)  # copies at cosine ~0.97
    n = len(x)
    mm = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32,
                                   shape=x.shape)
    mm[:] = x
    mm.flush()
    del x
    clusters = rng.integers(0, 1024, 200_000)[src]  # a copy lands in its source's cluster

    def batches():
        for s in range(0, n, 4096):
            ids = np.arange(s, min(s + 4096, n))
            nbrs = np.c_[src[ids], rng.integers(0, n, (len(ids), 7))]
            sims = np.einsum("id,ikd->ik", mm[s:s + len(ids)], mm[nbrs.ravel()].reshape(
                len(ids), 8, -1))
            yield ids, nbrs, sims

    tracemalloc.start()
    knn = knn_groups(n, batches(), 0.9).labels()
    knn_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    per_cluster = cluster_groups(clusters, mm, 0.9).labels()
    cluster_peak = tracemalloc.get_traced_memory()[1]
    h = random_hashes(rng, n)
    h[200_000:] = near(rng, h[src[200_000:]], 4)
    tracemalloc.reset_peak()
    hashed = hash_groups(h, 6).labels()
    hash_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    for got in (knn, per_cluster, hashed):
        assert (got[200_000:] == got[src[200_000:]]).all()
    assert (knn == per_cluster).all()
    data = n * 64 * 4  # 77 MB of vectors
    assert knn_peak < data / 4, knn_peak
    assert cluster_peak < data / 4, cluster_peak
    assert hash_peak < 200 * n, hash_peak  # a dozen arrays of n, no pair list
