"""Fingerprints of an image: the digest of its bytes and a 64-bit perceptual hash of its pixels.

Both are made at embed time from what the decoder already holds (the bytes it read, the
pixels it decoded), so they cost no extra read:

- :func:`content_digest`: ``xxh3_128`` of the bytes (16 bytes; ``.hex()`` is what
  :func:`embeddings.store.digest_file` gives for the same file).  Equal digests: the same
  file, byte for byte (exact groups).
- :func:`phash`: a DCT perceptual hash (pHash).  Luma, area-averaged to 32x32 (aspect
  ignored), 2-D DCT-II, the 8x8 lowest frequencies after the first row and column (the
  DC term and the pure horizontal/vertical ramps, which brightness and gradients move),
  one bit per coefficient: above the median of the 64 or not.  So 32 bits are set.

What the hash catches: JPEG re-encodes (quality 30 and up), resizes and aspect changes,
small colour/brightness/contrast changes, light blur and noise, format changes.  What it
misses: mirror images (a flip negates every odd horizontal frequency: about half the bits
change), rotations, crops beyond a few percent (the 32x32 grid shifts), borders or text
overlays, and anything a model would call "the same scene" but a camera shot twice.  The
measured distances per transformation are in the README ("Duplicates and leakage").

The same hash is computed from a PIL image (the ``exact`` decode path), a uint8 array or
torch tensor of one or many images (the ``fast`` path, on CPU or CUDA): every input is
reduced to float32 luma and area-averaged by the same weight matrices (numpy, or torch
on the pixels' device), then the same DCT, so the paths agree up to float rounding (a
bit at most near the median; tested).
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import xxhash
from PIL import Image

HASH_BITS = 64
GRID = 32  # the image is averaged down to GRID x GRID before the DCT
LOW = 8  # LOW x LOW coefficients (after the first row and column) make the 64 bits
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" mode
ROWS = 256  # rows of pixels turned into floats at a time


def content_digest(data: bytes | memoryview) -> bytes:
    """``xxh3_128`` of the bytes: 16 bytes, big-endian (``.hex()`` = the store's digest)."""
    return xxhash.xxh3_128_digest(data)


def digest_keys(digests: Any) -> np.ndarray:
    """Digests (16-byte values, hex strings, or an ``(n, 2)`` uint64 array) -> ``(n, 2)``
    uint64 keys that sort and compare like the digests."""
    if isinstance(digests, np.ndarray) and digests.dtype == np.uint64 and digests.ndim == 2:
        return digests
    raw = b"".join(bytes.fromhex(d) if isinstance(d, str) else bytes(d) for d in digests)
    if len(raw) % 16:
        raise ValueError("digests must be 16 bytes (xxh3_128) each")
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64).reshape(-1, 2)


@functools.lru_cache(maxsize=64)
def area_matrix(n_in: int, n_out: int = GRID) -> np.ndarray:
    """``(n_out, n_in)`` float64 weights of exact area averaging (a box filter with
    fractional pixel coverage): row ``i`` averages input cell ``[i, i + 1) * n_in / n_out``."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    px = np.arange(n_in)[None, :]
    cover = np.clip(np.minimum(hi, px + 1) - np.maximum(lo, px), 0, None)
    return cover / cover.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=1)
def dct_matrix(n: int = GRID) -> np.ndarray:
    """Orthonormal DCT-II matrix: ``D @ x`` transforms the columns of ``x``."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return d


def _bits(low: np.ndarray) -> np.ndarray:
    """``(n, 64)`` coefficients -> ``(n,)`` uint64 hashes (bit ``j`` = coefficient ``j``)."""
    above = low > np.median(low, axis=1, keepdims=True)
    weights = np.left_shift(np.uint64(1), np.arange(HASH_BITS, dtype=np.uint64))
    return (above.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)


@functools.lru_cache(maxsize=1)
def _blas() -> Any:
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def _small_numpy(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``(n, h, w, 3)`` or ``(n, h, w)`` -> ``(n, 32, 32)`` float64 area-averaged
    luma, a band of rows at a time (a 12-megapixel photo never becomes 96 MB of floats).

    One BLAS thread: OpenBLAS spreading these thin products over its threads was 7x
    slower than one thread on a loaded 2-core machine (and decode workers are many)."""
    n, h, w = pixels.shape[:3]
    a_w = area_matrix(w).T.astype(np.float32)
    luma_w = np.asarray(LUMA, dtype=np.float32)
    cols = np.empty((n, h, GRID), dtype=np.float32)
    with _blas().limit(limits=1):
        for r in range(0, h, ROWS):
            chunk = pixels[:, r:r + ROWS].astype(np.float32)
            luma = chunk if chunk.ndim == 3 else chunk @ luma_w
            cols[:, r:r + ROWS] = luma @ a_w
        a_h = area_matrix(h).astype(np.float32)
        return (a_h @ cols).astype(np.float64)


def _low(small: np.ndarray) -> np.ndarray:
    """``(n, 32, 32)`` float64 -> ``(n, 64)`` low DCT coefficients."""
    d = dct_matrix()
    coef = d @ small @ d.T  # 32 x 32 products: below OpenBLAS's threading size
    return coef[:, 1:LOW + 1, 1:LOW + 1].reshape(len(small), -1)


def _low_torch(pixels: Any) -> np.ndarray:
    """torch uint8 ``(n, 3, h, w)`` / ``(n, 1, h, w)`` on any device -> ``(n, 64)`` numpy.

    Luma and area averaging run where the pixels are (a GPU batch never leaves the GPU);
    only 32 x 32 numbers per image come back for the DCT."""
    import torch

    x = pixels.to(torch.float32)
    if x.shape[1] == 3:
        w = torch.tensor(LUMA, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        x = (x * w).sum(dim=1)
    else:
        x = x[:, 0]
    h, w_ = x.shape[-2:]
    a_h = torch.from_numpy(area_matrix(h)).to(x.device, torch.float32)
    a_w = torch.from_numpy(area_matrix(w_)).to(x.device, torch.float32)
    return _low((a_h @ x @ a_w.T).cpu().numpy().astype(np.float64))


def phash_many(pixels: Any) -> np.ndarray:
    """Perceptual hashes of a batch of same-sized images -> ``(n,)`` uint64.

    ``pixels``: a uint8 numpy array ``(n, h, w, 3)`` (or ``(n, h, w)`` luma), or a uint8
    torch tensor ``(n, 3, h, w)`` / ``(n, 1, h, w)`` (CPU or CUDA), as the decoders hold
    them."""
    if isinstance(pixels, np.ndarray):
        if pixels.ndim not in (3, 4):
            raise ValueError(f"expected (n, h, w[, 3]) pixels, got shape {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros(0, dtype=np.uint64)
        return _bits(_low(_small_numpy(pixels)))
    if getattr(pixels, "ndim", 0) != 4:
        raise ValueError(f"expected a (n, 3, h, w) tensor, got {type(pixels).__name__}")
    if len(pixels) == 0:
        return np.zeros(0, dtype=np.uint64)
    return _bits(_low_torch(pixels))


def phash(image: Image.Image | np.ndarray | Any) -> int:
    """The 64-bit perceptual hash of one image (a PIL image, a uint8 ``(h, w[, 3])``
    array or a ``(3, h, w)`` tensor), as a Python int."""
    if isinstance(image, Image.Image):
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        image = np.asarray(image)
    if isinstance(image, np.ndarray):
        return int(phash_many(image[None])[0])
    return int(phash_many(image[None])[0])


def hamming(a: Any, b: Any) -> np.ndarray:
    """Bitwise Hamming distance of uint64 hashes (broadcasting), as uint8."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.bitwise_count(x)


def hash_similarity(distance: Any) -> np.ndarray:
    """A Hamming distance as a similarity in [0, 1] (``1 - d / 64``), for reports."""
    return (1.0 - np.asarray(distance, dtype=np.float32) / HASH_BITS).astype(np.float32)


def fingerprint(data: bytes, image: Image.Image | np.ndarray | Any) -> tuple[bytes, int]:
    """``(content_digest(data), phash(image))``: both fingerprints of one decoded file."""
    return content_digest(data), phash(image)


Print = tuple[bytes, int, int]  # content digest, perceptual hash, width * height


def image_print(data: bytes, image: Image.Image) -> Print:
    """What the embed stage records of one decoded file (the exact path's PIL image)."""
    return content_digest(data), phash(image), image.width * image.height

