"""Benchmark: train every head on 50,000 rows of synthetic 512-d image + 512-d text
features (100 classes) and compare with scikit-learn ``LogisticRegression()`` defaults on
the concatenated features, all in one run (so machine load affects every row alike).

Synthetic but structured: each class has a latent prototype; each modality sees it
through its own random projection with its own heavy noise, then L2-normalised (like
CLIP vectors).  Noise is independent across modalities, so fusing them should beat
either one.  ``python benchmarks/bench_heads.py [--rows N] [--heads logistic concat ...]``
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from embeddings.heads import HEADS, Task, make_head


def synthetic(rows: int, dim: int, classes: int, seed: int, latent: int = 64,
              noise: tuple[float, float] = (2.5, 2.8)) -> tuple[list[np.ndarray], np.ndarray]:
    """(image, text) float32 features and labels."""
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, latent)).astype(np.float32)
    y = rng.integers(0, classes, rows)
    xs = []
    for sigma in noise:
        proj = rng.standard_normal((latent, dim)).astype(np.float32) / np.sqrt(latent)
        z = protos[y] + sigma * rng.standard_normal((rows, latent), dtype=np.float32)
        x = z @ proj + 0.5 * rng.standard_normal((rows, dim), dtype=np.float32)
        xs.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    return xs, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000, help="training rows")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", nargs="*", default=[h for h in HEADS if h != "zeroshot"])
    ap.add_argument("--no-baseline", action="store_true", help="skip the scikit-learn baseline")
    args = ap.parse_args()

    evaluation = 10_000  # validation and test rows each, on top of the training rows
    t0 = time.perf_counter()
    (img, txt), y = synthetic(args.rows + 2 * evaluation, args.dim, args.classes, args.seed)
    tr = slice(0, args.rows)
    va = slice(args.rows, args.rows + evaluation)
    te = slice(args.rows + evaluation, None)
    print(f"data: {args.rows} train / {evaluation} val / {evaluation} test rows, "
          f"2 x {args.dim}-d, {args.classes} classes ({time.perf_counter() - t0:.1f} s)")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")
    tasks = [Task("label", tuple(str(c) for c in range(args.classes)))]
    rows = []

    if not args.no_baseline:
        cat = np.hstack([img, txt])
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            base = LogisticRegression().fit(cat[tr], y[tr])
        secs = time.perf_counter() - t
        rows.append(("sklearn LogisticRegression()", "image+text", secs,
                     float((base.predict(cat[te]) == y[te]).mean())))
        print(f"  {rows[-1][0]}: {secs:.1f} s")

    for name in args.heads:
        if HEADS[name].inputs == "many":
            inputs = [("image+text", [img, txt])]
        else:
            inputs = [("image", [img]), ("text", [txt])]
        if name == "logistic":
            inputs.append(("image+text", [np.hstack([img, txt])]))
        for label, xs in inputs:
            head = make_head(name, tasks, [x.shape[1] for x in xs])
            t = time.perf_counter()
            head.fit([x[tr] for x in xs], [y[tr]], [x[va] for x in xs], [y[va]])
            secs = time.perf_counter() - t
            acc = float((head.predict([x[te] for x in xs])[0] == y[te]).mean())
            rows.append((name, label, secs, acc))
            print(f"  {name} ({label}): {secs:.1f} s")

    print(f"\n{'head':30s} {'inputs':11s} {'train s':>8s} {'test acc':>9s} {'speed-up':>9s}")
    base_s = rows[0][2] if not args.no_baseline else None
    for name, label, secs, acc in rows:
        speed = f"{base_s / secs:8.1f}x" if base_s else ""
        print(f"{name:30s} {label:11s} {secs:8.2f} {acc:9.4f} {speed:>9s}")


if __name__ == "__main__":
    main()
