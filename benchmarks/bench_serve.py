"""Load benchmark of ``python -m pipeline serve``: concurrent HTTP clients on loopback.

The server is the real command in a subprocess bound to 127.0.0.1; the clients are
httpx on asyncio in this process.  One fixed, seeded mix of queries (text->image,
text->caption, more-like-this, image upload) is run twice, side by side:

- baseline: the same :class:`pipeline.serve.Service` calls in-process, one at a time,
  no HTTP (what the queries cost by themselves);
- served: the same queries over HTTP from ``--clients`` concurrent clients.

Every HTTP answer is checked against the in-process one (same hit ids): a wrong answer
counts as an error like a failed request.  Bounded: ``--queries`` in all and at most
``--max-seconds`` per phase (then it stops and says so).

    python benchmarks/bench_serve.py --run runs/demo            # make bench-serve
    python benchmarks/bench_serve.py --run runs/demo --queries 200 --clients 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from embeddings.store import Run  # noqa: E402
from pipeline.serve import ServeConfig, Service  # noqa: E402

MIX = (("text->image", 0.4), ("text->caption", 0.3), ("similar", 0.2), ("upload", 0.1))
K = 10


def make_queries(run: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` queries drawn from the run's own captions, ids and image files."""
    rng = random.Random(seed)
    images = Run(run).embed.read_table("images", ["id", "image", "captions"]).to_pydict()
    root = Run(run).embed.manifest().root
    captions = [c for cs in images["captions"] for c in (cs or [])]
    kinds = rng.choices([m for m, _ in MIX], [w for _, w in MIX], k=n)
    out = []
    for kind in kinds:
        i = rng.randrange(len(images["id"]))
        if kind == "similar":
            out.append({"kind": kind, "id": images["id"][i]})
        elif kind == "upload":
            out.append({"kind": kind, "data": (root / images["image"][i]).read_bytes(),
                        "name": Path(images["image"][i]).name})
        else:
            out.append({"kind": kind, "text": rng.choice(captions)})
    return out


def call_service(service: Service, q: dict[str, Any]) -> list[str]:
    if q["kind"] == "similar":
        result = service.similar(q["id"], k=K)
    elif q["kind"] == "upload":
        result = service.search_upload(q["data"], q["name"], k=K)
    else:
        modality = "image" if q["kind"] == "text->image" else "text"
        result = service.search_text(q["text"], modality, k=K)
    return [h.id for h in result.hits]


async def call_http(client: httpx.AsyncClient, q: dict[str, Any]) -> list[str]:
    if q["kind"] == "similar":
        r = await client.get("/api/similar", params={"id": q["id"], "k": K})
    elif q["kind"] == "upload":
        r = await client.post("/api/search/image", params={"k": K},
                              files={"file": (q["name"], q["data"])})
    else:
        modality = "image" if q["kind"] == "text->image" else "text"
        r = await client.get("/api/search", params={"q": q["text"], "modality": modality,
                                                    "k": K})
    r.raise_for_status()
    return [h["id"] for h in r.json()["hits"]]


def baseline(run: Path, queries: list[dict[str, Any]], max_s: float) -> dict[str, Any]:
    service = Service(ServeConfig(run=str(run), device="cpu"))
    for q in queries[:20]:  # load both encoders before timing
        call_service(service, q)
    lat, answers, t0 = [], [], time.perf_counter()
    for q in queries:
        s = time.perf_counter()
        answers.append(call_service(service, q))
        lat.append(time.perf_counter() - s)
        if s - t0 > max_s:
            break
    wall = time.perf_counter() - t0
    return {"mode": "in-process Service, no HTTP", "clients": 1, **summary(lat, wall, 0),
            "answers": answers}


async def load(url: str, queries: list[dict[str, Any]], want: list[list[str]], clients: int,
               max_s: float) -> dict[str, Any]:
    todo = iter(range(len(queries)))
    lat: list[tuple[str, float]] = []
    errors: list[str] = []
    deadline = time.perf_counter() + max_s

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            if time.perf_counter() > deadline:
                return
            s = time.perf_counter()
            try:
                got = await call_http(client, queries[i])
                if i < len(want) and got != want[i]:
                    errors.append(f"query {i}: answer differs from in-process")
            except httpx.HTTPError as e:
                errors.append(f"query {i}: {e!r}")
            lat.append((queries[i]["kind"], time.perf_counter() - s))

    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        for q in queries[:20]:
            await call_http(client, q)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        wall = time.perf_counter() - t0
    row = {"mode": "HTTP on loopback (uvicorn)", "clients": clients,
           **summary([t for _, t in lat], wall, len(errors)), "first_errors": errors[:5]}
    row["by_kind"] = {kind: summary([t for k, t in lat if k == kind], wall, 0)
                      for kind, _ in MIX}
    return row


def summary(lat: list[float], wall: float, errors: int) -> dict[str, Any]:
    a = np.array(lat) * 1000
    return {"queries": len(lat), "errors": errors, "seconds": round(wall, 2),
            "qps": round(len(lat) / wall, 1) if wall else 0.0,
            "p50_ms": round(float(np.percentile(a, 50)), 2) if len(a) else None,
            "p99_ms": round(float(np.percentile(a, 99)), 2) if len(a) else None}


def start_server(run: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "serve", "--run", str(run),
                             "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                             *(["--threads", str(threads)] if threads else [])],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url + "/api/health", timeout=5).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start in 120 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="runs/demo", help="an indexed run (make demo)")
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300, help="per phase")
    p.add_argument("--threads", type=int, help="torch threads, here and in the server "
                   "(serve --threads; default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "index").is_dir():
        raise SystemExit(f"{run} has no index: run `make demo` (or `make index`) first")
    if args.threads:
        torch.set_num_threads(args.threads)
    queries = make_queries(run, args.queries, args.seed)
    base = baseline(run, queries, args.max_seconds)
    proc, url = start_server(run, args.threads)
    try:
        served = asyncio.run(load(url, queries, base.pop("answers"), args.clients,
                                  args.max_seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    mix = ", ".join(f"{k} {w:.0%}" for k, w in MIX)
    print(f"serve benchmark: {run}, {args.queries} queries ({mix}), k={K}; "
          f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}")
    print("| mode | clients | queries | errors | q/s | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in (base, served):
        print(f"| {r['mode']} | {r['clients']} | {r['queries']} | {r['errors']} | {r['qps']} | "
              f"{r['p50_ms']} | {r['p99_ms']} |")
    print("\nper query kind, over HTTP:")
    print("| kind | queries | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|")
    for kind, r in served["by_kind"].items():
        print(f"| {kind} | {r['queries']} | {r['p50_ms']} | {r['p99_ms']} |")
    for row in (base, served):
        if row["queries"] < args.queries:
            print(f"note: {row['mode']} stopped at --max-seconds {args.max_seconds}")
    for e in served["first_errors"]:
        print("error:", e)
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "served": served}, indent=2))
    return 1 if served["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
