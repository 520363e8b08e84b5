"""Data for the index/search tests: seeded clustered vectors, a multi-caption dataset."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from tests.conftest import DEMO


def clustered(n: int, d: int, clusters: int = 32, spread: float = 1.0,
              seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``clusters`` random centers (a seed-fixed mixture)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(1234).standard_normal((clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)] + spread / np.sqrt(d) * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def exact_top(xb: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k by a full numpy sort (independent of FAISS)."""
    return np.argsort(-(q.astype(np.float64) @ xb.astype(np.float64).T), axis=1,
                      kind="stable")[:, :k]


def karpathy_dataset(dst: Path, per_class: int = 2, captions: int = 3) -> tuple[Path, int]:
    """A Karpathy-split JSON over demo images, ``captions`` sentences per image.

    Sentences are built from the demo caption's words (rotated), so captions of one
    image differ.  One extra image is a broken file with two captions: the embed stage
    rejects the image and keeps its captions.  Returns (json path, captions of it).
    """
    with open(DEMO / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    images = []
    for n, r in enumerate(rows):
        if counts.get(r["label"], 0) >= per_class:
            continue
        counts[r["label"]] = counts.get(r["label"], 0) + 1
        (dst / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DEMO / r["image"], dst / r["image"])
        words = [w.strip() for w in r["caption"].split(",") if w.strip()]
        sents = [", ".join(words[i % len(words):] + words[:i % len(words)]) + f" ({i})"
                 for i in range(captions)]
        folder, name = r["image"].rsplit("/", 1)
        images.append({"filepath": folder, "filename": name, "imgid": n,
                       "split": "test" if n % 2 else "train",
                       "sentences": [{"raw": s, "sentid": n * 10 + i}
                                     for i, s in enumerate(sents)]})
    (dst / "images" / "broken.png").write_bytes(b"this is not a png")
    images.append({"filepath": "images", "filename": "broken.png", "imgid": 99999,
                   "split": "test", "sentences": [{"raw": "a broken picture", "sentid": 999_991},
                                                  {"raw": "nothing to see", "sentid": 999_992}]})
    path = dst / "karpathy.json"
    path.write_text(json.dumps({"images": images}))
    return path, 2
