"""The dedup stage at a million rows: ``python -m pipeline dedup`` beside ``index`` on one run.

A run of synthetic unit vectors with planted duplicate clusters (``bench_dedup_scale``'s
``planted``: each copy at cosine about 0.97 of its source, 2-5 copies per cluster, 10% of
the rows), written through the store's shard writer (image shards, ids, splits
train/val/test 70/15/15, no fingerprints: a run imported without images), then, each in
its own process timed with the peak RSS of its process tree:

1. ``python -m pipeline index`` under ``--memory-budget-gb`` (the baseline);
2. ``python -m pipeline dedup --by vector``: by default on an IVF index, exact pairs
   within each row's 3 nearest IVF lists (``--method clusters``);
3. the same with ``--method index``: the k-NN graph of every row through the index.

Reported per step: seconds, x the index build, peak RSS against the budget, and the recall
of the planted clusters read back from ``RUN/dedup/groups.parquet`` (a copy counts when it
is in its source's group).

    python benchmarks/bench_dedup_stage.py                  # 1,000,000 x 64, budget 1 GiB
    python benchmarks/bench_dedup_stage.py --rows 100000    # a quick check
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_dedup_scale import planted
from scale_measure import pipeline_cmd, run_cmd

from embeddings.store.imported import VectorShard, write_vectors_run

SHARD_ROWS = 100_000


def write_run(run: Path, x: np.ndarray) -> None:
    """The planted vectors as a run: ids r0.., splits by row (14/3/3 of every 20)."""
    n, d = x.shape

    def shards():
        for s in range(0, n, SHARD_ROWS):
            rows = np.arange(s, min(s + SHARD_ROWS, n))
            split = np.where(rows % 20 < 14, "train", np.where(rows % 20 < 17, "val", "test"))
            yield VectorShard(ids=[f"r{r}" for r in rows], vectors={"synth_image": x[rows]},
                              split=split.tolist())
    write_vectors_run(run, {"synth_image": d}, shards())


def planted_recall(run: Path, src: np.ndarray) -> tuple[float, int]:
    """Share of planted copies in their source's group, and the number of groups."""
    t = pq.read_table(run / "dedup" / "groups.parquet", columns=["group", "row"])
    label = np.arange(len(src), dtype=np.int64) + len(src)  # a row alone: its own label
    label[t.column("row").to_numpy()] = t.column("group").to_numpy()
    copies = np.flatnonzero(src != np.arange(len(src)))
    groups = int(t.column("group").to_numpy().max()) + 1 if t.num_rows else 0
    return float((label[copies] == label[src[copies]]).mean()), groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--copies", type=float, default=0.1)
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--work", help="folder for the run (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--no-knn", dest="knn", action="store_false",
                        help="leave out step 3 (the k-NN graph)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-dedup-"))
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    print(f"{args.rows:,} x {args.dim}, {args.copies:.0%} planted copies, budget "
          f"{args.budget_gb} GiB; {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
          flush=True)
    t = time.perf_counter()
    x, src = planted(args.rows, args.dim, args.copies, 0, work / "x.npy")
    write_run(run, x)
    del x
    (work / "x.npy").unlink()
    print(f"run written in {time.perf_counter() - t:.0f} s", flush=True)
    budget = str(args.budget_gb)
    steps = [("index build (baseline)", ["index", "--memory-budget", budget]),
             ("dedup (default: per IVF list, 3 nearest)", ["dedup", "--by", "vector"]),
             ("dedup, k-NN graph through the index (nprobe 8)",
              ["dedup", "--by", "vector", "--method", "index"])][:3 if args.knn else 2]
    rows = []
    for name, cmd in steps:
        res = run_cmd(pipeline_cmd(*cmd, "--run", str(run), "--no-progress",
                                   *(["--threshold", str(args.threshold)]
                                     if cmd[0] == "dedup" else [])), timeout=args.timeout)
        if res["returncode"] != 0:
            print(res["stderr"], file=sys.stderr)
            raise SystemExit(f"{name} failed ({res['returncode']})")
        rec = planted_recall(run, src) if cmd[0] == "dedup" else None
        rows.append((name, res["seconds"], res["peak_rss_gb"], rec))
        print(f"{name}: {res['seconds']:.1f} s, peak {res['peak_rss_gb']:.2f} GB, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
        if cmd[0] == "dedup":
            print(res["stdout"].strip())
    base = rows[0][1]
    print(f"\n| step | seconds | vs index build | peak RSS GiB (budget {budget}) | "
          "planted recall | groups |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, secs, peak, rec in rows:
        print(f"| {name} | {secs:.1f} | {secs / base:.2f}x | {peak:.2f} | "
              f"{'' if rec is None else f'{rec[0]:.4f}'} | "
              f"{'' if rec is None else f'{rec[1]:,}'} |")
    print(f"load at the end {os.getloadavg()[0]:.1f}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
