"""Cost of the run directory's integrity checks: verify time vs read time.

Writes a run of ``--rows`` x ``--dim`` float16 vectors through the store (the embed
stage's own shard writer and manifest), then, in one process, times:
reading the column with checks off, reading it with checks on (size + xxh3 digest of
every shard + Parquet page checksums), ``verify`` alone; and for a FAISS IVF-Flat index
of the same vectors: opening it memory-mapped or fully, and its digest check.
Each figure is the best of ``--repeat`` interleaved rounds (the page cache is warm after the
first); the difference between the two reads is within the noise of one read, so the
``verify`` row (the digests alone) is the cost to read.

    python benchmarks/bench_store.py            # 1,000,000 x 512 (about 1 GB of shards)
    python benchmarks/bench_store.py --rows 100000 --repeat 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from embeddings.store import Column, EmbedManifest, Provenance, Run, ShardInfo, shard_bytes
from embeddings.store.files import check_file


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def make_run(path: Path, rows: int, dim: int, shard: int) -> Run:
    run = Run(path)
    rng = np.random.default_rng(0)
    prov = Provenance(type="synthetic", model="none", dim=dim, weights_sha256="0" * 64)
    col = Column("v_image", "images", "v", "image", "float16", prov)
    records = {"images": [], "captions": []}
    for b, start in enumerate(range(0, rows, shard)):
        n = min(shard, rows - start)
        vec = rng.standard_normal((n, dim), dtype=np.float32)
        vec /= np.linalg.norm(vec, axis=1, keepdims=True)
        ids = [f"i{start + i}" for i in range(n)]
        meta = {"id": ids, "image": ids, "split": [None] * n, "label": [None] * n,
                "labels": [[]] * n, "captions": [[]] * n}
        info = ShardInfo(b, ids, [])
        records["images"].append(run.embed.write_shard(
            "images", b, shard_bytes("images", meta, {"v_image": vec}, "float16", info)))
        empty = {k: [] for k in ("id", "image_id", "caption", "split", "label", "labels")}
        records["captions"].append(run.embed.write_shard(
            "captions", b, shard_bytes("captions", empty, {}, "float16", ShardInfo(b, [], []))))
    run.embed.write_manifest(EmbedManifest({}, {}, {"v_image": col}, records,
                                           {"count": 0, "by_reason": {}}, {}, "now"), [])
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--shard", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {faiss.omp_get_max_threads()}"
          f" threads; {args.rows:,} x {args.dim} float16 in shards of {args.shard:,}")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run = make_run(Path(tmp) / "run", args.rows, args.dim, args.shard)
        print(f"wrote the run in {time.perf_counter() - t:.1f} s")
        files = run.embed
        plain = checked = verify = float("inf")
        for _ in range(args.repeat):  # interleaved, so load changes hit both alike
            plain = min(plain, _best(lambda: files.read_vectors("v_image", verify=False), 1))
            checked = min(checked, _best(lambda: files.read_vectors("v_image", verify=True), 1))
            verify = min(verify, _best(files.verify, 1))
        print(f"read column, checks off : {plain:7.3f} s")
        print(f"read column, checks on  : {checked:7.3f} s  (+{100 * (checked / plain - 1):.1f}%)")
        print(f"verify shards alone     : {verify:7.3f} s  ({100 * verify / plain:.1f}% of a "
              "plain read)")

        x = files.read_vectors("v_image", verify=False)
        index = faiss.index_factory(args.dim, "IVF1024,Flat", faiss.METRIC_INNER_PRODUCT)
        index.train(x[:: max(1, len(x) // 65536)])
        index.add(x)
        rec = run.index.save("v_image", lambda p: faiss.write_index(index, str(p)))
        path = run.index.dir / rec["file"]
        full = _best(lambda: faiss.read_index(str(path)), args.repeat)
        mmap = _best(lambda: faiss.read_index(str(path), faiss.IO_FLAG_MMAP
                                              | faiss.IO_FLAG_READ_ONLY), args.repeat)
        digest = _best(lambda: check_file(path, rec, "index", ""), args.repeat)
        print(f"index file {rec['bytes'] / 2**30:.2f} GiB: full read {full:.3f} s, mmap open "
              f"{mmap:.4f} s, digest check {digest:.3f} s ({100 * digest / full:.1f}% of a "
              "full read)")


if __name__ == "__main__":
    main()
