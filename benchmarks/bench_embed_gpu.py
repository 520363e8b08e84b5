"""Embedding throughput on one GPU against the encoder's own limit.

In one run over the same generated 640x480 photo JPEGs (at least 20,000), per
architecture (random weights, the model dtype the embed stage uses):

- encoder-only limit: random input tensors of the same shape, dtype and batch size;
- naive loader: PIL + open_clip preprocess in a torch DataLoader with 16 workers (the
  clip-retrieval way), then the model;
- our exact path and our fast path (``iter_image_embeddings(decode=...)``);
- captions: the text-tower limit (pre-tokenised, full context) vs ``encode_texts``.

Prints images/s (captions/s) and the mean GPU utilisation while each contender ran
(``torch.cuda.utilization`` or ``nvidia-smi``).  Needs a CUDA GPU; ``--device cpu`` only
smoke-tests the script (its figures mean nothing).

    python benchmarks/bench_embed_gpu.py                     # ViT-B-32 and ViT-L-14
    python benchmarks/bench_embed_gpu.py --archs ViT-B-32 --images 50000
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import captions, make_photos

from embeddings.encode import iter_image_embeddings
from embeddings.encoders import EncoderSpec, load_encoder, write_tiny_open_clip


def _make_chunk(job: tuple[str, int, int]) -> list[str]:
    dst, start, n = job
    names = make_photos(Path(dst) / f"{start:08d}", n, seed=start)
    return [f"{start:08d}/{name}" for name in names]


def make_many(dst: Path, n: int, procs: int) -> list[str]:
    """``n`` distinct JPEGs, generated in parallel (chunks of 500, one seed each)."""
    jobs = [(str(dst), s, min(500, n - s)) for s in range(0, n, 500)]
    with Pool(procs) as pool:
        return [name for chunk in pool.map(_make_chunk, jobs) for name in chunk]


class GpuLoad:
    """Mean GPU utilisation (%) sampled every 0.2 s while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.samples, self._stop = device, [], threading.Event()

    def _sample(self) -> float | None:
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:
            pass
        try:
            query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"--id={self.device.index or 0}"]
            out = subprocess.run(query, capture_output=True, text=True, timeout=2)
            return float(out.stdout.strip().splitlines()[0])
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            value = self._sample()
            if value is not None:
                self.samples.append(value)

    def __enter__(self) -> GpuLoad:
        if self.device.type == "cuda":
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.device.type == "cuda":
            self._thread.join()

    def mean(self) -> str:
        return f"{np.mean(self.samples):.0f}%" if self.samples else "n/a"


def timed(n: int, device: torch.device, run: Callable[[], object]) -> tuple[float, str]:
    with GpuLoad(device) as load:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
    return n / seconds, load.mean()


class NaiveFiles(Dataset):
    def __init__(self, root: Path, names: list[str], preprocess: Callable) -> None:
        self.root, self.names, self.preprocess = root, names, preprocess

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.root / self.names[i]).convert("RGB"))


def naive_loader(enc, root: Path, names: list[str], batch: int, workers: int) -> None:
    loader = DataLoader(NaiveFiles(root, names, enc.image_transform), batch_size=batch,
                        num_workers=workers, pin_memory=True, prefetch_factor=4)
    for x in loader:
        enc.encode_images(x)


def encoder_only(enc, device: torch.device, batch: int, steps: int) -> None:
    size = enc.model.visual.preprocess_cfg["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    x = torch.randn(batch, 3, *hw, device=device, dtype=dtype)
    for _ in range(steps):
        enc.encode_images(x)  # includes the copy of the vectors back to the host


def text_tower(enc, device: torch.device, batch: int, steps: int) -> None:
    tokens = torch.randint(1, 49_000, (batch, enc.context_length), device=device)
    with torch.inference_mode(), torch.autocast(device.type, torch.float16,
                                                enabled=device.type == "cuda"):
        for _ in range(steps):
            enc.model.encode_text(tokens).float().cpu()


def fp16_agreement(enc, device: torch.device, batch: int) -> float:
    """Min cosine of the stage's (float16) image vectors vs float32 on the same pixels."""
    size = enc.model.visual.preprocess_cfg["size"]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    x = torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(0))
    half = enc.encode_images(x)
    with torch.inference_mode():
        full = torch.nn.functional.normalize(
            enc.model.float().encode_image(x.to(device)).float(), dim=-1).cpu().numpy()
    return float((half * full).sum(1).min())


def arch_rows(arch: str, tmp: Path, root: Path, names: list[str], args: argparse.Namespace,
              device: torch.device) -> list[tuple[str, str, float, str]]:
    cfg = None if arch == "tiny" else open_clip.get_model_config(arch)  # tiny: smoke tests
    model = write_tiny_open_clip(tmp / arch, model_cfg=cfg)
    enc = load_encoder(EncoderSpec("clip", "open_clip", f"local-dir:{model}"), device)
    b, n = args.batch_size, len(names)
    steps = max(20, min(200, n // b))
    encoder_only(enc, device, b, 3)  # warm-up (cuDNN / kernel selection)
    rows = [(arch, "encoder only (random input)", *timed(steps * b, device,
                                                        lambda: encoder_only(enc, device, b,
                                                                             steps)))]
    rows.append(("", f"naive PIL DataLoader ({args.naive_workers} workers)",
                 *timed(n, device, lambda: naive_loader(enc, root, names, b,
                                                        args.naive_workers))))
    for decode in ("exact", "fast"):
        def run(decode: str = decode) -> None:
            for _ in iter_image_embeddings(root, names, [enc], device=device, batch_size=b,
                                           workers=args.workers, decode=decode):
                pass
        rows.append(("", f"our {decode} path", *timed(n, device, run)))
    texts = captions(args.captions)
    rows.append(("", "text tower only (77 tokens)",
                 *timed(steps * 256, device, lambda: text_tower(enc, device, 256, steps))))
    rows.append(("", "encode_texts (captions)",
                 *timed(len(texts), device, lambda: enc.encode_texts(texts, 256))))
    cos = fp16_agreement(enc, device, 64)
    rows.append(("", "fp16 vs fp32 min cosine", cos, ""))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", default="ViT-B-32,ViT-L-14")
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--captions", type=int, default=100_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--naive-workers", type=int, default=16)
    p.add_argument("--workers", type=int, default=None, help="our paths (default: stage's)")
    p.add_argument("--data", default=None, help="reuse (or keep) the generated JPEGs here")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to smoke-test")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench-embed-gpu needs a CUDA GPU and torch.cuda.is_available() is False "
                 "here: no GPU figures were measured.  (--device cpu smoke-tests the script.)")
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-gpu-"))
    root = Path(args.data) if args.data else tmp / "photos"
    try:
        names = sorted(str(q.relative_to(root)) for q in root.rglob("*.jpg")) \
            if root.exists() else []
        if len(names) < args.images:
            names = make_many(root, args.images, os.cpu_count() or 1)
        names = names[:args.images]
        rows = [r for arch in args.archs.split(",")
                for r in arch_rows(arch, tmp, root, names, args, device)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test)"
    print(f"device: {card}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"data: {len(names)} generated 640x480 photo JPEGs, batch {args.batch_size}, "
          f"{args.captions} captions")
    print(f"{'':10}{'contender':34}{'items/s':>10}{'GPU util':>10}")
    for arch, who, r, util in rows:
        print(f"{arch:10}{who:34}{r:>10.{4 if 'cosine' in who else 1}f}{util:>10}")


if __name__ == "__main__":
    main()
