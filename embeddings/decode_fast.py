"""The ``fast`` decode path: JPEG bytes decoded in batches, preprocessed as tensor ops.

Workers read bytes and parse the header only.  A plain JPEG (RGB or greyscale, no EXIF
rotation, ending in its EOI marker) is decoded in a batch; everything else goes through
the exact path for that item alone (:func:`embeddings.decode_base.exact_item`), and so
does any JPEG the batch decoder refuses.  Resizing works on uint8 like PIL (antialiased
bicubic, same output size rule as open_clip), so the pixels differ from the exact path's
only by rounding and, on CPU, by PIL's draft mode (DCT downscaling, about 40 dB PSNR).

On CUDA the workers hand over one byte buffer per batch and nvJPEG decodes it in a
prefetch thread on a side stream while the model runs; on CPU the workers decode, resize
and crop whole batches and hand over uint8 (a quarter of float32's bytes), and the
prefetch thread normalises them while the model runs.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from open_clip.transform import center_crop_or_pad
from PIL import Image
from torchvision.io import ImageReadMode
from torchvision.io import decode_jpeg as _decode_jpeg

from .decode_base import ImageFiles, PixelBatch, Transform, exact_item, loader, prefetch
from .fingerprint import Print, content_digest, phash_many
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageHeader,
    read_header,
)
from .sources import ImageSource

Item = tuple[Any, ...]  # (i, "jpeg", bytes, header) | (i, "ready", tensors, print)
#                          | (i, "reject", why)


@dataclass(frozen=True)
class Preprocess:
    """An open_clip ``preprocess_cfg`` (inference): what the encoder's transform does."""

    size: tuple[int, int]  # (height, width) fed to the model
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def of(cls, encoder: Any) -> Preprocess | None:
        """The encoder's config, or None when it has none the fast path can reproduce."""
        cfg = getattr(getattr(getattr(encoder, "model", None), "visual", None),
                      "preprocess_cfg", None)
        if not cfg or cfg.get("mode", "RGB") != "RGB" or encoder.image_transform is None:
            return None
        if cfg.get("resize_mode", "shortest") not in ("shortest", "longest", "squash"):
            return None
        size = cfg["size"]
        hw = (int(size), int(size)) if isinstance(size, int) else (int(size[-2]), int(size[-1]))
        return cls(hw, tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation") or
                   "bicubic", cfg.get("resize_mode") or "shortest", int(cfg.get("fill_color", 0)))

    def resize_to(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after the resize step, by open_clip's / torchvision's rule."""
        th, tw = self.size
        if self.resize_mode == "squash":
            return th, tw
        if self.resize_mode == "shortest" and th == tw:  # torchvision Resize(int)
            short, long = min(h, w), max(h, w)
            new_long = int(th * long / short)
            return (th, new_long) if h <= w else (new_long, th)
        ratio_h, ratio_w = h / th, w / tw  # timm's ResizeKeepRatio
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(h / ratio), round(w / ratio)

    def interp(self) -> TF.InterpolationMode:
        # open_clip's non-square "shortest" ResizeKeepRatio is always bicubic.
        bilinear = self.interpolation == "bilinear" and not (
            self.resize_mode == "shortest" and self.size[0] != self.size[1])
        return TF.InterpolationMode.BILINEAR if bilinear else TF.InterpolationMode.BICUBIC

    def resize_crop(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, 3, h, w)`` images of one size -> uint8 ``(n, 3, H, W)``."""
        x = TF.resize(images, list(self.resize_to(*images.shape[-2:])), self.interp(),
                      antialias=True)
        return center_crop_or_pad(x, list(self.size), fill=self.fill_color)

    def normalise(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 pixels -> ``(x / 255 - mean) / std`` in ``dtype`` (two in-place ops: 4x
        faster than the plain expression on one CPU core)."""
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return x.to(torch.float32).mul_(1.0 / (255.0 * std)).sub_(mean / std).to(dtype)

    def apply(self, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """uint8 ``(n, 3, h, w)`` images of one size -> normalised ``(n, 3, H, W)``."""
        return self.normalise(self.resize_crop(images), dtype)


def fast_capable(encoder: Any) -> bool:
    return Preprocess.of(encoder) is not None


def pixel_dtype(encoder: Any, device: torch.device) -> torch.dtype:
    """float16 on CUDA (weights in half, or float32 under float16 autocast), else float32."""
    if device.type != "cuda":
        return torch.float32
    dtype = next(encoder.model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def fast_provenance(device: torch.device) -> dict[str, Any]:
    decoder = ("nvJPEG (torchvision.io.decode_jpeg, batched)" if device.type == "cuda" else
               "libjpeg-turbo (PIL draft mode at >= 2x the target size, else "
               "torchvision.io.decode_jpeg)")
    return {"decode": "fast", "decoder": decoder,
            "resize": "torchvision antialiased resize on uint8 (preprocess_cfg interpolation), "
                      "centre crop, normalise on the device",
            "fallback": "exact (PIL + open_clip preprocess) for non-JPEG, CMYK, EXIF-rotated "
                        "or refused files"}


def batchable(head: ImageHeader, data: bytes) -> bool:
    """A JPEG the batch decoder gives the same pixels for as PIL (else: exact path)."""
    return (head.format == "JPEG" and head.mode in ("RGB", "L") and head.orientation == 1
            and data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"))  # no EOI: maybe truncated


class JpegFiles(ImageFiles):
    """Keys -> bytes of batchable JPEGs; anything else decoded here by the exact path."""

    def __getitem__(self, i: int) -> Item:
        try:
            data = self.read(i)
            head = read_header(data, self.max_pixels)
        except ImageError as e:
            return i, "reject", str(e)
        except Exception as e:  # a bad file must not kill the run
            return i, "reject", f"unreadable image: {type(e).__name__}: {e}"
        if batchable(head, data):
            return i, "jpeg", data, head
        return exact(i, data, self.transforms, self.max_pixels)


def exact(i: int, data: bytes, transforms: Sequence[Transform], max_pixels: int) -> Item:
    """The exact path for one file already in memory: ready tensors, or the reject."""
    _, tensors, why, fp = exact_item(i, lambda: data, transforms, max_pixels)
    return (i, "ready", tensors, fp) if tensors is not None else (i, "reject", why)


def decode_jpeg(data: Any, device: torch.device | str = "cpu") -> Any:
    """``torchvision.io.decode_jpeg`` to RGB.  torchvision 0.29 deprecates its image codecs
    in favour of TorchCodec and warns on every call; until we move, that is noise."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_cpu(data: bytes, head: ImageHeader, want: tuple[int, int]) -> torch.Tensor:
    """One JPEG -> uint8 (3, h, w); with draft mode when the file is >= 2x ``want`` (h, w)."""
    if head.width >= 2 * want[1] and head.height >= 2 * want[0]:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB" if im.mode == "RGB" else im.mode, (want[1], want[0]))
            arr = np.array(im.convert("RGB"))
        return torch.from_numpy(arr).permute(2, 0, 1)
    return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))


class FastCollate:
    """Worker-side batch assembly (picklable): on CPU decode, resize and crop (uint8); for
    the GPU, pack the bytes into one buffer."""

    def __init__(self, configs: Sequence[Preprocess], dtypes: Sequence[torch.dtype],
                 transforms: Sequence[Transform], max_pixels: int, on_worker: bool) -> None:
        self.configs, self.dtypes, self.transforms = list(configs), list(dtypes), transforms
        self.max_pixels, self.on_worker = max_pixels, on_worker

    def __call__(self, items: list[Item]) -> Any:
        jpegs = [it for it in items if it[1] == "jpeg"]
        ready = [it for it in items if it[1] == "ready"]
        failures = [(it[0], it[2]) for it in items if it[1] == "reject"]
        if not self.on_worker:  # one buffer, not one shared-memory tensor per image
            buf = torch.frombuffer(bytearray(b"".join(it[2] for it in jpegs)) or bytearray(1),
                                   dtype=torch.uint8)
            return ([it[0] for it in jpegs], buf, [len(it[2]) for it in jpegs],
                    [it[3] for it in jpegs], self._stack(ready), failures,
                    [content_digest(it[2]) for it in jpegs], {it[0]: it[3] for it in ready})
        decoded, prints = [], {}
        for i, _, data, head in jpegs:
            try:
                img = decode_cpu(data, head, self.want(head))
                decoded.append((i, img))
                prints[i] = (content_digest(data), int(phash_many(img[None])[0]),
                             head.width * head.height)
            except Exception:  # refused: the exact path decides (and names the reason)
                redo = exact(i, data, self.transforms, self.max_pixels)
                (ready.append(redo) if redo[1] == "ready" else failures.append((i, redo[2])))
        prints.update((it[0], it[3]) for it in ready)
        return resize_crop(decoded, self.configs), self._stack(ready), failures, prints

    def want(self, head: ImageHeader) -> tuple[int, int]:
        sizes = [c.resize_to(head.height, head.width) for c in self.configs]
        return max(s[0] for s in sizes), max(s[1] for s in sizes)

    def _stack(self, ready: list[Item]) -> tuple[list[int], list[torch.Tensor]]:
        ready = sorted(ready, key=lambda it: it[0])
        if not ready:
            return [], []
        return ([it[0] for it in ready],
                [torch.stack([it[2][k] for it in ready]) for k in range(len(self.transforms))])


Rows = tuple[list[int], list[torch.Tensor]]  # (input positions, one tensor per encoder)


def resize_crop(decoded: list[tuple[int, torch.Tensor]], configs: Sequence[Preprocess]
                ) -> Rows:
    """Decoded uint8 images -> per config uint8 ``(n, 3, H, W)``, rows by input position;
    one batched resize per distinct image size."""
    decoded = sorted(decoded, key=lambda d: d[0])
    groups: dict[tuple[int, int], list[int]] = {}
    for k, (_, img) in enumerate(decoded):
        groups.setdefault(tuple(img.shape[-2:]), []).append(k)
    out = []
    for cfg in configs:
        if len(groups) <= 1:  # the usual batch: one size
            out.append(cfg.resize_crop(torch.stack([img for _, img in decoded]))
                       if decoded else torch.empty((0, 3, *cfg.size), dtype=torch.uint8))
            continue
        x = torch.empty((len(decoded), 3, *cfg.size), dtype=torch.uint8,
                        device=decoded[0][1].device)
        for ks in groups.values():
            x[ks] = cfg.resize_crop(torch.stack([decoded[k][1] for k in ks]))
        out.append(x)
    return [i for i, _ in decoded], out


def finish(resized: Rows, ready: Rows, failures: list[tuple[int, str]],
           prints: dict[int, Print | None], configs: Sequence[Preprocess],
           dtypes: Sequence[torch.dtype], device: torch.device) -> PixelBatch:
    """Normalise the resized rows on ``device`` and merge the exact path's ready rows, in
    input order.  Workers hand over uint8 (4x less to copy between processes)."""
    indices = sorted(resized[0] + ready[0])
    row = {i: k for k, i in enumerate(indices)}
    pixels = []
    for k, (cfg, dtype) in enumerate(zip(configs, dtypes)):
        fast = cfg.normalise(resized[1][k].to(device, non_blocking=True), dtype) \
            if resized[0] else None
        if fast is not None and not ready[0]:
            pixels.append(fast)
            continue
        out = torch.empty((len(indices), 3, *cfg.size), dtype=dtype, device=device)
        if fast is not None:
            out[torch.tensor([row[i] for i in resized[0]], device=device)] = fast
        if ready[0]:
            out[torch.tensor([row[i] for i in ready[0]], device=device)] = \
                ready[1][k].to(device, dtype, non_blocking=True)
        pixels.append(out)
    return PixelBatch(indices, pixels, sorted(failures), [prints.get(i) for i in indices])


def _decode_gpu(packed: Any, collate: FastCollate, device: torch.device) -> PixelBatch:
    """nvJPEG on one packed batch; files it refuses go through the exact path on CPU."""
    idx, buf, lengths, heads, (ready_idx, ready_px), failures, digests, prints = packed
    datas = list(torch.split(buf[:sum(lengths)], lengths)) if lengths else []
    try:
        images: list[torch.Tensor | None] = list(
            decode_jpeg(datas, device)) if datas else []
    except RuntimeError:  # one bad file fails the call: find it
        images = []
        for d in datas:
            try:
                images.append(decode_jpeg(d, device))
            except RuntimeError:
                images.append(None)
    ready = list(zip(ready_idx, zip(*ready_px))) if ready_idx else []
    decoded = []
    for i, d, img, head, digest in zip(idx, datas, images, heads, digests):
        if img is not None:
            decoded.append((i, img))
            prints[i] = (digest, int(phash_many(img[None])[0]), head.width * head.height)
            continue
        redo = exact(i, d.numpy().tobytes(), collate.transforms, collate.max_pixels)
        if redo[1] == "ready":
            ready.append((i, redo[2]))
            prints[i] = redo[3]
        else:
            failures.append((i, redo[2]))
    ready.sort(key=lambda r: r[0])
    stacked = ([i for i, _ in ready], [torch.stack([t[k] for _, t in ready])
                                        for k in range(len(collate.transforms))]
               if ready else [])
    return finish(resize_crop(decoded, collate.configs), stacked, failures, prints,
                  collate.configs, collate.dtypes, device)


def decode_fast(source: ImageSource, keys: Sequence[str], encoders: Sequence[Any], *,
                device: torch.device, batch_size: int = 64, workers: int = 0,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> Iterator[PixelBatch]:
    """Batched JPEG decode + tensor preprocessing, overlapped with the caller's model."""
    configs = [Preprocess.of(e) for e in encoders]
    if any(c is None for c in configs):
        raise ValueError("decode_fast needs encoders with an open_clip preprocess_cfg")
    transforms = [e.image_transform for e in encoders]
    gpu = device.type == "cuda"
    collate = FastCollate(configs, [pixel_dtype(e, device) for e in encoders], transforms,
                          max_pixels, on_worker=not gpu)
    batches = loader(JpegFiles(source, keys, transforms, max_pixels), collate,
                     batch_size=batch_size, workers=workers, pin=gpu)
    if gpu:
        return prefetch((_decode_gpu(b, collate, device) for b in batches), device)
    return prefetch((finish(*b, collate.configs, collate.dtypes, device) for b in batches),
                    device)
