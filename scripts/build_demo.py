#!/usr/bin/env python3
"""Build the bundled demo dataset (data/demo) from Debian's openclipart-svg.

Picks a fixed number of drawings per top-level category (deterministic for a
given seed), renders them to square RGB PNGs on white with ``rsvg-convert``
(or cairosvg), derives a caption from the SVG metadata or the file name and
writes ``images/<category>/<stem>.png``, ``manifest.csv`` and ``README.md``.
Drawings that fail to render or render blank are skipped and counted.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import html
import io
import random
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_CATEGORIES = (
    "animals",
    "buildings",
    "computer",
    "food",
    "geography",
    "office",
    "people",
    "plants",
    "recreation",
    "signs_and_symbols",
    "tools",
    "transportation",
)
MANIFEST_COLUMNS = ("id", "image", "caption", "label", "labels", "split")
SPLITS = (("val", 0.15), ("test", 0.15))  # the rest is "train"
NS = {
    "svg": "http://www.w3.org/2000/svg",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
}
# Nearly all titles by this (prolific) author are Italian; leaving them out
# keeps the captions English.
EXCLUDED_CREATOR = re.compile(r"rollandin", re.IGNORECASE)
SKIPPED_DIRS = {"duplicates"}
BAD_TITLE = re.compile(
    r"clipart by|sibmission|submission|hash\(|@|https?:|^(untitled|drawing|svg)\b",
    re.IGNORECASE,
)
BAD_KEYWORD = re.compile(r"^(hash.*|0x.*|en|unsorted|svg|clipart|\w*sym|icons?|\S{16,}|.{26,})$")
NUMBERISH = re.compile(r"^([a-z]?\d+[a-z]?|0x[0-9a-f]+|v\d.*)$")
JUNK_TOKENS = {"openclipart", "hash", "ganson", "md", "bw"}
MAX_KEYWORDS = 3


@dataclass
class Drawing:
    """One candidate SVG and the metadata used for its caption."""

    path: Path
    category: str
    subdirs: tuple[str, ...]
    title: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""

    @property
    def stem(self) -> str:
        """File stem, restricted to portable characters."""
        return re.sub(r"[^A-Za-z0-9_.-]", "_", self.path.stem)

    @property
    def id(self) -> str:
        """Stable manifest id."""
        return f"{self.category}/{self.stem}"


def clean(text: str | None) -> str:
    """Unescape HTML entities and collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(text or "")).strip()


def read_metadata(drawing: Drawing) -> None:
    """Fill title, keywords and creator from the SVG metadata (cc:Work, <title>)."""
    try:
        root = ET.parse(drawing.path).getroot()
    except (ET.ParseError, OSError):
        return
    work = root.find(".//cc:Work", NS)
    if work is not None:
        drawing.title = clean(work.findtext("dc:title", "", NS))
        drawing.creator = clean(work.findtext("dc:creator/cc:Agent/dc:title", "", NS))
        drawing.keywords = [clean(li.text) for li in work.findall("dc:subject//rdf:li", NS)]
    if not drawing.title:
        drawing.title = clean(root.findtext("svg:title", "", NS))


def name_tokens(drawing: Drawing) -> list[str]:
    """File-name words minus trailing author names, initials and numbers."""
    # split camelCase, then on "_" and spaces
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", "_", drawing.path.stem).lower()
    tokens = [t.strip(".-") for t in re.split(r"[_\s]+", stem)]
    tokens = [t for t in tokens if t and t not in JUNK_TOKENS and not t.startswith("0x")]
    author = [t for t in re.split(r"[^a-z0-9]+", drawing.creator.lower()) if t]
    initials = "".join(t[0] for t in author)
    if author and author[0] in tokens[1:]:  # "bullet_hole_linda_kim_ad"
        tokens = tokens[: tokens.index(author[0], 1)]

    def is_suffix(tok: str) -> bool:
        core = tok.rstrip("0123456789")
        return (
            bool(NUMBERISH.match(tok))
            or len(tok) == 1
            or tok == initials
            or any(a.startswith(core) for a in author if core)
        )

    while len(tokens) > 1 and is_suffix(tokens[-1]):
        tokens.pop()
    return tokens


def name_key(drawing: Drawing) -> str:
    """Letters of the cleaned file name, to tell drawings apart."""
    return re.sub(r"[^a-z]", "", "".join(name_tokens(drawing)))


def generic_titles(drawings: list[Drawing]) -> set[str]:
    """Titles shared by files with different names (template/collection titles)."""
    names: dict[str, set[str]] = defaultdict(set)
    for d in drawings:
        names[d.title.lower()].add(name_key(d))
    return {title for title, keys in names.items() if len(keys) > 1}


def humanize(text: str) -> str:
    """Turn slugs such as "04_waxing_moon2" into plain words."""
    text = clean(re.sub(r"openclipart", "", text.replace("_", " "), flags=re.IGNORECASE))
    if " " not in text:  # slug such as "arrow-down-blue"
        text = text.replace("-", " ")
    text = re.sub(r"^0\d+ |\.svg$", "", text)  # "04 waxinggibbous", "braces.svg"
    return re.sub(r"(?<=[A-Za-z]{3})\d+$", "", text)  # "bee2", "home12"


def caption(drawing: Drawing, generic: set[str]) -> str:
    """Title (metadata, else file name) plus a few distinct metadata keywords.

    Descriptions are not used: when the title is unusable they are mostly
    collection blurbs or boilerplate, and the file name is better.
    """
    title = drawing.title
    creator = drawing.creator.lower()
    if (
        not title
        or title.lower() in generic
        or BAD_TITLE.search(title)
        or (creator and title.lower() == creator)
    ):
        title = " ".join(name_tokens(drawing))
    text = humanize(title)
    seen = set(re.findall(r"[a-z]+", text.lower()))
    author = set(re.findall(r"[a-z]+", creator))
    extra: list[str] = []
    for raw in drawing.keywords:
        kw = humanize(raw.lower())
        words = set(re.findall(r"[a-z]+", kw))
        if not words or BAD_KEYWORD.match(kw) or words <= seen or words & author:
            continue
        extra.append(kw)
        seen |= words
        if len(extra) == MAX_KEYWORDS:
            break
    return ", ".join([text, *extra])


def scan(src: Path, categories: list[str]) -> list[Drawing]:
    """Candidate drawings, one per distinct file content and per id."""
    found: list[Drawing] = []
    for category in categories:
        for path in sorted((src / category).rglob("*.svg")):
            subdirs = path.relative_to(src / category).parent.parts
            if SKIPPED_DIRS.intersection(subdirs):
                continue
            drawing = Drawing(path, category, subdirs)
            read_metadata(drawing)
            if not EXCLUDED_CREATOR.search(drawing.creator):
                found.append(drawing)
    # The same drawing is often filed in several folders: keep the deepest
    # copy, and drop drawings filed (by content or name) under several categories.
    digest = {id(d): hashlib.sha1(d.path.read_bytes()).hexdigest() for d in found}
    categories: dict[str, set[str]] = defaultdict(set)
    for d in found:
        categories[digest[id(d)]].add(d.category)
        categories[d.stem].add(d.category)
    unique: dict[str, Drawing] = {}
    seen: set[str] = set()
    for d in sorted(found, key=lambda d: (-len(d.subdirs), str(d.path))):
        keys = (digest[id(d)], d.stem)
        if any(len(categories[k]) > 1 for k in keys) or d.id in unique or keys[0] in seen:
            continue
        unique[d.id] = d
        seen.add(keys[0])
    return sorted(unique.values(), key=lambda d: d.id)


def interleave(drawings: list[Drawing], rng: random.Random) -> list[Drawing]:
    """Order drawings for picking: varied subfolders first, varied creators first.

    Round-robin across the (shuffled) first-level subfolders, then a stable sort
    by how many drawings of the same creator (or, without one, the same name)
    come earlier, so that no single series dominates a class.
    """
    groups: dict[str, list[Drawing]] = defaultdict(list)
    for d in drawings:
        groups[d.subdirs[0] if d.subdirs else ""].append(d)
    queues = [rng.sample(groups[k], len(groups[k])) for k in sorted(groups)]
    rng.shuffle(queues)
    order: list[Drawing] = []
    while any(queues):
        order.extend(q.pop() for q in queues if q)
    seen: Counter[str] = Counter()
    ranked = []
    for d in order:
        who = d.creator.lower() or name_key(d)
        ranked.append((seen[who], d))
        seen[who] += 1
    ranked.sort(key=lambda item: item[0])  # stable
    return [d for _, d in ranked]


def rasterize(path: Path, box: int, renderer: str) -> Image.Image | None:
    """Render an SVG to fit in box x box (aspect kept), RGB on white."""
    try:
        if renderer == "rsvg":
            cmd = ["rsvg-convert", "-w", str(box), "-h", str(box), "-a", str(path)]
            run = subprocess.run(cmd, capture_output=True, check=True, timeout=120)
            png = run.stdout
        else:
            import cairosvg

            png = cairosvg.svg2png(url=str(path), output_width=box)
        image = Image.open(io.BytesIO(png))
        image.load()
    except Exception:  # any renderer failure means "skip"
        return None
    rgba = image.convert("RGBA")
    rgba.thumbnail((box, box), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    return canvas.convert("RGB")


def ink_bbox(image: Image.Image) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of the non-white pixels."""
    ink = (255 - np.asarray(image, dtype=np.int16)).max(axis=2) > 8
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if not rows.size:
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def render(path: Path, size: int, renderer: str) -> Image.Image | None:
    """Render cropped to the drawing, padded to a white square, size x size RGB.

    Returns None if rendering fails or the result is blank, a speck or all black.
    """
    box = 2 * size  # supersample, then downscale for smooth edges
    image = rasterize(path, box, renderer)
    bbox = image and ink_bbox(image)
    if image is None or bbox is None:
        return None
    extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    if extent < box // 2:  # small drawing on a big page: render larger, then crop
        image = rasterize(path, box * min(8, box // max(extent, 1)), renderer)
        bbox = image and ink_bbox(image)
        if image is None or bbox is None:
            return None
        extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
        if extent < box // 4:
            return None
    side = round(extent * 1.06) + 2  # small white margin
    square = Image.new("RGB", (side, side), (255, 255, 255))
    left = (side - (bbox[2] - bbox[0])) // 2
    top = (side - (bbox[3] - bbox[1])) // 2
    square.paste(image.crop(bbox), (left, top))
    out = square.resize((size, size), Image.Resampling.LANCZOS)
    gray = np.asarray(out.convert("L"))
    if (gray < 240).mean() < 0.005 or (gray < 16).mean() > 0.97:
        return None
    return out


def assign_splits(ids: list[str], rng: random.Random) -> dict[str, str]:
    """Map each id to "train", "val" or "test" (at least one val and test)."""
    order = rng.sample(sorted(ids), len(ids))
    splits: dict[str, str] = {}
    start = 0
    for name, fraction in SPLITS:
        n = max(1, round(fraction * len(order)))
        splits.update((i, name) for i in order[start : start + n])
        start += n
    splits.update((i, "train") for i in order[start:])
    return splits


def package_version() -> str:
    """Installed version of the openclipart-svg Debian package."""
    try:
        cmd = ["dpkg-query", "-W", "-f=${Version}", "openclipart-svg"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_readme(out: Path, rows: list[dict[str, str]], command: str, renderer: str) -> None:
    """Write README.md with provenance, license, rebuild command and counts."""
    counts = Counter((r["label"], r["split"]) for r in rows)
    labels = sorted({r["label"] for r in rows})
    table = ["| label | train | val | test | total |", "|---|---:|---:|---:|---:|"]
    for label in labels:
        n = [counts[label, split] for split in ("train", "val", "test")]
        table.append(f"| {label} | {n[0]} | {n[1]} | {n[2]} | {sum(n)} |")
    n = [sum(counts[label, split] for label in labels) for split in ("train", "val", "test")]
    table.append(f"| **total** | {n[0]} | {n[1]} | {n[2]} | {sum(n)} |")
    if renderer == "rsvg":
        version = subprocess.run(["rsvg-convert", "--version"], capture_output=True, text=True)
        tool = version.stdout.strip() or "rsvg-convert"
    else:
        import cairosvg

        tool = f"cairosvg {cairosvg.__version__}"
    text = f"""# Demo dataset: openclipart drawings with captions

{len(rows)} small clip-art images in {len(labels)} classes, each with a short,
mostly English text caption, for demos and tests of the image+text embedding
toolkit.

## Source and license

Drawings from the Debian package `openclipart-svg` version {package_version()}
(Open Clip Art Library 0.18, `/usr/share/openclipart/svg`). The package's
copyright file (`/usr/share/doc/openclipart-svg/copyright`) states that all
clip art is dedicated to the **public domain** (Creative Commons Public Domain
Dedication), so the rendered PNGs here are public domain too.

## Files

- `images/<label>/<stem>.png`: {tool} render, cropped to the drawing and
  padded to a white square, RGB.
- `manifest.csv`: columns `{",".join(MANIFEST_COLUMNS)}`.
  - `id`: `<label>/<stem>` (stem of the source SVG file).
  - `image`: path relative to this folder.
  - `caption`: the drawing's metadata title (or its file name minus author and
    number suffixes when the title is missing or a generic collection title),
    followed by up to {MAX_KEYWORDS} of its metadata keywords.
  - `label`: top-level openclipart category; `labels`: category plus its
    subfolders, `|`-separated (multi-label).
  - `split`: stratified ~70/15/15 `train`/`val`/`test` per label.

Captions come from community metadata and are noisy (some are terse,
some non-English). Drawings by one author whose titles are all Italian are left
out, as are drawings filed under several categories.

## Rebuild

```
{command}
```

The selection, captions and splits depend only on the seed and the package
contents; the pixels also depend on the renderer version.

## Counts

{chr(10).join(table)}
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Build the dataset; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    add = parser.add_argument
    add(
        "--src",
        type=Path,
        default=Path("/usr/share/openclipart/svg"),
        help="openclipart-svg tree (Debian package openclipart-svg)",
    )
    add("--out", type=Path, default=Path("data/demo"), help="output folder")
    add("--per-class", type=int, default=25, help="images per category")
    add("--size", type=int, default=144, help="side of the square PNGs, in pixels")
    add("--seed", type=int, default=0, help="seed for selection and splits")
    add(
        "--renderer",
        choices=("rsvg", "cairosvg"),
        default="rsvg",
        help="rsvg: rsvg-convert (librsvg2-bin); cairosvg: the Python package",
    )
    add(
        "--categories",
        nargs="+",
        default=list(DEFAULT_CATEGORIES),
        help="top-level openclipart folders to use as labels",
    )
    args = parser.parse_args(argv)

    if args.renderer == "rsvg" and shutil.which("rsvg-convert") is None:
        parser.error("rsvg-convert not found: install librsvg2-bin or use cairosvg")
    drawings = scan(args.src, args.categories)
    generic = generic_titles(drawings)
    shutil.rmtree(args.out / "images", ignore_errors=True)

    rows: list[dict[str, str]] = []
    for category in args.categories:
        rng = random.Random(f"{args.seed}:{category}")
        pool = interleave([d for d in drawings if d.category == category], rng)
        chosen: list[Drawing] = []
        skipped = 0
        for drawing in pool:
            if len(chosen) == args.per_class:
                break
            image = render(drawing.path, args.size, args.renderer)
            if image is None:
                skipped += 1
                print(f"  skipped (render failed or blank): {drawing.path}")
                continue
            target = args.out / "images" / category / f"{drawing.stem}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            image.save(target, optimize=True)
            chosen.append(drawing)
        print(f"{category:18s} candidates={len(pool):4d} kept={len(chosen):3d}", end="")
        print(f" skipped={skipped}")
        if len(chosen) < args.per_class:
            print(f"  warning: only {len(chosen)} renderable drawings", file=sys.stderr)
        split_rng = random.Random(f"{args.seed}:split:{category}")
        splits = assign_splits([d.id for d in chosen], split_rng)
        rows.extend(
            {
                "id": d.id,
                "image": f"images/{category}/{d.stem}.png",
                "caption": caption(d, generic),
                "label": category,
                "labels": "|".join([category, *d.subdirs]),
                "split": splits[d.id],
            }
            for d in chosen
        )

    rows.sort(key=lambda r: r["id"])
    with (args.out / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    shown = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "scripts/build_demo.py", *shown])
    write_readme(args.out, rows, command, args.renderer)
    print(f"wrote {len(rows)} rows to {args.out / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
