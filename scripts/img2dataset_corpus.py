#!/usr/bin/env python3
"""Build an img2dataset-layout corpus: webdataset tar shards plus sidecar parquet files.

Photos are random crops of scikit-image's sample photographs saved as JPEGs; each sample
is ``KEY.jpg``, ``KEY.txt`` (caption) and ``KEY.json`` (img2dataset's fields plus a
``label``), with img2dataset's keys (shard number, then position).  Each shard's sidecar
``NNNNN.parquet`` lists every sample img2dataset "tried": ``success`` rows and failed
ones (``failed_to_download`` / ``failed_to_resize`` with an ``error_message``).

``--damaged`` (the default) plants what real crawls contain: a truncated JPEG, HTML saved
as a .jpg, a sample whose image is missing, one with two images, a stray member, a
success row missing from its tar, a tar sample its sidecar calls a failure, and one
shard cut short.  ``expected.json`` says what must happen to every success row.

    python scripts/img2dataset_corpus.py --out data/img2dataset --shards 4 --per-shard 16
    python -m pipeline embed --config configs/offline.toml --run runs/wds \\
        --data "data/img2dataset/{00000..00003}.tar" --label-field label
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "cat", "immunohistochemistry")
LABELS = {s: s.split("_")[0] for s in SOURCES}
FAILURES = (("failed_to_download", "HTTP Error 404: Not Found"),
            ("failed_to_download", "<urlopen error timed out>"),
            ("failed_to_resize", "image decoding error"))


def photo(k: int, size: tuple[int, int], seed: int = 0) -> tuple[bytes, str]:
    """The ``k``-th photo-like JPEG (bytes) and the name of the photograph it crops."""
    import skimage.data

    rng = np.random.default_rng([seed, k])
    name = SOURCES[k % len(SOURCES)]
    im = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    w, h = im.size
    cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    crop = im.crop((x, y, x + cw, y + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    crop.save(buf, "JPEG", quality=int(rng.integers(85, 96)))
    return buf.getvalue(), name


@dataclass
class Sample:
    key: str
    members: list[tuple[str, bytes]]  # (extension, bytes) in tar order
    caption: str
    label: str
    status: str = "success"
    error: str | None = None
    in_tar: bool = True
    expect: str | None = None  # reject reason class of a success row (None: embedded)


@dataclass
class Corpus:
    shards: list[list[Sample]] = field(default_factory=list)

    def samples(self) -> Iterable[Sample]:
        return (s for shard in self.shards for s in shard)


def make(shards: int, per_shard: int, size: tuple[int, int], damaged: bool,
         seed: int = 0) -> Corpus:
    """The samples of every shard (what the tar and the sidecar will say)."""
    corpus = Corpus()
    k = 0
    for s in range(shards):
        shard = []
        for i in range(per_shard):
            data, name = photo(k, size, seed)
            k += 1
            key = f"{s:05d}{i:04d}"
            caption = f"{name.replace('_', ' ')} photograph, crop number {k}"
            meta = {"key": key, "caption": caption, "label": LABELS[name], "status": "success",
                    "url": f"https://example.com/{key}.jpg", "width": size[0], "height": size[1]}
            shard.append(Sample(key, [("jpg", data), ("txt", caption.encode()),
                                      ("json", json.dumps(meta).encode())], caption,
                                LABELS[name]))
        if damaged:
            _damage(shard, s)
        for j, (status, error) in enumerate(FAILURES * (s + 1)):
            shard.append(Sample(f"{s:05d}{per_shard + j:04d}", [], "", "", status, error,
                                in_tar=False))
        corpus.shards.append(shard)
    return corpus


def _damage(shard: list[Sample], s: int) -> None:
    """Plant the damage of shard ``s`` (needs at least 12 samples a shard)."""
    def image(sample: Sample, data: bytes) -> None:
        sample.members[0] = ("jpg", data)

    if s == 0:
        image(shard[1], shard[1].members[0][1][:len(shard[1].members[0][1]) // 2])
        shard[1].expect = "corrupt or truncated image"
        image(shard[2], b"<html><body>404 Not Found</body></html>\n")
        shard[2].expect = "not an image"
        shard[3].in_tar, shard[3].expect = False, "missing from the tar"
        shard[4].members = [m for m in shard[4].members if m[0] != "jpg"]
        shard[4].expect = "no image in sample"
    if s == 1:
        png = io.BytesIO()
        Image.open(io.BytesIO(shard[5].members[0][1])).save(png, "PNG")
        shard[5].members.insert(1, ("png", png.getvalue()))
        shard[5].expect = "two images for one key"
        shard[6].members.append(("npy", b"\x93NUMPY stray member"))  # embedded all the same
        shard[7].status, shard[7].error = "failed_to_download", "HTTP Error 403: Forbidden"
        shard[7].expect = "disagree"  # in the tar, but not a success: rejected, not counted
        image(shard[8], b"")
        shard[8].expect = "empty file"


def write(corpus: Corpus, out: Path, damaged: bool) -> dict[str, object]:
    """Write ``NNNNN.tar`` + ``NNNNN.parquet`` per shard and ``expected.json``."""
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for s, shard in enumerate(corpus.shards):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
            for sample in shard:
                if not sample.in_tar:
                    continue
                for ext, data in sample.members:
                    info = tarfile.TarInfo(f"{sample.key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
                    info.uname = info.gname = "img2dataset"
                    tf.addfile(info, io.BytesIO(data))
        data = buf.getvalue()
        if damaged and s == 2:  # cut in the middle of the 7th sample: the rest is lost
            cut = _offset_of(data, shard[6].key) + 700
            data = data[:cut]
            for sample in shard[6:]:
                if sample.in_tar and sample.status == "success":
                    sample.expect = "missing from the tar"
        (out / f"{s:05d}.tar").write_bytes(data)
        rows = [{"key": x.key, "status": x.status, "error_message": x.error,
                 "caption": x.caption or None, "url": f"https://example.com/{x.key}.jpg"}
                for x in shard]
        pq.write_table(pa.Table.from_pylist(rows), out / f"{s:05d}.parquet")
        stats = {"count": len(shard), "successes": sum(x.status == "success" for x in shard),
                 "failed_to_download": sum(x.status == "failed_to_download" for x in shard),
                 "failed_to_resize": sum(x.status == "failed_to_resize" for x in shard)}
        (out / f"{s:05d}_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        expected.update({x.key: x.expect for x in shard if x.status == "success"})
    summary = {
        "shards": len(corpus.shards),
        "success": len(expected),
        "embedded": sum(v is None for v in expected.values()),
        "rejected": sum(v is not None for v in expected.values()),
        "failed": sum(x.status != "success" for x in corpus.samples()),
        "disagree": sum(x.expect == "disagree" for x in corpus.samples()),
        "expected": expected,
    }
    (out / "expected.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_files(corpus: Corpus, out: Path) -> Path:
    """The same samples as loose files plus ``manifest.csv`` (id, image, caption, label):
    each sample with exactly one image member and a success row, in the same order."""
    import csv

    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in corpus.samples():
        images = [(ext, data) for ext, data in sample.members if ext in ("jpg", "png")]
        if not sample.in_tar or sample.status != "success" or len(images) != 1:
            continue
        ext, data = images[0]
        (out / "images" / f"{sample.key}.{ext}").write_bytes(data)
        rows.append({"id": sample.key, "image": f"images/{sample.key}.{ext}",
                     "caption": sample.caption, "label": sample.label})
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return out / "manifest.csv"


def _offset_of(tar: bytes, key: str) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar)) as tf:
        return next(m.offset for m in tf.getmembers() if m.name.startswith(key + "."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data/img2dataset", help="folder (default: %(default)s)")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=16, help="samples per shard (>= 12)")
    p.add_argument("--size", default="256x192", help="photo size WxH")
    p.add_argument("--clean", action="store_true", help="no damaged samples or shards")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    damaged = not args.clean
    if damaged and (args.shards < 3 or args.per_shard < 12):
        p.error("the damaged corpus needs --shards >= 3 and --per-shard >= 12")
    summary = write(make(args.shards, args.per_shard, (w, h), damaged, args.seed),
                    Path(args.out), damaged)
    print(f"wrote {summary['shards']} shards to {args.out}: {summary['success']} success rows "
          f"({summary['embedded']} should be embedded, {summary['rejected']} rejected), "
          f"{summary['failed']} failed rows ({summary['disagree']} of them present in a tar)")


if __name__ == "__main__":
    main()
