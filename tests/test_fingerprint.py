"""Perceptual hash and content digest on real photos (scikit-image samples).

The pHash must survive what a copy of a photo goes through on the web (JPEG re-encodes,
resizes, aspect changes), tell distinct photos apart, give the same bits from every decode
path (PIL image, numpy batch, torch tensor, the fast path's draft-mode JPEG decode), and
it is expected to miss mirror images and crops (documented, checked here)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageOps

from embeddings.decode_fast import decode_cpu
from embeddings.fingerprint import (
    content_digest,
    digest_keys,
    fingerprint,
    hamming,
    hash_similarity,
    phash,
    phash_many,
)
from embeddings.images import decode_image, read_header

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry",
          "hubble_deep_field", "retina", "camera", "moon", "coins", "brick", "grass",
          "gravel", "page", "text", "clock", "cell")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [Image.fromarray(getattr(skimage.data, n)()).convert("RGB") for n in PHOTOS]


def jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def hashes(images: list[Image.Image]) -> np.ndarray:
    return np.array([phash(im) for im in images], dtype=np.uint64)


def test_phash_survives_reencodes_and_resizes(photos: list[Image.Image]) -> None:
    base = hashes(photos)
    assert all(bin(int(h)).count("1") == 32 for h in base)  # median split: 32 bits set
    for q in (95, 75, 50, 30):
        again = hashes([decode_image(jpeg(im, q)) for im in photos])
        assert hamming(base, again).max() <= 6, q
    for scale in (0.5, 0.25, 2.0):
        resized = [im.resize((round(im.width * scale), round(im.height * scale)),
                             Image.Resampling.LANCZOS) for im in photos]
        assert hamming(base, hashes(resized)).max() <= 4, scale
    squashed = [im.resize((im.width // 2, im.height), Image.Resampling.BILINEAR)
                for im in photos]
    assert hamming(base, hashes(squashed)).max() <= 4
    png = [decode_image(_png(im)) for im in photos]
    assert (hashes(png) == base).all()  # lossless format change: the same hash


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_phash_tells_distinct_photos_apart_and_misses_flips(photos: list[Image.Image]
                                                           ) -> None:
    base = hashes(photos)
    d = hamming(base[:, None], base[None, :])
    assert d[np.triu_indices(len(base), 1)].min() >= 12
    flipped = hashes([ImageOps.mirror(im) for im in photos])
    assert hamming(base, flipped).min() >= 20  # documented: a mirror image is not caught
    cropped = hashes([im.crop((im.width // 10, im.height // 10, im.width * 9 // 10,
                               im.height * 9 // 10)) for im in photos])
    assert np.median(hamming(base, cropped)) > 8  # documented: 10% crops mostly escape


def test_every_decode_path_gives_the_same_hash(photos: list[Image.Image]) -> None:
    base = hashes(photos)
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in photos]
    assert (hamming(base, [phash(t) for t in tensors]) <= 1).all()
    assert (hamming(base, [phash(np.asarray(im)) for im in photos]) <= 1).all()
    assert (hamming(base, [phash(im.convert("L")) for im in photos]) <= 1).all()
    same = [im.resize((96, 64)) for im in photos]  # one batch of one size, both libraries
    one = hashes(same)
    batch_np = phash_many(np.stack([np.asarray(im) for im in same]))
    batch_t = phash_many(torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1)
                                      for im in same]))
    assert (hamming(one, batch_np) <= 1).all() and (hamming(one, batch_t) <= 1).all()
    # the fast decode path's pixels (libjpeg-turbo draft mode: DCT-downscaled)
    for im in photos[:8]:
        data = jpeg(im, 90)
        small = decode_cpu(data, read_header(data), (112, 112))
        assert small.shape[1] < im.height or im.height < 224
        assert hamming(phash(decode_image(data)), phash(small)) <= 2
    assert len(phash_many(np.zeros((0, 8, 8, 3), dtype=np.uint8))) == 0
    with pytest.raises(ValueError, match="pixels"):
        phash_many(np.zeros((8, 8), dtype=np.uint8))


def test_content_digest_and_keys(photos: list[Image.Image]) -> None:
    data = jpeg(photos[0], 90)
    digest, h = fingerprint(data, decode_image(data))
    assert len(digest) == 16 and digest == content_digest(bytearray(data))
    assert h == phash(decode_image(data))
    assert content_digest(data) != content_digest(data[:-1])
    keys = digest_keys([digest, digest.hex()])
    assert keys.shape == (2, 2) and (keys[0] == keys[1]).all()
    assert int(keys[0, 0]) == int.from_bytes(digest[:8], "big")
    with pytest.raises(ValueError, match="16 bytes"):
        digest_keys([b"short"])
    assert hash_similarity([0, 32, 64]).tolist() == [1.0, 0.5, 0.0]
