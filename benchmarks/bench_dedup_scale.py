"""The grouping library at a million rows: time and memory beside a FAISS index build.

Synthetic unit vectors with planted duplicate clusters (each copy at cosine about 0.97 of
its source, 2-5 copies per planted cluster), and 64-bit hashes with planted near copies.
In one run, on the same data:

- baseline: an IVF index build (k-means on a sample, add every vector), as the index
  stage would make for this size;
- k-NN path: every vector searched in that index (k neighbours), the batches fed to
  ``knn_groups`` (search and grouping timed apart);
- per-cluster path: each row's nearest IVF lists (2, then 3), ``cluster_groups`` over a
  memory map of the vectors (SemDeDup style);
- hashes: ``hash_groups`` of the planted hashes.

Reported: seconds, traced peak memory of the grouping (numpy allocations), and the recall
of the planted clusters (copies that landed in their source's group).

    python benchmarks/bench_dedup_scale.py                    # 1,000,000 x 64
    python benchmarks/bench_dedup_scale.py --rows 200000 --dim 128
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from embeddings.dedup import cluster_groups, hash_groups, knn_groups


def planted(n: int, d: int, copies: float, seed: int, out: Path) -> tuple[np.ndarray, ...]:
    """A memory map of ``n`` unit vectors (float32), the last ``copies * n`` of them near
    copies of earlier rows; returns it and each row's source (itself for an original)."""
    rng = np.random.default_rng(seed)
    n_copy = int(n * copies)
    n_base = n - n_copy
    x = np.lib.format.open_memmap(out, mode="w+", dtype=np.float32, shape=(n, d))
    for s in range(0, n_base, 100_000):
        e = min(s + 100_000, n_base)
        v = rng.standard_normal((e - s, d), dtype=np.float32)
        x[s:e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    # planted clusters of 2-5 copies: sources drawn without repeats
    sizes = rng.integers(2, 6, n_copy)
    sizes = sizes[np.cumsum(sizes) <= n_copy]
    src = np.arange(n)
    heads = rng.choice(n_base, len(sizes), replace=False)
    copy_src = np.repeat(heads, sizes)
    copy_src = np.r_[copy_src, rng.choice(n_base, n_copy - len(copy_src), replace=False)]
    noise = 0.03 * np.sqrt(64 / d)  # cosine ~0.97 whatever the dimension
    for s in range(0, n_copy, 100_000):
        e = min(s + 100_000, n_copy)
        v = x[copy_src[s:e]] + noise * rng.standard_normal((e - s, d), dtype=np.float32)
        x[n_base + s:n_base + e] = v / np.linalg.norm(v, axis=1, keepdims=True)
    src[n_base:] = copy_src
    x.flush()
    return x, src


def recall(labels: np.ndarray, src: np.ndarray) -> float:
    copies = np.flatnonzero(src != np.arange(len(src)))
    return float((labels[copies] == labels[src[copies]]).mean())


def timed(fn):
    t = time.perf_counter()
    tracemalloc.start()
    out = fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, time.perf_counter() - t, peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--copies", type=float, default=0.1, help="share of rows that are copies")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--hash-distance", type=int, default=8)
    parser.add_argument("--lists", type=int, nargs="+", default=[2, 3],
                        help="IVF lists per row for the per-cluster path (one run each)")
    args = parser.parse_args(argv)
    n, d = args.rows, args.dim
    nlist = int(4 * np.sqrt(n))
    print(f"{n:,} x {d} float32, {args.copies:.0%} planted copies; IVF{nlist},Flat; "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        x, src = planted(n, d, args.copies, 0, Path(tmp) / "x.npy")
        rng = np.random.default_rng(1)
        t = time.perf_counter()
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.asarray(x[np.sort(rng.choice(n, min(n, 64 * nlist), replace=False))]))
        for s in range(0, n, 100_000):
            index.add(np.asarray(x[s:s + 100_000]))
        build = time.perf_counter() - t
        index.nprobe = args.nprobe
        rows = [("IVF index build (baseline)", build, None, None)]

        searched = [0.0]

        def batches():
            for s in range(0, n, 16384):
                t0 = time.perf_counter()
                sims, nbrs = index.search(np.asarray(x[s:s + 16384]), args.k)
                searched[0] += time.perf_counter() - t0
                yield np.arange(s, s + len(nbrs)), nbrs, sims

        uf, secs, peak = timed(lambda: knn_groups(n, batches(), args.threshold))
        rows.append((f"k-NN search (k={args.k}, nprobe={args.nprobe})", searched[0], None,
                     None))
        rows.append(("k-NN grouping (union-find)", secs - searched[0], peak,
                     recall(uf.labels(), src)))
        t = time.perf_counter()
        most = max(args.lists)
        assign = np.vstack([quantizer.search(np.asarray(x[s:s + 100_000]), most)[1]
                            for s in range(0, n, 100_000)])
        rows.append((f"IVF list assignment ({most} nearest lists)", time.perf_counter() - t,
                     None, None))
        for a in args.lists:
            uf, secs, peak = timed(lambda a=a: cluster_groups(assign[:, :a], x,
                                                               args.threshold))
            rows.append((f"per-cluster grouping ({a} lists per row)", secs, peak,
                         recall(uf.labels(), src)))
        bits = rng.integers(0, 2, (n, 64), dtype=np.uint64) << np.arange(64, dtype=np.uint64)
        hashes = np.bitwise_or.reduce(bits, axis=1)
        del bits
        flip = np.uint64(1) << rng.integers(0, 64, (n, 3)).astype(np.uint64)
        copies = np.flatnonzero(src != np.arange(n))
        hashes[copies] = hashes[src[copies]] ^ np.bitwise_xor.reduce(flip[copies], axis=1)
        uf, secs, peak = timed(lambda: hash_groups(hashes, args.hash_distance))
        rows.append((f"hash grouping (<= {args.hash_distance} bits)", secs, peak,
                     recall(uf.labels(), src)))
    print("| step | seconds | vs index build | traced peak MB | planted recall |")
    print("|---|---:|---:|---:|---:|")
    for name, secs, peak, rec in rows:
        print(f"| {name} | {secs:.1f} | {secs / build:.2f}x | "
              f"{'' if peak is None else f'{peak / 2**20:.0f}'} | "
              f"{'' if rec is None else f'{rec:.4f}'} |")
    print(f"vectors: {n * d * 4 / 2**20:.0f} MB; load at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
