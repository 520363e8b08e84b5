"""Streaming ingest of a large CSV manifest against a bare ``pyarrow.csv.read_csv`` of it.

The baseline only parses the file into one Arrow table (no validation, no ids, no blocks);
ours is :func:`embeddings.ingest.open_dataset` + ``Source.blocks`` (UTF-8 check, chunked
read, normalisation, every reject rule, the id index, blocks of Arrow tables).  Each runs
in its own subprocess, so peak memory (``ru_maxrss``) is its own; an ``imports`` row gives
the interpreter + library floor both share (imports are outside the timings, including
pandas, which pyarrow loads on its first ``pa.array`` call: 0.3-0.7 s here).

    python benchmarks/bench_ingest.py                    # 1,000,000 rows, blocks of 1000
    python benchmarks/bench_ingest.py --rows 100000 --records   # also build record objects
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
kind, path, block, records = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
import pyarrow, pyarrow.csv
from embeddings.ingest import open_dataset
pyarrow.array([0])  # pyarrow imports pandas (when installed) on first use: not timed either
t = time.perf_counter()
usage = resource.getrusage(resource.RUSAGE_SELF)
cpu0 = usage.ru_utime + usage.ru_stime
out = {}
if kind == "read_csv":
    out["rows"] = pyarrow.csv.read_csv(path).num_rows
elif kind == "ingest":
    src = open_dataset(path)
    images = captions = 0
    for b in src.blocks(block):
        images += b.image_table.num_rows
        captions += b.caption_table.num_rows
        if records:
            b.images, b.captions
    out.update(rows=src.stats.rows, images=images, captions=captions,
               rejects=src.stats.rejects, blocks=src.stats.blocks)
out["seconds"] = time.perf_counter() - t
usage = resource.getrusage(resource.RUSAGE_SELF)
out["cpu"] = usage.ru_utime + usage.ru_stime - cpu0
out["peak_mb"] = usage.ru_maxrss / 1024
print(json.dumps(out))
"""


def make_manifest(path: Path, rows: int, per_image: int) -> None:
    """``rows`` rows, ``per_image`` contiguous captions per image, every column filled."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("id,image,caption,label,labels,split\n")
        for i in range(rows):
            img = i // per_image
            f.write(f"{img:08d},images/{img % 1000:03d}/{img:08d}.jpg,"
                    f"\"a photo of object {img}, view {i % per_image}, on a table\","
                    f"class{img % 100},class{img % 100}|group{img % 7},"
                    f"{'test' if img % 10 == 0 else 'train'}\n")


def run(kind: str, path: Path, block: int, records: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), str(block),
                          "1" if records else "0"], capture_output=True, text=True, env=env,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--per-image", type=int, default=1, help="contiguous captions per image")
    p.add_argument("--block", type=int, default=1000, help="images per block (shard size)")
    p.add_argument("--records", action="store_true", help="also build the record objects")
    p.add_argument("--repeat", type=int, default=3, help="runs of each; the fastest counts")
    args = p.parse_args(argv)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.csv"
        make_manifest(path, args.rows, args.per_image)
        print(f"manifest: {args.rows:,} rows, {args.per_image} caption(s) per image, "
              f"{path.stat().st_size / 1e6:.0f} MB; blocks of {args.block} images")
        floor = run("imports", path, args.block, False)
        base, ours = [], []
        for _ in range(args.repeat):  # interleaved, best of: the machine may be shared
            base.append(run("read_csv", path, args.block, False))
            ours.append(run("ingest", path, args.block, args.records))
        base = min(base, key=lambda r: r["seconds"])
        ours = min(ours, key=lambda r: r["seconds"])
    print(f"best of {args.repeat} runs each:")
    print(f"{'':28s} {'seconds':>8s} {'rows/s':>11s} {'CPU s':>7s} {'peak MB':>8s}")
    print(f"{'imports only':28s} {'':>8s} {'':>11s} {'':>7s} {floor['peak_mb']:8.0f}")
    for name, r in (("pyarrow.csv.read_csv", base),
                    ("ingest blocks" + (" + records" if args.records else ""), ours)):
        print(f"{name:28s} {r['seconds']:8.2f} {args.rows / r['seconds']:11,.0f} "
              f"{r['cpu']:7.2f} {r['peak_mb']:8.0f}")
    print(f"ingest: {ours['images']:,} images, {ours['captions']:,} captions, "
          f"{ours['rejects']} rejects, {ours['blocks']} blocks")
    ratio = ours["seconds"] / base["seconds"]
    print(f"ingest / read_csv time: {ratio:.1f}x (goal <= 5x), CPU time: "
          f"{ours['cpu'] / base['cpu']:.1f}x; ingest peak {ours['peak_mb']:.0f} MB "
          "(goal < 500 MB)")


if __name__ == "__main__":
    main()
