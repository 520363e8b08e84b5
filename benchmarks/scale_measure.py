"""Measurement helpers of ``bench_scale``: commands with the peak memory of their process
tree, exact ground truth by streaming the shards, recall and latency of an index."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embeddings.store import Run

REPO = Path(__file__).resolve().parents[1]


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    """``root`` and its descendants (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


class TreeMemory:
    """Polls the summed resident memory of a process tree; ``peak`` is the largest sum."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))
            self._stop.wait(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_cmd(cmd: list[str], timeout: float | None = None,
            env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``: seconds, peak RSS of its process tree, exit code, output tails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})
    mem = TreeMemory(proc.pid)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    peak = mem.stop()
    return {"cmd": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_gb": round(peak / 2**30, 3), "returncode": proc.returncode,
            "stdout": out[-200_000:], "stderr": err[-3000:]}


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def exact_truth(run: Path, column: str, queries: np.ndarray, k: int = 10,
                chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k (scores, ids) of ``queries`` by streaming brute force over the shards."""
    from embeddings.index import merge_topk

    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for c in Run(run).embed.iter_column(column, chunk_rows=chunk):
        s, i = faiss.knn(queries, np.asarray(c.vectors, np.float32), k,
                         metric=faiss.METRIC_INNER_PRODUCT)
        scores, ids = merge_topk([scores, s], [ids, i + c.start], k)
    return scores, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def latency(search: Any, queries: np.ndarray, k: int = 10, warm: int = 20
            ) -> dict[str, float]:
    """Single-query p50/p99 (ms) after ``warm`` queries, and batch queries/s."""
    for q in queries[:warm]:
        search(q[None], k)
    times = []
    for q in queries:
        t = time.perf_counter()
        search(q[None], k)
        times.append(time.perf_counter() - t)
    t = time.perf_counter()
    search(queries, k)
    batch = len(queries) / (time.perf_counter() - t)
    return {"p50_ms": round(1000 * float(np.percentile(times, 50)), 2),
            "p99_ms": round(1000 * float(np.percentile(times, 99)), 2),
            "batch_qps": round(batch, 1)}


def ours(run: Path, column: str, queries: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Our index as search opens it (memory-mapped): recall and latency."""
    from embeddings import index as ix
    from pipeline.index import open_index

    index, entry = open_index(run, column)
    found = ix.search(index, queries, 10)[1]
    size = entry.bytes + (entry.lists["bytes"] if entry.lists else 0)
    out = {"factory": entry.factory, "params": entry.params, "on_disk": bool(entry.lists),
           "index_gb": round(size / 2**30, 3), "recall_at_10": round(recall(found, truth), 4),
           **latency(lambda q, k: ix.search(index, q, k), queries)}
    out["build_stats"] = entry.stats
    return out


def theirs(index_path: Path, params: str, queries: np.ndarray,
           truth: np.ndarray) -> dict[str, Any]:
    """autofaiss's index (memory-mapped, its own search parameters)."""
    index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)
    found = index.search(queries, 10)[1]
    return {"index_gb": round(index_path.stat().st_size / 2**30, 3), "params": params,
            "recall_at_10": round(recall(found, truth), 4),
            **latency(lambda q, k: index.search(q, k), queries)}


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def read_rates(run: Path, column: str, shards: int = 10, repeat: int = 3) -> dict[str, Any]:
    """The column of the first ``shards`` shards: the store's digest-checked stream vs
    ``pyarrow.parquet.read_table`` plus a zero-copy numpy view (best of ``repeat``,
    interleaved; the page cache is warm after the first round)."""
    import pyarrow.parquet as pq

    files = Run(run).embed
    records = files.manifest().shards["images"][:shards]
    paths = [files.shard_path(r) for r in records]
    rows = sum(r.rows for r in records)

    def baseline() -> None:
        for path in paths:
            col = pq.read_table(path, columns=[column]).column(0).combine_chunks()
            col.flatten().to_numpy(zero_copy_only=True)

    def store() -> None:
        for _ in files.iter_column(column, shards=range(len(records))):
            pass

    best = {"pyarrow_numpy": float("inf"), "store_stream": float("inf")}
    for _ in range(repeat):
        for name, fn in (("pyarrow_numpy", baseline), ("store_stream", store)):
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    dim = files.manifest().column(column).dim
    gb = rows * dim * 2 / 2**30
    return {"rows": rows, "gb_float16": round(gb, 3),
            **{f"{k}_s": round(v, 3) for k, v in best.items()},
            **{f"{k}_gb_per_s": round(gb / v, 2) for k, v in best.items()},
            "store_over_baseline": round(best["store_stream"] / best["pyarrow_numpy"], 2)}


SEARCH_STEPS = """
import json, sys, time
t = time.perf_counter()
steps = {}
def lap(name):
    global t
    now = time.perf_counter()
    steps[name] = round(now - t, 3)
    t = now
import torch, open_clip, PIL.Image
lap("import torch, open_clip, PIL")
import pipeline.cli, pipeline.search
from embeddings import index as ix
lap("import pipeline (cli, search)")
run, image = sys.argv[1], sys.argv[2]
s = pipeline.search.Searcher(run, "clip_image", device="cpu")
lap("open index, manifests, reader")
s.encoder
lap("load encoder")
v = s.embed_image(image)
lap("embed query")
out = {"steps": steps}
for name, split, label in (("plain", None, None), ("split", "test", None),
                           ("label", None, "rare")):
    t = time.perf_counter()
    steps = {}
    allowed = s.allowed(split, label)
    lap("filter bitmap")
    scores, ids = ix.search_filtered(s.index, v, 10, allowed)
    lap("faiss search")
    hits = s.hits(scores[0], ids[0])
    lap("hit metadata")
    out[name] = steps
print(json.dumps(out))
"""


def search_steps(run: Path, image: str) -> dict[str, Any]:
    """Seconds of each step of a CLI search (image query) in one fresh process, then of
    each query kind: filter bitmap, FAISS, the hits' metadata."""
    import json

    got = run_cmd([sys.executable, "-c", SEARCH_STEPS, str(run), image])
    if got["returncode"]:
        return {"error": got["stderr"][-800:]}
    return json.loads(got["stdout"].strip().splitlines()[-1])


def serve_latency(run: Path, repeat: int = 20) -> dict[str, Any]:
    """Seconds until ``serve`` answers, then per query kind the first and the median
    latency over ``repeat`` (a "more like this" query: the run has image rows only, so
    there is no text column to search with; the first query of a filter computes and
    caches its bitmap)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    port = _free_port()
    cmd = pipeline_cmd("serve", "--run", str(run), "--port", str(port), "--device", "cpu")
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    mem = TreeMemory(proc.pid)
    out: dict[str, Any] = {}
    try:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(url + "api/health", timeout=600) as r:
                    health = json.loads(r.read())
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.05)
        else:
            return {"error": (proc.stderr.read() if proc.stderr else "")[-1500:]}
        out["start_s"] = round(time.perf_counter() - t0, 2)
        out["start_rss_gb"] = round(sum(_rss(p) for p in _tree(proc.pid)) / 2**30, 3)
        out["health_filters"] = {k: len(health[k]) for k in ("splits", "labels")}

        rows = np.random.default_rng(0).integers(0, health["images"], 1 + 4 * (repeat + 1))
        asked = iter(rows.tolist())

        def ask(**params: str) -> tuple[float, int]:
            """A query for another row each time: no two answers share a cache entry."""
            t = time.perf_counter()
            with urllib.request.urlopen(url + "api/similar?" + urllib.parse.urlencode(
                    {"id": f"r{next(asked)}", "k": "10", **params}), timeout=600) as r:
                hits = len(json.loads(r.read())["hits"])
            return time.perf_counter() - t, hits

        ask()  # the server's first query (imports, first reads)
        for name, params in (("plain", {}), ("split", {"split": "test"}),
                             ("label", {"label": "rare"}),
                             ("split_label", {"split": "val", "label": "l7"})):
            first, hits = ask(**params)
            times = [ask(**params)[0] for _ in range(repeat)]
            out[name] = {"first_ms": round(1000 * first, 1), "hits": hits,
                         "p50_ms": round(1000 * float(np.median(times)), 1),
                         "p99_ms": round(1000 * float(np.percentile(times, 99)), 1)}
        out["peak_rss_gb"] = round(mem.peak / 2**30, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        mem.stop()
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
