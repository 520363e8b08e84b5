"""Training time of the adapters and the latent model on 500,000 cached pairs.

Writes a run of ``--rows`` image rows with two 512-d float16 columns through the store
(the embed stage's shard writer and manifest), ``a_image`` and ``b_image``, where ``b``
is a fixed non-linear function of ``a`` plus noise (timing does not depend on what the
vectors mean; the quality figures are in ``bench_align.py``, on real text).  Then, in one
process, times end to end through the ``align`` stage (read every shard, fit, score,
save): the ridge adapter and the two-layer adapter; and the autoencoder over
``a_image + b_image`` (latent 64) on the same rows read through the store.  A bare read
of both columns is the baseline: the part of each figure that is I/O.

    python benchmarks/bench_align_speed.py                # 500,000 pairs
    python benchmarks/bench_align_speed.py --rows 50000   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from embeddings.latent import LatentParams, fit_latent
from embeddings.store import Column, EmbedManifest, Provenance, Run, ShardInfo, shard_bytes
from pipeline.align import run_align
from pipeline.config import AlignConfig

DIM = 512


def make_run(path: Path, rows: int, shard: int, seed: int = 0) -> Run:
    run = Run(path)
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((DIM, DIM)).astype(np.float32) / np.sqrt(DIM)
    cols = {}
    for name in ("a", "b"):
        prov = Provenance(type="synthetic", model=name, dim=DIM, weights_sha256=name * 64)
        cols[f"{name}_image"] = Column(f"{name}_image", "images", name, "image", "float16", prov)
    records: dict[str, list] = {"images": [], "captions": []}
    for block, start in enumerate(range(0, rows, shard)):
        n = min(shard, rows - start)
        a = rng.standard_normal((n, DIM), dtype=np.float32)
        a /= np.linalg.norm(a, axis=1, keepdims=True)
        b = np.tanh(4 * a @ mix) + 0.1 * rng.standard_normal((n, DIM), dtype=np.float32)
        b /= np.linalg.norm(b, axis=1, keepdims=True)
        ids = [f"i{start + i}" for i in range(n)]
        meta = {"id": ids, "image": [f"{i}.png" for i in ids], "split": ["train"] * n,
                "label": [None] * n, "labels": [None] * n, "captions": [None] * n}
        data = shard_bytes("images", meta, {"a_image": a, "b_image": b}, "float16",
                           ShardInfo(block, ids, []))
        records["images"].append(run.embed.write_shard("images", block, data))
    manifest = EmbedManifest({"root": str(path)}, {}, cols, records, {}, {}, "now")
    run.embed.write_manifest(manifest, [])
    return run


def timed(label: str, fn: object) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()  # type: ignore[operator]
    s = time.perf_counter() - t
    print(f"  {label}: {s:.1f} s", flush=True)
    return s, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--shard", type=int, default=50_000)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--parts", default="ridge,two_layer,latent",
                    help="what to time, comma-separated (ridge, two_layer, latent)")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start", flush=True)
    with tempfile.TemporaryDirectory(dir=Path("runs").resolve() if Path("runs").is_dir()
                                     else None) as tmp:
        t = time.perf_counter()
        run = make_run(Path(tmp) / "run", args.rows, args.shard)
        print(f"wrote {args.rows} x 2 x {DIM} float16 pairs in {time.perf_counter() - t:.0f} s")
        base = {"run": str(run.path), "source": "a_image", "target": "b_image",
                "progress": False, "threads": args.threads, "exclude_splits": ()}
        rows = []
        s, _ = timed("read both columns (baseline)", lambda: (
            run.embed.read_vectors("a_image", np.float16),
            run.embed.read_vectors("b_image", np.float16)))
        rows.append(("read a_image + b_image (float16)", s, ""))
        parts = args.parts.split(",")
        for kind in [k for k in ("ridge", "two_layer") if k in parts]:
            s, r = timed(f"align {kind}", lambda k=kind: run_align(AlignConfig(
                **base, adapter=k, name=k)))
            note = f"val mse {r.scores[kind]['mse']:.6f} (ridge {r.scores['ridge']['mse']:.6f})"
            if kind == "two_layer":
                fit = r.info["two_layer"]
                note += (f", {fit['rounds']} rounds (best {fit['best_round']}), training "
                         f"{fit['train_s']:.0f} s, bfloat16 {fit['bfloat16']}")
            rows.append((f"align --adapter {kind}", s, note))

        def latent() -> object:
            a = run.embed.read_vectors("a_image", np.float16)
            b = run.embed.read_vectors("b_image", np.float16)
            val = np.arange(len(a)) % 20 == 0  # 5% validation
            return fit_latent([a[~val], b[~val]], None, [a[val], b[val]],
                              params=LatentParams(dim=64, threads=args.threads))

        if "latent" in parts:
            s, model = timed("autoencoder", latent)
            info = model.info  # type: ignore[attr-defined]
            rows.append(("autoencoder a_image + b_image -> 64", s,
                         f"{info['rounds']} rounds (best {info['best_round']}), val mse "
                         f"{info['val_by_round'][info['best_round']]:.4f} (PCA "
                         f"{info['val_by_round'][0]:.4f})"))
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end\n")
    print(f"| {args.rows:,} pairs, 512-d -> 512-d | seconds | notes |")
    print("|---|---|---|")
    for name, s, note in rows:
        print(f"| {name} | {s:.1f} | {note} |")


if __name__ == "__main__":
    main()
