"""The latent stage on 500,000 rows: the autoencoder's training time and the whole stage.

Writes a run of ``--rows`` image rows with two 512-d float16 columns through the store
(``bench_align_speed.make_run``: ``b`` a fixed non-linear function of ``a`` plus noise;
timing does not depend on what the vectors mean, the quality figures are in
``bench_latent.py``), then in one process:

1. read both columns through the store: the baseline, the I/O part of every figure;
2. ``latent`` over ``a_image + b_image`` (latent 64, the [latent] defaults) end to end:
   one pass over the shards for the training sample (``max_rows``), PCA, training with
   early stopping, then every row through the encoder into column ``meta_latent``;
3. the fit alone on the same number of rows held in memory, one torch thread against two;
4. the worst case of the fit: no early stopping (``patience`` = ``max_rounds``), every
   round runs (what data the model keeps improving on costs).

    python benchmarks/bench_latent_speed.py                # 500,000 rows
    python benchmarks/bench_latent_speed.py --rows 50000   # a quick check
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from bench_align_speed import make_run

from embeddings.latent import LatentParams, fit_latent
from pipeline.config import LatentConfig
from pipeline.latent import run_latent

INPUTS = ("a_image", "b_image")


def timed(label: str, fn: object) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()  # type: ignore[operator]
    s = time.perf_counter() - t
    print(f"  {label}: {s:.1f} s", flush=True)
    return s, out


def sample(run: object, rows: int, keep: int, seed: int = 0) -> list[np.ndarray]:
    """``keep`` seeded rows of both columns, streamed (float16)."""
    pick = np.zeros(rows, bool)
    pick[np.random.default_rng(seed).choice(rows, min(rows, keep), replace=False)] = True
    out = []
    for col in INPUTS:
        parts = [c.vectors[pick[c.start:c.start + len(c.vectors)]]
                 for c in run.embed.iter_column(col)]  # type: ignore[attr-defined]
        out.append(np.concatenate(parts))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--shard", type=int, default=50_000)
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start", flush=True)
    cfg = LatentConfig(inputs=INPUTS, progress=False)
    table = []
    with tempfile.TemporaryDirectory(dir=Path("runs").resolve() if Path("runs").is_dir()
                                     else None) as tmp:
        t = time.perf_counter()
        run = make_run(Path(tmp) / "run", args.rows, args.shard)
        print(f"wrote {args.rows} x 2 x 512 float16 rows in {time.perf_counter() - t:.0f} s")
        s, _ = timed("read both columns (baseline)", lambda: [
            run.embed.read_vectors(c, np.float16) for c in INPUTS])
        table.append(("read a_image + b_image through the store (float16)", s, ""))
        s, r = timed("latent stage", lambda: run_latent(replace(cfg, run=str(run.path))))
        model_s = r.seconds - r.encode_s  # type: ignore[attr-defined]
        table.append(("`latent`: sample pass + PCA + training (the autoencoder)", model_s,
                      f"{r.train_rows:,} sampled rows, fit {r.train_s:.1f} s; val mse "  # type: ignore[attr-defined]
                      f"{r.val_error:.4f} (PCA {r.pca_error:.4f})"))  # type: ignore[attr-defined]
        table.append(("`latent`: every row through the encoder, parts written",
                      r.encode_s, f"{r.rows:,} rows, {r.shards} parts"))  # type: ignore[attr-defined]
        table.append(("`latent` end to end", s, ""))
        n = min(args.rows, cfg.max_rows)
        xs = sample(run, args.rows, n)
        val = np.arange(n) % 20 == 0
        base = dict(kind=cfg.kind, dim=cfg.dim, hidden=cfg.hidden, lr=cfg.lr,
                    batch_size=cfg.batch_size, round_rows=cfg.round_rows,
                    max_rounds=cfg.max_rounds, patience=cfg.patience)
        for threads, patience in ((1, cfg.patience), (2, cfg.patience),
                                  (1, cfg.max_rounds)):
            p = LatentParams(**{**base, "threads": threads, "patience": patience})
            s, m = timed(f"fit, {threads} thread(s), patience {patience}", lambda p=p: fit_latent(
                [x[~val] for x in xs], None, [x[val] for x in xs], params=p))
            info = m.info  # type: ignore[attr-defined]
            what = "every round (no early stop)" if patience == cfg.max_rounds else "fit"
            table.append((f"{what}, {threads} torch thread(s), {n:,} rows in memory", s,
                          f"{info['rounds']} rounds of {cfg.round_rows:,} rows "
                          f"(best {info['best_round']})"))
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end\n")
    print(f"| {args.rows:,} rows, 512-d + 512-d -> 64 | seconds | notes |")
    print("|---|---|---|")
    for name, s, note in table:
        print(f"| {name} | {s:.1f} | {note} |")


if __name__ == "__main__":
    main()
