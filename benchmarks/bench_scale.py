"""Scale benchmark: tens of millions of vectors on one machine, our index vs autofaiss.

Writes N clustered synthetic 512-d float16 vectors with metadata through the store's shard
writer (``scale_data``), then in one run, each step a separate process measured with the
peak resident memory of its whole process tree:

- ``build``: our index build (``python -m pipeline index``) at ``--budget-gb``: seconds,
  peak RSS, index bytes, recall@10 against exact search on 1,000 held-out queries
  (streaming brute force over the shards), single-query p50/p99 and batch q/s, the index
  memory-mapped as ``search`` opens it;
- ``ray``: the same build with ``--engine ray --workers 2`` (local Ray cluster), checked
  equal to the local one (the lists file's digest);
- ``autofaiss``: ``build_index`` at the same budget, reading our shards, in its own
  virtualenv (made here with ``pip install autofaiss`` when missing): the same figures,
  or its failure;
- ``add``: 1,000,000 more rows appended as new shards, then ``index`` (rows read counted);
- ``read``: streaming a column through the store vs ``pyarrow.parquet.read_table`` plus a
  zero-copy numpy view of the same shards;
- ``filters``: filtered recall@10 (200 queries, exact filtered answers from one streaming
  pass) and per-query latency for a split (15% of every list) and a label made of 3 of the
  256 clusters (1.2%), next to the previous rule (nprobe / share) in the same run;
- ``search``: CLI ``search`` with and without ``--split`` / ``--label``, next to the time
  of ``import torch, open_clip`` alone (median of three), and each step of one search;
- ``serve``: time until ``serve`` listens, then queries with and without filters (p50,
  p99);
- ``heads``: logistic and concat on image + caption columns of a separate run of
  ``--heads-n`` labelled rows.

    python benchmarks/bench_scale.py --n 1000000 --dir /tmp/scale      # quick check
    python benchmarks/bench_scale.py                                   # 20,000,000 rows
    python benchmarks/bench_scale.py --phases search serve             # some steps again

Results go to DIR/results.json (each step as it finishes) and a summary is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import scale_data
import scale_filters
import scale_measure as sm

from embeddings.store import Run

PHASES = ["data", "build", "ray", "autofaiss", "add", "read", "filters", "search", "serve",
          "heads"]
AUTOFAISS_VENV = Path(__file__).resolve().parent / ".venv-autofaiss"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000_000)
    p.add_argument("--dir", type=Path, default=Path("runs/bench-scale"))
    p.add_argument("--budget-gb", type=float, default=4.0)
    p.add_argument("--add", type=int, default=1_000_000)
    p.add_argument("--shard-rows", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--heads-n", type=int, default=5_000_000)
    p.add_argument("--heads-budget-gb", type=float, default=8.0,
                   help="[heads] memory_budget_gb of the heads step")
    p.add_argument("--heads-list", default="logistic,concat", help="heads of the heads step")
    p.add_argument("--heads-param", nargs="*", default=[], metavar="HEAD.KEY=VALUE",
                   help="head parameters of the heads step (recorded with its figures)")
    p.add_argument("--phases", nargs="+", default=PHASES, choices=PHASES)
    p.add_argument("--keep", action="store_true", help="keep the data (default: delete it)")
    a = p.parse_args()
    a.dir.mkdir(parents=True, exist_ok=True)
    out = a.dir / "results.json"
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res["machine"] = {"cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "memory_gb": _mem_gb(), "n": a.n,
                      "budget_gb": a.budget_gb}
    _, prov = scale_data.encoder(a.dir / "models")
    run = a.dir / "run"
    queries = scale_data.held_out(a.queries, prov.dim)
    for phase in a.phases:
        print(f"--- {phase} (load {sm.load()})", flush=True)
        t, load = time.perf_counter(), sm.load()
        res[phase] = {**globals()[f"phase_{phase}"](a, run, prov, queries, res),
                      "load_before": load}
        res[phase]["phase_seconds"] = round(time.perf_counter() - t, 1)
        res[phase]["load_after"] = sm.load()
        out.write_text(json.dumps(res, indent=2, default=str))
        print(json.dumps(res[phase], indent=1, default=str)[:3000], flush=True)
    if not a.keep:
        for path in (run, a.dir / "heads-run", a.dir / "autofaiss"):
            shutil.rmtree(path, ignore_errors=True)
    print(summary(res))


def _mem_gb() -> float:
    with open("/proc/meminfo") as f:
        return round(int(f.readline().split()[1]) / 2**20, 1)


def _truth(a: argparse.Namespace, run: Path, queries: np.ndarray) -> np.ndarray:
    """Exact top-10 of the held-out queries (cached beside the run: one pass over it)."""
    rows = Run(run).embed.manifest().rows("images")
    path = a.dir / f"truth-{rows}.npy"
    if not path.exists():
        t = time.perf_counter()
        np.save(path, sm.exact_truth(run, "clip_image", queries)[1])
        print(f"exact truth over {rows} rows: {time.perf_counter() - t:.0f} s", flush=True)
    return np.load(path)


# ------------------------------------------------------------------------------ phases

def phase_data(a, run, prov, queries, res) -> dict[str, Any]:
    if run.exists() and Run(run).embed.has_manifest() and \
            Run(run).embed.manifest().rows("images") == a.n:
        return {"rows": a.n, "reused": True}
    shutil.rmtree(run, ignore_errors=True)
    t = time.perf_counter()
    scale_data.write(run, a.n, prov, a.shard_rows)
    size = sum(f.stat().st_size for f in (run / "embed").rglob("*.parquet"))
    return {"rows": a.n, "seconds": round(time.perf_counter() - t, 1),
            "shards": len(list((run / "embed/images").glob("*.parquet"))),
            "shard_gb": round(size / 2**30, 2)}


def _index(a, run, *extra: str) -> dict[str, Any]:
    return sm.run_cmd(sm.pipeline_cmd("index", "--run", str(run), "--memory-budget",
                                      str(a.budget_gb), "--no-progress", *extra))


def phase_build(a, run, prov, queries, res) -> dict[str, Any]:
    shutil.rmtree(run / "index", ignore_errors=True)
    got = _index(a, run)
    if got["returncode"]:
        return got
    return {**_trim(got), **sm.ours(run, "clip_image", queries, _truth(a, run, queries))}


def phase_ray(a, run, prov, queries, res) -> dict[str, Any]:
    """The same build on Ray; the local index is replaced by it (it is the same index when
    the lists file's digest matches, and the disk holds one copy, not two)."""
    local = Run(run).index.entries()["clip_image"]
    got = _index(a, run, "--rebuild", "--engine", "ray", "--workers", "2")
    if got["returncode"]:
        return got
    ray = Run(run).index.entries()["clip_image"]
    same = (ray.lists["digest"] == local.lists["digest"]) if ray.lists and local.lists \
        else ray.digest == local.digest
    return {**_trim(got), "same_lists_as_local": same, "recall_at_10_recorded":
            ray.recall_at_10, "stats": ray.stats}


def phase_autofaiss(a, run, prov, queries, res) -> dict[str, Any]:
    py = AUTOFAISS_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(AUTOFAISS_VENV)], check=True)
        # autofaiss pins numpy < 2; the newest pyarrow needs numpy >= 2: pin one that fits.
        subprocess.run([str(py), "-m", "pip", "install", "-q", "autofaiss", "pyarrow<20"],
                       check=True)
    version = subprocess.run([str(py), "-c", "import autofaiss, faiss; print(autofaiss."
                              "__version__ if hasattr(autofaiss, '__version__') else '?', "
                              "faiss.__version__)"], capture_output=True, text=True).stdout
    out = a.dir / "autofaiss"
    shutil.rmtree(out, ignore_errors=True)
    ours = float(res.get("build", {}).get("seconds", 0))
    limit = max(600.0, 1.5 * ours)  # stopped at 1.5x our build: slower is the answer
    got = sm.run_cmd([str(py), str(Path(__file__).parent / "scale_autofaiss.py"),
                      str(run / "embed" / "images"), str(out), str(a.budget_gb),
                      str(os.cpu_count())], timeout=limit)
    if got["returncode"] and got["seconds"] >= limit:
        got["stderr"] += f"\nstopped after {limit:.0f} s (1.5x our build)"
    line = (got["stdout"].strip().splitlines() or ["{}"])[-1]
    try:
        result = json.loads(line)
    except json.JSONDecodeError:
        result = {"ok": False, "error": got["stderr"][-1500:]}
    row = {**_trim(got), "versions": version.strip(), **result}
    if result.get("ok") and (out / "knn.index").exists():
        params = str((result.get("infos") or {}).get("index_param", ""))
        row.update(sm.theirs(out / "knn.index", params, queries, _truth(a, run, queries)))
    return row


def phase_add(a, run, prov, queries, res) -> dict[str, Any]:
    before = Run(run).embed.manifest().rows("images")
    t = time.perf_counter()
    scale_data.write(run, a.add, prov, a.shard_rows, seed=1, append=True)
    wrote = time.perf_counter() - t
    got = _index(a, run)
    entry = Run(run).index.entries()["clip_image"]
    return {**_trim(got), "write_seconds": round(wrote, 1), "rows_before": before,
            "rows_after": entry.ntotal, "rows_read": entry.stats.get("rows_read"),
            "added_shards": entry.stats.get("added_shards"),
            "recall_at_10_recorded": entry.recall_at_10}


def phase_read(a, run, prov, queries, res) -> dict[str, Any]:
    return sm.read_rates(run, "clip_image", shards=10)


def phase_filters(a, run, prov, queries, res) -> dict[str, Any]:
    return scale_filters.filtered_recall(run, "clip_image", queries[:200])


def phase_search(a, run, prov, queries, res) -> dict[str, Any]:
    """An image query (the run has image rows only: no caption column to prove a text
    tower), so the query needs torch, open_clip and PIL.  ``import torch, open_clip,
    PIL.Image`` alone is timed before and after each kind of search (its median is the
    baseline: it swings by seconds on a loaded machine); each kind runs three times (the
    median counts), a rare label first once alone (it builds the filter's cache);
    ``breakdown`` times each step of one search per filter in one process."""
    image = str(sm.REPO / "data/demo/images/animals/abeille_tanguy_jacq_01.png")
    imports = []

    def imp() -> None:
        imports.append(sm.run_cmd([sys.executable, "-c",
                                   "import torch, open_clip, PIL.Image"])["seconds"])

    runs = {}
    imp()
    for name, extra, times in (("label_first", ["--label", "rare"], 1),
                               ("plain", [], 3), ("split", ["--split", "test"], 3),
                               ("label", ["--label", "rare"], 3)):
        got = [sm.run_cmd(sm.pipeline_cmd("search", "--run", str(run), "--image", image,
                                          "--json", "--device", "cpu", *extra))
               for _ in range(times)]
        last = got[-1]
        hits = len(json.loads(last["stdout"])["hits"]) if last["returncode"] == 0 else None
        runs[name] = {"seconds": round(float(np.median([g["seconds"] for g in got])), 2),
                      "runs_s": [g["seconds"] for g in got],
                      "peak_rss_gb": max(g["peak_rss_gb"] for g in got), "hits": hits,
                      **({"stderr": last["stderr"][-500:]} if last["returncode"] else {})}
        imp()
    base = float(np.median(imports))
    for r in runs.values():
        r["beyond_import_s"] = round(r["seconds"] - base, 2)
    return {"import_torch_open_clip_s": round(base, 2), "import_runs_s": imports, **runs,
            "breakdown": sm.search_steps(run, image)}


def phase_serve(a, run, prov, queries, res) -> dict[str, Any]:
    return sm.serve_latency(run)


def phase_heads(a, run, prov, queries, res) -> dict[str, Any]:
    heads_run = a.dir / "heads-run"
    if not a.keep:  # the main run is done with: its disk goes to this one
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(a.dir / "autofaiss", ignore_errors=True)
    if not (Run(heads_run).embed.has_manifest() and
            Run(heads_run).embed.manifest().rows("images") == a.heads_n):
        shutil.rmtree(heads_run, ignore_errors=True)
        scale_data.write(heads_run, a.heads_n, prov, a.shard_rows, seed=5, captions=True)
    cached = [p.name for p in Run(heads_run).heads.cache.files()]
    got = sm.run_cmd(sm.pipeline_cmd("heads", "--run", str(heads_run), "--heads",
                                     a.heads_list, "--inputs", "clip_image,clip_text",
                                     "--multilabel", "", "--multitask", "", "--memory-budget",
                                     str(a.heads_budget_gb),
                                     *[x for v in a.heads_param for x in ("--param", v)]))
    out = {**_trim(got), "rows": a.heads_n, "budget_gb": a.heads_budget_gb,
           "heads_list": a.heads_list, "params": a.heads_param,
           "cache_before": cached, "table": got["stdout"][-2500:]}
    report = heads_run / "heads" / "comparison.json"
    if got["returncode"] == 0 and report.exists():
        rows = json.loads(report.read_text())["rows"]
        out["heads"] = [{**{k: r[k] for k in ("head", "inputs", "accuracy", "macro_f1",
                                              "train_s", "rows", "eval_split")},
                         "info": {k: v for k, v in r["info"].items()
                                  if k not in ("fits", "val_by_round")}} for r in rows]
        out["cache_gb"] = round(sum(p.stat().st_size for p in Run(heads_run).heads.cache
                                    .files()) / 2**30, 2)
    return out


def _trim(got: dict[str, Any]) -> dict[str, Any]:
    keep = {k: got[k] for k in ("seconds", "peak_rss_gb", "returncode")}
    keep["output"] = (got["stdout"] + got["stderr"])[-1500:]
    return keep


def summary(res: dict[str, Any]) -> str:
    lines = [f"machine: {res['machine']}"]
    for phase in PHASES:
        r = res.get(phase)
        if not r:
            continue
        brief = {k: v for k, v in r.items() if k not in ("output", "stats", "build_stats",
                                                         "trace", "infos", "table")}
        lines.append(f"{phase}: {json.dumps(brief, default=str)[:600]}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
