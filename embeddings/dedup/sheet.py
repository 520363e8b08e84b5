"""A contact sheet of the largest duplicate groups, as PNG bytes: people check duplicates by eye.

One band per group, largest first: the group number and size, then the representative
(framed) and its members in report order, each captioned with its similarity to the
representative (and its split, when known).  Thumbnails come from a caller's function
``thumbnail(row) -> PIL image | None`` (the run's images, a thumbnail cache, another
source); a missing image is drawn as a grey tile, never an error.  Writing the bytes is
the caller's job (the store's atomic write).
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image, ImageDraw, ImageFont

from .report import GroupReport

Thumbnail = Callable[[int], Image.Image | None]
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
KEPT = (0, 130, 60)
INK = (30, 30, 30)


def contact_sheet(report: GroupReport, thumbnail: Thumbnail, *, groups: int = 12,
                  per_group: int = 8, size: int = 96) -> Image.Image:
    """The sheet of the first ``groups`` groups (the largest), ``per_group`` tiles each."""
    font = ImageFont.load_default(size=max(9, size // 8))
    label_w, pad, text_h = max(80, size), 6, max(12, size // 7) * 2 + 4
    shown = list(range(min(groups, report.groups)))
    tile_h = size + text_h
    more_x = label_w + per_group * (size + pad)
    width = more_x + 48  # room for "+N" after the last tile
    sheet = Image.new("RGB", (width, max(1, len(shown)) * (tile_h + pad) + pad), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if not shown:
        draw.text((pad, pad), "no duplicate groups", fill=INK, font=font)
        return sheet
    for band, g in enumerate(shown):
        lo = int(report.group.searchsorted(g))
        hi = int(report.group.searchsorted(g + 1))
        top = pad + band * (tile_h + pad)
        draw.text((pad, top + 2), f"group {g}\n{hi - lo} images", fill=INK, font=font)
        for col, k in enumerate(range(lo, min(hi, lo + per_group))):
            left = label_w + col * (size + pad)
            _paste(sheet, thumbnail(int(report.row[k])), left, top, size)
            if report.representative[k]:
                draw.rectangle((left - 2, top - 2, left + size + 1, top + size + 1),
                               outline=KEPT, width=3)
            caption = "kept" if report.representative[k] else \
                f"{float(report.similarity[k]):.3f}"
            if report.split is not None:
                caption += f"\n{report.split[k]}"
            draw.text((left, top + size + 2), caption, fill=INK, font=font)
        if hi - lo > per_group:
            draw.text((more_x, top + size // 2), f"+{hi - lo - per_group}", fill=INK,
                      font=font)
    return sheet


def _paste(sheet: Image.Image, image: Image.Image | None, left: int, top: int,
           size: int) -> None:
    if image is None:
        sheet.paste(MISSING, (left, top, left + size, top + size))
        return
    im = image.convert("RGB")
    im.thumbnail((size, size))
    sheet.paste(im, (left + (size - im.width) // 2, top + (size - im.height) // 2))


def to_png(image: Image.Image) -> bytes:
    """PNG bytes of a sheet."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()
