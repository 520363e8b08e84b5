"""Near-duplicate detection on the duplicate test set: precision and recall per transformation.

Builds the set (``scripts/build_dup_set.py``: scikit-image photos and openclipart
drawings, their copies and look-alikes) once, embeds it through the pipeline
(``python -m pipeline embed`` with the tiny random CLIP of ``models/tiny-clip``, as
``configs/offline.toml`` does), computes each image's fingerprints from the bytes and
pixels as the embed stage would (content digest, pHash), then groups with
:mod:`embeddings.dedup`:

- CLIP: the exact k-NN graph of the ``clip_image`` column, cosine >= a threshold;
- pHash: perceptual hashes within a Hamming distance (``hash_groups``);
- CLIP or pHash: both edge sets in one union-find.

Reported per transformation: **recall** = the share of copies that land in their
original's group; **precision** = of the pairs a copy's predicted group makes with it, the
share that are true (same ground-truth group).  Look-alikes (distinct images) report how
often they were merged with the image they resemble.  Thresholds: a sweep, and the
operating points used in the table (by default the best pair F1 on this set, which is an
optimistic choice: say so when quoting).

    python benchmarks/bench_dedup.py                       # build, embed, evaluate
    python benchmarks/bench_dedup.py --clip-threshold 0.98 --hash-distance 8
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embeddings.dedup import (  # noqa: E402
    contact_sheet,
    exact_groups,
    exact_neighbours,
    group_report,
    hash_groups,
    hash_similarity_of,
    knn_edges,
    representatives,
    to_png,
    vector_similarity,
)
from embeddings.fingerprint import content_digest, hamming, phash  # noqa: E402
from embeddings.images import decode_image  # noqa: E402
from embeddings.store import Run  # noqa: E402

CLIP_SWEEP = (0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.998, 0.999)
HASH_SWEEP = (0, 2, 4, 6, 8, 10, 12, 14, 16)
ORDER = ("exact", "jpeg90", "jpeg70", "jpeg50", "jpeg30", "resize50", "resize25", "crop5",
         "crop10", "flip", "jitter")


def build_set(out: Path, drawings: int) -> None:
    if (out / "manifest.csv").exists():
        return
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_dup_set

    build_dup_set.main(["--out", str(out), "--drawings", str(drawings)])


def embed(data: Path, run: Path) -> float:
    """``python -m pipeline embed`` with the tiny random CLIP (no text model needed)."""
    model = ROOT / "models" / "tiny-clip"
    if not (model / "open_clip_config.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline", "tiny-model", "--out", str(model)],
                       cwd=ROOT, check=True)
    run.mkdir(parents=True, exist_ok=True)
    config = run.parent / f"{run.name}.toml"
    config.write_text(f"""run = "{run}"
[data]
path = "{data / 'manifest.csv'}"
[embed]
device = "cpu"
batch_size = 64
shard_size = 512
dtype = "float16"
[[encoders]]
name = "clip"
type = "open_clip"
model = "local-dir:{model}"
""")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "embed", "--config", str(config),
                    "--no-progress"], cwd=ROOT, check=True)
    return time.perf_counter() - t


def load(data: Path, run: Path) -> dict[str, np.ndarray]:
    """The run's rows (ids, vectors) joined with the set's ground truth, and the
    fingerprints of each image's bytes."""
    files = Run(run).embed
    table = files.read_table("images", ["id", "image"])
    ids = table.column("id").to_pylist()
    vectors = files.read_vectors("clip_image")
    truth = {r["id"]: r for r in csv.DictReader(open(data / "manifest.csv", encoding="utf-8"))}
    root = files.manifest().root
    digests, hashes = [], []
    spent = dict.fromkeys(("read", "decode", "digest", "pHash"), 0.0)
    for rel in table.column("image").to_pylist():
        t0 = time.perf_counter()
        blob = (root / rel).read_bytes()
        t1 = time.perf_counter()
        image = decode_image(blob)
        t2 = time.perf_counter()
        digests.append(content_digest(blob))
        t3 = time.perf_counter()
        hashes.append(phash(image))
        t4 = time.perf_counter()
        for k, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            spent[k] += dt
    print(f"{len(ids)} images, ms per image: " + ", ".join(
        f"{k} {1000 * v / max(len(ids), 1):.2f}" for k, v in spent.items()), flush=True)
    col = {k: np.array([truth[i][k] for i in ids], dtype=object)
           for k in ("group", "transform", "source", "related", "split")}
    return {"ids": np.array(ids, dtype=object), "vectors": vectors, "digests": digests,
            "hashes": np.array(hashes, dtype=np.uint64), "spent": spent, **col}


def pair_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: predicted partners, true partners among them, true partners overall."""
    _, p = np.unique(pred, return_inverse=True)
    _, g = np.unique(gt, return_inverse=True)
    both = p * (g.max() + 1) + g
    size = lambda codes: np.bincount(codes)[codes] - 1  # noqa: E731
    return size(p), size(both), size(g)


def scores(pred: np.ndarray, d: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """(precision, recall) per transformation, for look-alikes (merge rate, -), overall."""
    predicted, correct, true = pair_counts(pred, d["gt"])
    row_of = {i: k for k, i in enumerate(d["ids"].tolist())}
    out = {}
    for t in ORDER:
        rows = np.flatnonzero(d["transform"] == t)
        orig = np.array([row_of[f"{g}/original"] for g in d["group"][rows]])
        prec = correct[rows].sum() / max(predicted[rows].sum(), 1)
        out[t] = (float(prec), float((pred[rows] == pred[orig]).mean()))
    sim = np.flatnonzero(d["transform"] == "similar")
    rel = np.array([row_of[r] for r in d["related"][sim]])
    out["similar"] = (float((pred[sim] == pred[rel]).mean()), float("nan"))
    out["all pairs"] = (float(correct.sum() / max(predicted.sum(), 1)),
                        float(correct.sum() / max(true.sum(), 1)))
    return out


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


def edges(d: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every k-NN edge of the CLIP column with its cosine (threshold applied later)."""
    a, b, s = zip(*(knn_edges(batch, -1.0) for batch in exact_neighbours(d["vectors"], k)))
    return np.concatenate(a), np.concatenate(b), np.concatenate(s)


def group(d: dict[str, np.ndarray], knn: tuple, clip: float | None, dist: int | None
          ) -> np.ndarray:
    n = len(d["ids"])
    uf = exact_groups(d["digests"])  # byte-identical files: always one group
    if clip is not None:
        a, b, s = knn
        uf.union(a[s >= clip], b[s >= clip])
    if dist is not None:
        hash_groups(d["hashes"], dist, uf=uf)
    return uf.labels() if n else np.zeros(0, dtype=np.int64)


def both(d: dict[str, np.ndarray], knn: tuple, clip: float, dist: int) -> np.ndarray:
    """CLIP and pHash: a k-NN edge at or above ``clip`` whose hashes are within ``dist``."""
    a, b, s = knn
    keep = (s >= clip) & (hamming(d["hashes"][a], d["hashes"][b]) <= dist)
    uf = exact_groups(d["digests"])
    uf.union(a[keep], b[keep])
    return uf.labels()


def distances(d: dict[str, np.ndarray]) -> list[str]:
    """Median / worst pHash distance and CLIP cosine of each copy to its original."""
    row_of = {i: k for k, i in enumerate(d["ids"].tolist())}
    lines = ["| transform | pHash bits, median | pHash bits, max | CLIP cosine, median | "
             "CLIP cosine, min |", "|---|---:|---:|---:|---:|"]
    for t in (*ORDER, "similar"):
        rows = np.flatnonzero(d["transform"] == t)
        key = d["related"][rows] if t == "similar" else \
            np.array([f"{g}/original" for g in d["group"][rows]])
        orig = np.array([row_of[i] for i in key])
        bits = hamming(d["hashes"][rows], d["hashes"][orig])
        cos = np.einsum("ij,ij->i", d["vectors"][rows], d["vectors"][orig])
        lines.append(f"| {t} | {np.median(bits):.0f} | {bits.max()} | {np.median(cos):.4f} | "
                     f"{cos.min():.4f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, default=ROOT / "runs" / "bench-cache" / "dups")
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "bench-dedup")
    parser.add_argument("--drawings", type=int, default=150)
    parser.add_argument("--k", type=int, default=10, help="neighbours per image (CLIP)")
    parser.add_argument("--clip-threshold", type=float, default=None,
                        help="cosine threshold (default: best pair F1 of the sweep)")
    parser.add_argument("--hash-distance", type=int, default=None,
                        help="pHash Hamming distance (default: best pair F1 of the sweep)")
    parser.add_argument("--out", type=Path, default=None,
                        help="write results.md and the sheets here (default: --run)")
    parser.add_argument("--readme-sheet", type=Path, default=None,
                        help="also write a small pHash contact sheet here (docs/...png)")
    args = parser.parse_args(argv)
    build_set(args.set, args.drawings)
    seconds = embed(args.set.resolve(), args.run.resolve())
    d = load(args.set, args.run)
    d["gt"] = d["group"].astype(str)
    n = len(d["ids"])
    print(f"{n} images embedded in {seconds:.0f} s (tiny random CLIP, CPU)")
    knn = edges(d, args.k)

    lines = ["| signal | threshold | pair precision | pair recall | F1 |",
             "|---|---:|---:|---:|---:|"]
    best_clip = (0.0, CLIP_SWEEP[0])
    for t in CLIP_SWEEP:
        p, r = scores(group(d, knn, t, None), d)["all pairs"]
        lines.append(f"| CLIP | cos >= {t} | {p:.3f} | {r:.3f} | {f1(p, r):.3f} |")
        best_clip = max(best_clip, (f1(p, r), t))
    best_hash = (0.0, HASH_SWEEP[0])
    for dist in HASH_SWEEP:
        p, r = scores(group(d, knn, None, dist), d)["all pairs"]
        lines.append(f"| pHash | <= {dist} bits | {p:.3f} | {r:.3f} | {f1(p, r):.3f} |")
        best_hash = max(best_hash, (f1(p, r), dist))
    clip = args.clip_threshold if args.clip_threshold is not None else best_clip[1]
    dist = args.hash_distance if args.hash_distance is not None else best_hash[1]
    p, r = scores(group(d, knn, None, None), d)["all pairs"]
    lines.append(f"| content digest | equal | {p:.3f} | {r:.3f} | {f1(p, r):.3f} |")
    p, r = scores(both(d, knn, clip, dist), d)["all pairs"]
    lines.append(f"| CLIP and pHash | cos >= {clip}, <= {dist} bits | {p:.3f} | {r:.3f} | "
                 f"{f1(p, r):.3f} |")

    signals = {"CLIP": group(d, knn, clip, None), "pHash": group(d, knn, None, dist),
               "CLIP or pHash": group(d, knn, clip, dist)}
    got = {name: scores(labels, d) for name, labels in signals.items()}
    table = ["| transformation | images | " + " | ".join(
        f"{s} P | {s} R" for s in signals) + " |", "|---|---:|" + "---:|" * 6]
    for t in (*ORDER, "similar", "all pairs"):
        count = int((d["transform"] == t).sum()) if t != "all pairs" else n
        cells = []
        for s in signals:
            prec, rec = got[s][t]
            cells += [f"{prec:.2f}" if t != "similar" else f"{prec:.2f} merged",
                      "" if np.isnan(rec) else f"{rec:.2f}"]
        table.append(f"| {t} | {count} | " + " | ".join(cells) + " |")
    by_source = ["| transformation | CLIP, photos | CLIP, drawings | pHash, photos | "
                 "pHash, drawings |", "|---|---:|---:|---:|---:|"]
    for t in ORDER:
        cells = []
        for s in ("CLIP", "pHash"):
            for src in ("photo", "drawing"):
                keep = d["source"] == src
                sub = {k: d[k][keep] for k in ("ids", "gt", "group", "transform",
                                                 "related")}
                cells.append(f"{scores(signals[s][keep], sub)[t][1]:.2f}")
        by_source.append(f"| {t} | " + " | ".join(cells) + " |")
    report = "\n".join([
        f"Duplicate test set: {n} images ({int((d['source'] == 'photo').sum())} photo, "
        f"{int((d['source'] == 'drawing').sum())} drawing rows); CLIP = tiny random "
        f"open_clip, exact {args.k}-NN; operating points: cos >= {clip}, pHash <= {dist} "
        "bits (content-digest groups always included).", "", *table, "",
        "Recall by source:", "", *by_source, "",
        "Fingerprint cost, ms per image (one core, this machine): " + ", ".join(
            f"{k} {1000 * v / n:.2f}" for k, v in d["spent"].items()), "",
        "Sweep (pairs over the whole set):", "", *lines, "",
        "Distance of each copy to its original (look-alikes: to the image they resemble):",
        "", *distances(d), ""])
    print(report)
    out = args.out or args.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(report, encoding="utf-8")
    root = Run(args.run).embed.manifest().root
    images = Run(args.run).embed.read_table("images", ["image"]).column("image").to_pylist()
    for name, labels, sim in (("phash", signals["pHash"], hash_similarity_of(d["hashes"])),
                              ("clip-or-phash", signals["CLIP or pHash"],
                               vector_similarity(d["vectors"]))):
        rows = group_report(labels, representatives(labels), sim, ids=d["ids"],
                            split=d["split"])
        sheet = contact_sheet(rows, lambda r: decode_image((root / images[r]).read_bytes()),
                              groups=8, per_group=12, size=80)
        (out / f"sheet-{name}.png").write_bytes(to_png(sheet))
        if name == "phash" and args.readme_sheet:  # 4 groups, 256 colours: ~100 kB
            small = contact_sheet(rows, lambda r: decode_image(
                (root / images[r]).read_bytes()), groups=4, per_group=12, size=64)
            args.readme_sheet.write_bytes(to_png(small.quantize(256)))
    print(f"wrote {out / 'results.md'} and the contact sheets {out}/sheet-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
