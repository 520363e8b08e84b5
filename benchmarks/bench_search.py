"""Search benchmark: brute force (numpy, torch, FAISS Flat) vs the automatically chosen index.

Synthetic, seeded, L2-normalised vectors with cluster structure (a mixture of Gaussians on
the sphere), queries drawn from the same mixture but not in the database.  For each size,
side by side in one run: build time, index memory, single-query latency p50/p99, batch
queries/s and recall@10 against exact search.  With a GPU build of FAISS and a GPU it also
reports FAISS GPU Flat on a 10k-query batch.

    python benchmarks/bench_search.py                 # 100k and 1M x 512 (a few minutes)
    python benchmarks/bench_search.py --quick         # 20k and 100k, fewer queries
    python benchmarks/bench_search.py --sizes 300000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embeddings import index as ix


def clustered(n: int, d: int, centers: np.ndarray, spread: float, seed: int,
              block: int = 100_000) -> np.ndarray:
    """``n`` unit vectors: a random center plus Gaussian noise of norm ~``spread``."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = rng.standard_normal((m, d), dtype=np.float32)
        x *= spread / np.sqrt(d)
        x += centers[rng.integers(0, len(centers), m)]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out


def topk_numpy(xb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    s = q @ xb.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def topk_torch(xb: torch.Tensor, q: np.ndarray, k: int) -> np.ndarray:
    with torch.inference_mode():
        return torch.topk(torch.from_numpy(q) @ xb.T, k, dim=1).indices.numpy()


def batched(fn: Callable[[np.ndarray], np.ndarray], q: np.ndarray,
            block: int = 256) -> np.ndarray:
    return np.concatenate([fn(q[s:s + block]) for s in range(0, len(q), block)])


def timed(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
          single: int, repeat: int = 2) -> dict[str, Any]:
    """Latency of ``single`` one-query calls (p50/p99, ms) and batch queries/s.

    The batch is timed ``repeat`` times and the best kept: on a shared machine other
    processes only ever make a run slower.
    """
    lat = []
    for q in queries[:single]:
        t = time.perf_counter()
        fn(q[None])
        lat.append(1000 * (time.perf_counter() - t))
    batch = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        ids = fn(queries)
        batch = min(batch, time.perf_counter() - t)
    if not lat:
        lat = [float("nan")]
    return {"p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "qps": len(queries) / batch, "ids": ids, "batch_queries": len(queries)}


def recall(ids: np.ndarray, truth: np.ndarray) -> float:
    """recall@k by ids (the synthetic vectors have no exact ties)."""
    return ix.recall_at_k(ids, truth[:len(ids)])


def bench_size(n: int, d: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    k = args.k
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.clusters, d), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    t = time.perf_counter()
    xb = clustered(n, d, centers, args.spread, args.seed + 1)
    xq = clustered(args.queries + args.tune_queries, d, centers, args.spread, args.seed + 2)
    xq, xt = xq[:args.queries], xq[args.queries:]
    truth_all = ix.exact_search(xb, np.concatenate([xq, xt]), k)
    truth, tune_truth = truth_all[:len(xq)], truth_all[len(xq):]
    print(f"  data + exact ground truth: {time.perf_counter() - t:.1f} s", flush=True)
    brute = xq  # the same batch for every method: FAISS Flat's q/s depends on batch size
    single_slow = args.single if n < 500_000 else max(10, args.single // 10)
    rows = []

    def add(name: str, build: float | None, memory: int, r: dict[str, Any]) -> None:
        row = {"method": name, "n": n, "d": d, "build_s": build, "memory_mb": memory / 2**20,
               "recall_at_10": recall(r.pop("ids"), truth), **r}
        rows.append(row)
        print(f"  {name}: {_fmt(row)}", flush=True)

    add("numpy brute force", None, xb.nbytes,
        timed(lambda q: batched(lambda b: topk_numpy(xb, b, k), q), brute, single_slow))
    xb_torch = torch.from_numpy(xb)  # shares the array's memory
    add("torch brute force", None, xb.nbytes,
        timed(lambda q: batched(lambda b: topk_torch(xb_torch, b, k), q), brute, single_slow))

    t = time.perf_counter()
    flat = faiss.IndexFlatIP(d)
    flat.add(xb)
    build = time.perf_counter() - t
    add("faiss Flat", build, n * d * 4, timed(lambda q: flat.search(q, k)[1], brute, single_slow))
    if ix.use_gpu("auto"):
        gpu = ix.to_gpu(flat)
        many = clustered(10_000, d, centers, args.spread, args.seed + 3)
        gpu.search(many[:100], k)  # warm up (kernels, memory pools)
        add("faiss GPU Flat (10k-query batch)", None, n * d * 4,
            timed(lambda q: gpu.search(q, k)[1], many, args.single))
        rows[-1]["recall_at_10"] = None  # other queries than the ground truth's
        gpu.reset()
    flat.reset()  # free its copy of the vectors before the next build

    choice = ix.choose_index(n, d, int(args.memory_budget_gb * 2**30))
    t = time.perf_counter()
    index = ix.build_index(xb, choice.factory, seed=args.seed)
    build = time.perf_counter() - t
    t = time.perf_counter()
    params = ix.tune(index, xt, tune_truth, k, args.target_recall)
    tune_s = time.perf_counter() - t
    label = f"auto: {choice.factory}" + "".join(f" {a}={v}" for a, v in params.items())
    add(label, build, ix.index_bytes(index),
        timed(lambda q: ix.search(index, q, k)[1], xq, args.single))
    rows[-1].update(tune_s=tune_s, factory=choice.factory, params=params,
                    reason=choice.reason, **open_times(index, choice.factory))
    print(f"  {label}: tuning {tune_s:.1f} s; opening the saved index: "
          f"{rows[-1]['open_mmap_s']:.3f} s memory-mapped, {rows[-1]['open_read_s']:.3f} s read")
    return rows


def real_vectors(name: str, n: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(database, held-out queries) from a real set of ``real_data`` (MiniLM of words)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_data

    x = real_data.load(name)["minilm"]  # rows are in a seeded random order
    if n + queries > len(x):
        raise SystemExit(f"{name} has {len(x)} vectors, fewer than {n} + {queries} queries")
    return np.ascontiguousarray(x[queries:queries + n]), np.ascontiguousarray(x[:queries])


def bench_tiers(data: str, n: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Flat vs HNSW32 vs IVF on one dataset, each tuned to ``target_recall`` on separate
    queries: build time, memory, batch q/s and recall@10 (ties count as hits)."""
    k, nq = args.k, args.queries + args.tune_queries
    if data == "synthetic":
        rng = np.random.default_rng(args.seed)
        centers = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        xb = clustered(n, args.dim, centers, args.spread, args.seed + 1)
        xq = clustered(nq, args.dim, centers, args.spread, args.seed + 2)
    else:
        xb, xq = real_vectors(data, n, nq)
    xq, xt = xq[:args.queries], xq[args.queries:]
    t_scores, truth = ix.exact_knn(xb, xq, k)
    tune_scores, tune_truth = ix.exact_knn(xb, xt, k)
    rows = []
    for factory in ["Flat", "HNSW32", f"IVF{ix.ivf_lists(n)},Flat"]:
        t = time.perf_counter()
        index = ix.build_index(xb, factory, seed=args.seed)
        build = time.perf_counter() - t
        params = ix.tune(index, xt, tune_truth, k, args.target_recall, xb, tune_scores)
        r = timed(lambda q, index=index: ix.search(index, q, k)[1], xq, 0)
        ids = r.pop("ids")
        row = {"data": data, "n": n, "d": xb.shape[1], "factory": factory, "params": params,
               "build_s": build, "memory_mb": ix.index_bytes(index) / 2**20, "qps": r["qps"],
               "recall_at_10": ix.tie_recall(ids, t_scores, truth, xb, xq)}
        rows.append(row)
        print(f"  {data} n={n:,} {factory} {params}: build {build:.1f} s, "
              f"{row['memory_mb']:.0f} MB, {row['qps']:,.0f} q/s, recall@10 "
              f"{row['recall_at_10']:.3f}", flush=True)
        del index
    return rows


def tier_table(rows: list[dict[str, Any]]) -> str:
    head = ["data", "n x d", "index", "search param", "build s", "memory MB", "batch q/s",
            "recall@10"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        param = ", ".join(f"{a}={v}" for a, v in r["params"].items()) or "-"
        out.append("| " + " | ".join([
            r["data"], f"{r['n']:,} x {r['d']}", r["factory"], param, f"{r['build_s']:.1f}",
            f"{r['memory_mb']:.0f}", f"{r['qps']:,.0f}", f"{r['recall_at_10']:.3f}"]) + " |")
    return "\n".join(out)


def open_times(index: faiss.Index, factory: str) -> dict[str, float]:
    """Seconds to open the saved index memory-mapped and read into memory."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.faiss"
        ix.save_index(index, path)
        out = {}
        for name, mmap in (("open_mmap_s", True), ("open_read_s", False)):
            t = time.perf_counter()
            ix.load_index(path, mmap=mmap, factory=factory)
            out[name] = time.perf_counter() - t
        return out


def _fmt(r: dict[str, Any]) -> str:
    build = "-" if r["build_s"] is None else f"{r['build_s']:.1f}"
    rec = "-" if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}"
    return (f"build {build} s, {r['memory_mb']:.0f} MB, p50 {r['p50_ms']:.2f} ms, "
            f"p99 {r['p99_ms']:.2f} ms, {r['qps']:.0f} q/s ({r['batch_queries']} queries), "
            f"recall@10 {rec}")


def table(rows: list[dict[str, Any]]) -> str:
    head = ["n", "method", "build s", "memory MB", "p50 ms", "p99 ms", "batch q/s",
            "recall@10", "q/s vs numpy"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {r["n"]: r["qps"] for r in rows if r["method"] == "numpy brute force"}
    for r in rows:
        out.append("| " + " | ".join([
            f"{r['n']:,}", r["method"], "-" if r["build_s"] is None else f"{r['build_s']:.1f}",
            f"{r['memory_mb']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
            f"{r['qps']:,.0f}", "-" if r["recall_at_10"] is None else f"{r['recall_at_10']:.3f}",
            f"{r['qps'] / base[r['n']]:.1f}x"]) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="20k and 100k, fewer queries")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, default=1000, help="batch of queries (all methods)")
    p.add_argument("--tune-queries", type=int, default=500)
    p.add_argument("--single", type=int, default=200, help="one-query calls for latency")
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--spread", type=float, default=1.0, help="noise norm (center norm 1)")
    p.add_argument("--memory-budget-gb", type=float, default=4.0)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--tiers", nargs="*", metavar="DATA:N",
                   help="compare Flat / HNSW32 / IVF instead, e.g. words:100000 "
                        "synthetic:300000 (words: MiniLM of /usr/share/dict words; "
                        "debian: MiniLM of package descriptions)")
    args = p.parse_args(argv)
    if args.tiers is not None:
        rows = []
        for spec in args.tiers or ["words:100000", "words:160000", "synthetic:300000"]:
            data, n = spec.split(":")
            rows += bench_tiers(data, int(n), args)
        print()
        print(tier_table(rows))
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        return 0
    if args.quick:
        args.sizes, args.queries, args.single = [20_000, 100_000], 500, 50
    threads = faiss.omp_get_max_threads()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"FAISS {faiss.__version__} ({threads} threads, GPUs: {faiss.get_num_gpus()}), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy "
          f"{np.__version__}")
    if not ix.use_gpu("auto"):
        print("FAISS GPU Flat: not measured (no GPU build of FAISS or no GPU here)")
    rows = []
    for n in args.sizes:
        print(f"n={n:,} d={args.dim}: {args.clusters} clusters, spread {args.spread}, "
              f"seed {args.seed}", flush=True)
        rows += bench_size(n, args.dim, args)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
