"""Sub-commands ``embed`` and ``tiny-model``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from embeddings.encoders import write_tiny_open_clip

from .config import DEFAULT_CONFIG, embed_config, load_toml
from .embed import run_embed


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed a dataset into Parquet shards (resumable)",
                       description="Embed images and captions of a dataset into Parquet "
                       "shards under OUT/embed. Reruns resume; a finished run is left as is.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML config (default: %(default)s)")
    p.add_argument("--data", help="manifest (csv/jsonl/parquet/COCO/Karpathy json) or image folder")
    p.add_argument("--root", help="folder image paths are relative to (default: the manifest's)")
    p.add_argument("--format", help="dataset format if not detected from the path")
    p.add_argument("--out", help="run directory")
    p.add_argument("--model",
                   help="open_clip model name or local-dir:/path (first open_clip encoder)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion2b_s34b_b79k")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="image decoding processes (0: in the main process)")
    p.add_argument("--shard-size", type=int, help="input records per shard")
    p.add_argument("--dtype", choices=("float16", "float32"))
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_embed)

    t = sub.add_parser("tiny-model", help="write a tiny RANDOM open_clip model for offline tests",
                       description="Write a tiny open_clip model with random weights in "
                       "open_clip's local-dir: format. For smoke tests only.")
    t.add_argument("--out", default="models/tiny-clip", help="directory (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)


def _embed(args: argparse.Namespace) -> int:
    cfg = embed_config(
        load_toml(args.config), data=args.data, root=args.root, format=args.format, out=args.out,
        model=args.model, pretrained=args.pretrained, device=args.device,
        batch_size=args.batch_size, workers=args.workers, shard_size=args.shard_size,
        dtype=args.dtype, progress=False if args.no_progress else None)
    r = run_embed(cfg)
    if r.nothing_to_do:
        print(f"embed: nothing to do, {r.run_dir} is complete "
              f"({r.rows['images']} image rows, {r.rows['captions']} caption rows)")
        return 0
    print(f"embed: {r.rows['images']} image rows, {r.rows['captions']} caption rows in "
          f"{r.run_dir}/embed ({r.new_shards} new shards, {r.seconds:.1f} s; {r.rate_summary()})")
    skipped = sum(r.rejects.values())
    if skipped:
        detail = ", ".join(f"{why}: {n}" for why, n in sorted(r.rejects.items()))
        print(f"skipped {skipped}: {detail} (details: {r.run_dir}/embed/rejects.jsonl)")
    return 0


def _tiny(args: argparse.Namespace) -> int:
    out = write_tiny_open_clip(args.out, seed=args.seed)
    print(f"wrote a tiny random open_clip model to {out} (use model = \"local-dir:{out}\")",
          file=sys.stdout)
    return 0
