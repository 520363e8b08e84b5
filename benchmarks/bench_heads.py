"""Benchmark: every head vs scikit-learn ``LogisticRegression()``, on synthetic and real
data, all in one run (so machine load affects every row alike).

- ``synthetic``: 50,000 train + 10,000 val + 10,000 test rows of 512-d "image" + 512-d
  "text" features, 100 classes: class prototypes in a 64-d latent space, seen by each
  modality through its own random projection with its own heavy noise, L2-normalised.
- ``openclipart`` (real): the titled drawings of Debian's ``openclipart-svg`` labelled
  by category (20 classes); inputs MiniLM of the caption and a 384-d LSA of the same
  caption (two real encoders of equal width, unrelated coordinates: the fusion case).
- ``debian`` (real): 64k Debian packages, MiniLM of the one-line
  description, labelled by Section (57 classes).

Real features are built once and cached in ``runs/bench-cache`` (``real_data.py``).
Each row is timed ``--repeat`` times (default 2), on arrays already sliced; the fastest
run counts (fits are deterministic, so the scores are the same).
Baselines, on the same input as our ``logistic``: scikit-learn defaults, and scikit-learn
converged (``max_iter=10000``; on openclipart, ``--converged`` adds it everywhere).  Our
``logistic`` is unweighted by default, like scikit-learn; the row ``logistic
class_weights=True`` is the probe with balanced class weights.

    python benchmarks/bench_heads.py [--rows N] [--heads logistic concat ...] [--real ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import real_data

from embeddings.heads import HEADS, Task, make_head


@dataclass
class Dataset:
    name: str
    single: dict[str, np.ndarray]  # inputs of the one-column heads
    fusion: list[tuple[str, list[np.ndarray]]]  # inputs of the fusion heads
    baseline: str  # the single input that scikit-learn and our logistic get
    y: np.ndarray
    split: np.ndarray  # 0 train, 1 val, 2 test


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
        xs.append((x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    return xs, y  # float32, like stored embeddings (numpy 2 made the projection float64)


def load(name: str, args: argparse.Namespace) -> Dataset:
    if name == "synthetic":
        ev = 10_000  # validation and test rows each, on top of the training rows
        (img, txt), y = synthetic(args.rows + 2 * ev, args.dim, args.classes, args.seed)
        split = np.repeat(np.array([0, 1, 2], np.int8), [args.rows, ev, ev])
        both = np.hstack([img, txt])
        return Dataset(name, {"image": img, "text": txt, "image+text": both},
                       [("image+text", [img, txt])], "image+text", y, split)
    d = real_data.load(name)
    split = real_data.splits(len(d["y"]), args.seed)
    if name == "openclipart":
        return Dataset(name, {"minilm": d["minilm"], "lsa": d["lsa"]},
                       [("minilm+lsa", [d["minilm"], d["lsa"]])], "minilm", d["y"], split)
    return Dataset(name, {"minilm": d["minilm"]}, [], "minilm", d["y"], split)


def timed_sklearn(x: np.ndarray, d: Dataset,
                  **kw: object) -> tuple[float, tuple[float, float], dict]:
    tx, ty = x[d.split == 0], d.y[d.split == 0]  # slicing is not the model's time
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        m = LogisticRegression(**kw).fit(tx, ty)
    secs = time.perf_counter() - t
    te = d.split == 2
    return secs, scores(m.predict(x[te]), d.y[te]), {"iterations": int(m.n_iter_[0])}


def scores(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(accuracy, macro-F1)."""
    return float((pred == y).mean()), float(f1_score(y, pred, average="macro"))


def timed_head(name: str, xs: list[np.ndarray], d: Dataset,
               **params: object) -> tuple[float, tuple[float, float], dict]:
    k = int(d.y.max()) + 1
    head = make_head(name, [Task("label", tuple(str(c) for c in range(k)))],
                     [x.shape[1] for x in xs], **params)
    tr, va, te = (d.split == 0), (d.split == 1), (d.split == 2)
    train, val = [x[tr] for x in xs], [x[va] for x in xs]  # slicing is not the model's time
    t = time.perf_counter()
    head.fit(train, [d.y[tr]], val, [d.y[va]])
    secs = time.perf_counter() - t
    return secs, scores(head.predict([x[te] for x in xs])[0], d.y[te]), head.info


def warm_up() -> None:
    """Pay one-time costs (imports inside torch.optim and scikit-learn) before timing."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 8)).astype(np.float32), np.arange(64) % 2
    for name in ("logistic", "linear"):
        make_head(name, [Task("l", ("a", "b"))], [8]).fit([x], [y], [x], [y])
    LogisticRegression().fit(x, y)


def note(info: dict) -> str:
    if info.get("shared_space"):
        return "identity maps"
    if "C" in info and "converged" in info:
        return (f"C={info['C']:.3g}, {info['iterations']} it, gap {info['gap']:.0e}, "
                f"{'converged' if info['converged'] else 'NOT converged'}")
    if "iterations" in info:
        return f"{info['iterations']} it"
    return f"{info['epochs']} epochs" if "epochs" in info else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000, help="synthetic training rows")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--heads", nargs="*", default=[h for h in HEADS if h != "zeroshot"])
    ap.add_argument("--real", nargs="*", default=["openclipart", "debian"],
                    choices=sorted(real_data.SETS.keys() - {"words"}))
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each row; the fastest counts")
    ap.add_argument("--converged", action="store_true",
                    help="scikit-learn run to convergence on every set, not only openclipart")
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, scikit-learn "
          f"{sklearn.__version__}, numpy {np.__version__}")
    warm_up()
    rows: list[tuple[str, str, str, float, tuple[float, float], str]] = []
    names = ([] if args.no_synthetic else ["synthetic"]) + list(args.real)
    if "openclipart" in names and not (real_data.CACHE / "openclipart.npz").exists() \
            and not real_data.OPENCLIPART.exists():
        print("openclipart: skipped, its features are not cached and the drawings are "
              "missing (apt-get install openclipart-svg)")
        names.remove("openclipart")
    if "debian" in names and not (real_data.CACHE / "debian.npz").exists() \
            and shutil.which("apt-cache") is None:
        print("debian: skipped, its features are not cached and apt-cache is missing")
        names.remove("debian")
    for dname in names:
        t = time.perf_counter()
        d = load(dname, args)
        n = np.bincount(d.split, minlength=3)
        print(f"{dname}: {n[0]} train / {n[1]} val / {n[2]} test rows, {int(d.y.max()) + 1} "
              f"classes, inputs {', '.join(f'{k} {v.shape[1]}-d' for k, v in d.single.items())}"
              f" ({time.perf_counter() - t:.1f} s)", flush=True)
        base = [d.single[d.baseline]]
        runs: list[tuple[str, str, list[np.ndarray], dict[str, object]]] = [
            ("sklearn LogisticRegression()", d.baseline, base, {})]
        if dname == "openclipart" or args.converged:
            runs.append(("sklearn converged", d.baseline, base, {"max_iter": 10_000}))
        for name in args.heads:
            if HEADS[name].inputs == "many":
                runs += [(name, label, xs, {}) for label, xs in d.fusion]
                if name == "sum":  # what sum did before: add coordinate i to coordinate i
                    runs += [("sum shared_space=True", label, xs, {"shared_space": True})
                             for label, xs in d.fusion if len({x.shape[1] for x in xs}) == 1]
            else:
                runs += [(name, label, [x], {}) for label, x in d.single.items()
                         if label != "image+text" or name == "logistic"]
            if name == "logistic" and dname != "synthetic":  # balanced class weights
                runs.append(("logistic class_weights=True", d.baseline, base,
                             {"class_weights": True}))
        for name, label, xs, kw in runs:
            secs = float("inf")
            for _ in range(args.repeat):  # the fastest run counts: the machine may be shared
                once, acc, info = (timed_sklearn(xs[0], d, **kw) if name.startswith("sklearn")
                                   else timed_head(name.split()[0], xs, d, **kw))
                secs = min(secs, once)
            rows.append((dname, name, label, secs, acc, note(info)))
            print(f"  {name} ({label}): {secs:.2f} s, test accuracy {acc[0]:.4f}, macro-F1 "
                  f"{acc[1]:.4f} {note(info)}", flush=True)

    print(f"\n{'data':12s} {'head':29s} {'inputs':11s} {'train s':>8s} {'test acc':>9s} "
          f"{'macro-F1':>9s} {'speed-up':>9s}  notes")
    for dname, name, label, secs, acc, info in rows:
        base_s = next(r[3] for r in rows if r[0] == dname and r[1].startswith("sklearn Log"))
        print(f"{dname:12s} {name:29s} {label:11s} {secs:8.2f} {acc[0]:9.4f} {acc[1]:9.4f} "
              f"{base_s / secs:8.1f}x  {info}")


if __name__ == "__main__":
    main()
