"""A generated corpus of awkward inputs: every case the embed stage must survive."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
from PIL import Image

# name -> expected reject reason prefix (None: must be embedded)
EXPECTED = {
    "ok_rgb": None,
    "cmyk": None,
    "gray16": None,
    "palette_alpha": None,
    "rgba": None,
    "exif_rotated": None,
    "animated": None,
    "chinese_caption": None,
    "long_caption": None,
    "missing": "missing file",
    "zero_byte": "empty file",
    "truncated": "corrupt or truncated image",
    "not_image": "not an image",
    "bomb": "image too large",
    "escape": "image path escapes the dataset root",
    "dup": "duplicate id",
}
LONG_CAPTION = "a very long caption " + " ".join(f"word{i}" for i in range(300))
CHINESE = "一只红色的自行车停在雨中的街道上"
BOMB_PIXELS_LIMIT = 1_000_000  # the corpus's bomb is 2000x2000; run with this max_pixels


def _gradient(w: int = 48, h: int = 32) -> np.ndarray:
    x = np.linspace(0, 255, w, dtype=np.float32)
    y = np.linspace(0, 255, h, dtype=np.float32)
    return np.stack([np.add.outer(y, x) / 2, np.tile(x, (h, 1)),
                     np.tile(y[:, None], (1, w))], -1).astype(np.uint8)


def build(root: Path) -> Path:
    """Write the corpus images and ``manifest.csv`` under ``root``; return the manifest."""
    img = root / "img"
    img.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(_gradient())
    rgb.save(img / "ok_rgb.png")
    rgb.convert("CMYK").save(img / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 32).reshape(32, 48) * 40).astype(np.uint16)).save(
        img / "gray16.png")
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(img / "palette_alpha.png", transparency=0)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(img / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW on display
    rgb.save(img / "exif_rotated.jpg", exif=exif)
    frames = [Image.new("RGB", (32, 32), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(img / "animated.gif", save_all=True, append_images=frames[1:], duration=50)
    rgb.save(img / "chinese_caption.png")
    rgb.save(img / "long_caption.png")
    (img / "zero_byte.png").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "PNG")
    (img / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (img / "not_image.jpg").write_text("this is not a JPEG\n")
    Image.new("L", (2000, 2000)).save(img / "bomb.png")
    rows = []
    for name in EXPECTED:
        ext = {"cmyk": "jpg", "exif_rotated": "jpg", "animated": "gif", "not_image": "jpg"}
        path = f"img/{name}.{ext.get(name, 'png')}"
        caption = {"chinese_caption": CHINESE, "long_caption": LONG_CAPTION}.get(name, name)
        if name == "escape":
            path = "../outside.png"
        if name == "dup":
            continue
        rows.append({"id": name, "image": path, "caption": caption, "label": "a", "split": "train"})
    rows.append({"id": "ok_rgb", "image": "img/cmyk.jpg", "caption": "dup", "label": "a",
                 "split": "train"})  # same id as an earlier row, different image
    rows.append({"id": "empty_caption", "image": "img/ok_rgb.png", "caption": "   ",
                 "label": "a", "split": "train"})
    manifest = root / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["id", "image", "caption", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return manifest
