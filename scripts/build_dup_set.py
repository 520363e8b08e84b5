#!/usr/bin/env python3
"""Build the duplicate test set: real photos and drawings, their copies, and look-alikes.

Originals are scikit-image's sample photographs (real photos, offline) and openclipart
drawings (Debian ``openclipart-svg``, rendered as ``scripts/build_demo.py`` does).  Each
original gets a ground-truth group holding itself and its copies:

    exact     the original file, byte for byte
    jpeg90 jpeg70 jpeg50 jpeg30   re-encoded as JPEG at that quality
    resize50 resize25             scaled to 50% / 25% of each side (Lanczos)
    crop5 crop10                  5% / 10% cut from every side (81% / 64% of the area left)
    flip      mirrored left-right
    jitter    brightness, contrast and saturation x0.8-1.25, hue turned by up to 5%

and distinct images that merely look alike, each in a group of its own (``similar``,
with ``related`` naming the image it resembles): the right view of scikit-image's stereo
motorcycle pair, and drawings from the same series as an original (same category,
folder and author: flags, icons of one theme, ...).  Candidate drawings that render nearly
pixel-identical to one already chosen (a 16x16 thumbnail within 2% mean grey difference)
are left out, so no two "distinct" originals are copies of each other.

Writes ``images/<source>/<stem>/<transform>.<png|jpg>``, ``manifest.csv`` (the pipeline's
columns ``id,image,caption,label,labels,split`` plus ``group,transform,source,related,
width,height``) and ``README.md``.  Splits are drawn per image (seeded), so copies land
on both sides of a split as they do in scraped data.

    python scripts/build_dup_set.py --out data/dups --drawings 150
"""

from __future__ import annotations

import argparse
import csv
import io
import random
import shlex
import shutil
import sys
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_demo import (  # a sibling script, not a package
    DEFAULT_CATEGORIES,
    Drawing,
    caption,
    generic_titles,
    interleave,
    package_version,
    render,
    scan,
)

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "camera", "moon", "coins", "brick", "grass",
          "gravel", "page", "text", "clock", "cell", "stereo_motorcycle")
COLUMNS = ("id", "image", "caption", "label", "labels", "split", "group", "transform",
           "source", "related", "width", "height")
SPLITS = (("train", 0.7), ("val", 0.15), ("test", 0.15))
PHOTO_QUALITY = 92  # photo originals are JPEGs, as cameras and the web store them
NEAR_IDENTICAL = 0.02  # mean absolute grey difference of 16x16 thumbnails, of 1
Transform = Callable[[Image.Image, random.Random], Image.Image]


def _crop(frac: float) -> Transform:
    def crop(im: Image.Image, _: random.Random) -> Image.Image:
        dx, dy = round(im.width * frac), round(im.height * frac)
        return im.crop((dx, dy, im.width - dx, im.height - dy))
    return crop


def _resize(frac: float) -> Transform:
    def resize(im: Image.Image, _: random.Random) -> Image.Image:
        size = (max(16, round(im.width * frac)), max(16, round(im.height * frac)))
        return im.resize(size, Image.Resampling.LANCZOS)
    return resize


def jitter(im: Image.Image, rng: random.Random) -> Image.Image:
    """Brightness, contrast, saturation in [0.8, 1.25] and a hue turn within +-5%."""
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.8, 1.25))
    shift = rng.uniform(-0.05, 0.05)
    hsv = np.asarray(im.convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + round(shift * 256)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def same(im: Image.Image, _: random.Random) -> Image.Image:
    return im


# name -> (what is done to the decoded original, None: a byte copy; JPEG quality, None:
# saved in the original's format)
TRANSFORMS: dict[str, tuple[Transform | None, int | None]] = {
    "exact": (None, None),
    "jpeg90": (same, 90), "jpeg70": (same, 70), "jpeg50": (same, 50), "jpeg30": (same, 30),
    "resize50": (_resize(0.5), None), "resize25": (_resize(0.25), None),
    "crop5": (_crop(0.05), None), "crop10": (_crop(0.10), None),
    "flip": (lambda im, _: ImageOps.mirror(im), None),
    "jitter": (jitter, None),
}


@dataclass
class Original:
    source: str  # photo | drawing
    stem: str
    image: Image.Image
    caption: str
    label: str
    related: str = ""  # for a look-alike: the id of the original it resembles

    @property
    def ext(self) -> str:
        return "jpg" if self.source == "photo" else "png"


def encode(im: Image.Image, ext: str, quality: int | None = None) -> bytes:
    """JPEG at ``quality`` when given, else the original's format (photos: JPEG)."""
    buf = io.BytesIO()
    if ext == "jpg" or quality:
        im.save(buf, format="JPEG", quality=quality or PHOTO_QUALITY)
    else:
        im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def photos(names: list[str]) -> list[Original]:
    """scikit-image's sample photographs (RGB; the stereo pair's right view is a
    look-alike of its left view)."""
    import skimage.data

    out = []
    for name in names:
        arr = getattr(skimage.data, name)()
        views = list(arr) if name == "stereo_motorcycle" else [arr]
        im = Image.fromarray(views[0]).convert("RGB")
        out.append(Original("photo", name, im, name.replace("_", " "), "photo"))
        if len(views) > 1:
            right = Image.fromarray(views[1]).convert("RGB")
            out.append(Original("photo", f"{name}_right", right, out[-1].caption, "photo",
                                related=f"photo/{name}/original"))
    return out


def thumb(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("L").resize((16, 16), Image.Resampling.BOX),
                      dtype=np.float32) / 255.0


def drawings(src: Path, n: int, similar: int, size: int, renderer: str, seed: int,
             categories: list[str]) -> tuple[list[Original], int]:
    """``n`` drawings spread over ``categories`` and ``similar`` look-alikes (same
    category, folder and author as a chosen one); returns them and how many candidates
    were left out as near-identical renders."""
    found = scan(src, categories)
    generic = generic_titles(found)
    rng = random.Random(seed)
    pool = interleave(found, rng)
    series: dict[tuple, list[Drawing]] = defaultdict(list)
    for d in found:
        if d.creator:
            series[d.category, d.subdirs, d.creator].append(d)
    chosen: list[Original] = []
    thumbs: list[np.ndarray] = []
    used: set[str] = set()
    dropped = 0

    def take(d: Drawing, related: str = "") -> Original | None:
        nonlocal dropped
        if d.id in used:
            return None
        used.add(d.id)
        image = render(d.path, size, renderer)
        if image is None:
            return None
        t = thumb(image)
        if any(np.abs(t - u).mean() < NEAR_IDENTICAL for u in thumbs):
            dropped += 1
            return None
        thumbs.append(t)
        stem = d.id.replace("/", "__")
        return Original("drawing", stem, image, caption(d, generic), d.category, related)

    per_category: Counter[str] = Counter()
    quota = -(-n // len(categories))
    look_alikes: list[Original] = []

    def choose(d: Drawing) -> Original | None:
        if len(chosen) >= n or per_category[d.category] >= quota:
            return None
        if (o := take(d)) is not None:
            chosen.append(o)
            per_category[d.category] += 1
        return o

    # first the originals of a series, each with one look-alike, then any drawing
    for d in pool:
        if len(look_alikes) >= similar or len(chosen) >= n:
            break
        mates = [m for m in series.get((d.category, d.subdirs, d.creator), [])
                 if m.id != d.id and m.id not in used]
        if not mates or d.id in used or (o := choose(d)) is None:
            continue
        for m in rng.sample(mates, min(len(mates), 3)):
            if (alike := take(m, related=f"drawing/{o.stem}/original")) is not None:
                look_alikes.append(alike)
                break
    for d in pool:
        if len(chosen) >= n:
            break
        choose(d)
    return chosen + look_alikes, dropped


def split_of(rng: random.Random) -> str:
    x, acc = rng.random(), 0.0
    for name, frac in SPLITS:
        acc += frac
        if x < acc:
            return name
    return SPLITS[-1][0]


def write_set(out: Path, originals: list[Original], seed: int) -> list[dict[str, str]]:
    """Every original and its copies as files; the manifest rows."""
    rows = []
    rng = random.Random(f"{seed}:transforms")
    split_rng = random.Random(f"{seed}:splits")
    for o in originals:
        folder = out / "images" / o.source / o.stem
        folder.mkdir(parents=True, exist_ok=True)
        group = f"{o.source}/{o.stem}"
        data = encode(o.image, o.ext)
        decoded = Image.open(io.BytesIO(data)).convert("RGB")  # what a copier starts from
        todo: list[tuple[str, bytes]] = [("original", data)]
        if not o.related:  # look-alikes are distractors only: no copies of their own
            for name, (fn, quality) in TRANSFORMS.items():
                blob = data if fn is None else encode(fn(decoded, rng), o.ext, quality)
                todo.append((name, blob))
        for name, blob in todo:
            ext = "jpg" if blob[:2] == b"\xff\xd8" else "png"
            path = folder / f"{name}.{ext}"
            path.write_bytes(blob)
            with Image.open(io.BytesIO(blob)) as im:
                w, h = im.size
            rows.append({"id": f"{group}/{name}", "image": str(path.relative_to(out)),
                         "caption": o.caption, "label": o.label,
                         "labels": f"{o.source}|{name}", "split": split_of(split_rng),
                         "group": group, "transform": "similar" if o.related else name,
                         "source": o.source, "related": o.related,
                         "width": str(w), "height": str(h)})
    return rows


def write_readme(out: Path, rows: list[dict[str, str]], command: str, dropped: int) -> None:
    counts = Counter((r["transform"], r["source"]) for r in rows)
    names = ["original", *TRANSFORMS, "similar"]
    table = ["| transform | photos | drawings |", "|---|---:|---:|"]
    table += [f"| {t} | {counts[t, 'photo']} | {counts[t, 'drawing']} |" for t in names]
    table.append(f"| **total** | {sum(v for (_, s), v in counts.items() if s == 'photo')} | "
                 f"{sum(v for (_, s), v in counts.items() if s == 'drawing')} |")
    (out / "README.md").write_text(f"""# Duplicate test set

Real photographs (scikit-image sample data) and openclipart drawings (Debian
`openclipart-svg` {package_version()}, public domain), each with copies made by common
transformations, plus distinct look-alikes.  Built by `scripts/build_dup_set.py`; the
transformations and the ground truth are described in its docstring.

`manifest.csv`: `group` is the ground-truth duplicate group (the original's
`source/stem`), `transform` what was done to the original (`similar`: a distinct
look-alike of `related`, in a group of its own).  {dropped} candidate drawings were left
out as near-identical renders of one already chosen.

## Rebuild

```
{command}
```

## Counts

{chr(10).join(table)}
""", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--out", type=Path, default=Path("data/dups"), help="output folder (replaced)")
    add("--drawings", type=int, default=150, help="openclipart originals")
    add("--similar", type=int, default=40, help="drawing look-alikes (distinct images)")
    add("--size", type=int, default=256, help="side of the rendered drawings, in pixels")
    add("--src", type=Path, default=Path("/usr/share/openclipart/svg"),
        help="openclipart-svg tree (Debian package openclipart-svg)")
    add("--renderer", choices=("auto", "rsvg", "cairosvg"), default="auto",
        help="rsvg: rsvg-convert (librsvg2-bin); cairosvg: the Python package "
             "(extra demo-build); auto: rsvg when installed")
    add("--categories", nargs="+", default=list(DEFAULT_CATEGORIES),
        help="openclipart folders to draw from")
    add("--photos", nargs="+", default=list(PHOTOS), choices=PHOTOS, metavar="NAME",
        help="scikit-image sample photos to use")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    renderer = args.renderer
    if renderer == "auto":
        renderer = "rsvg" if shutil.which("rsvg-convert") else "cairosvg"
    if args.drawings and not args.src.is_dir():
        parser.error(f"{args.src} not found: install openclipart-svg or pass --drawings 0")
    if args.drawings and renderer == "cairosvg":
        try:
            import cairosvg  # noqa: F401
        except ImportError:
            parser.error("no SVG renderer: pip install cairosvg (extra demo-build) or "
                         "apt install librsvg2-bin")
    originals = photos(args.photos)
    dropped = 0
    if args.drawings:
        drawn, dropped = drawings(args.src, args.drawings, args.similar, args.size, renderer,
                                  args.seed, args.categories)
        originals += drawn
    shutil.rmtree(args.out / "images", ignore_errors=True)
    rows = write_set(args.out, originals, args.seed)
    with (args.out / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    shown = sys.argv[1:] if argv is None else argv
    write_readme(args.out, rows, shlex.join(["python", "scripts/build_dup_set.py", *shown]),
                 dropped)
    kinds = Counter(r["transform"] for r in rows)
    print(f"wrote {len(rows)} images ({len(originals) - kinds['similar']} originals with "
          f"{len(TRANSFORMS)} copies each, {kinds['similar']} look-alikes; {dropped} "
          f"near-identical drawings left out) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
