"""Sub-commands ``embed`` and ``tiny-model``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import DataConfig, EmbedConfig, embed_config, load_toml
from .options import add_options, common_options, overrides

EMBED_MEMORY = "lower --batch-size, --workers or --shard-size"


def register(sub: Any) -> None:
    p = sub.add_parser("embed", help="embed a dataset into Parquet shards (resumable)",
                       description="Embed images and captions of a dataset into Parquet "
                       "shards under RUN/embed. Reruns resume; a finished run is left as is.")
    common_options(p)
    add_options(p, DataConfig)
    p.add_argument("--model",
                   help="open_clip model name or local-dir:/path (first open_clip encoder)")
    p.add_argument("--pretrained", help="open_clip pretrained tag, e.g. laion2b_s34b_b79k")
    add_options(p, EmbedConfig)
    p.set_defaults(func=_embed, memory_hint=EMBED_MEMORY)

    t = sub.add_parser("tiny-model", help="write a tiny RANDOM open_clip model for offline tests",
                       description="Write a tiny open_clip model with random weights in "
                       "open_clip's local-dir: format. For smoke tests only.")
    t.add_argument("--out", default="models/tiny-clip", help="directory (default: %(default)s)")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)


def _embed(args: argparse.Namespace) -> int:
    from .embed import run_embed

    cfg = embed_config(load_toml(args.config), run=args.run, data=overrides(args, DataConfig),
                       model=args.model, pretrained=args.pretrained,
                       **overrides(args, EmbedConfig))
    r = run_embed(cfg)
    if r.nothing_to_do:
        print(f"embed: nothing to do, {r.run_dir} is complete "
              f"({r.rows['images']} image rows, {r.rows['captions']} caption rows)")
        return 0
    print(f"embed: {r.rows['images']} image rows, {r.rows['captions']} caption rows in "
          f"{r.run_dir}/embed ({r.new_shards} new blocks, {r.seconds:.1f} s; "
          f"{r.rate_summary()})")
    if r.sidecar:
        from embeddings.ingest.sidecar import summary

        print(summary(r.sidecar))
    skipped = sum(r.rejects.values())
    if skipped:
        detail = ", ".join(f"{why}: {n}" for why, n in sorted(r.rejects.items()))
        print(f"skipped {skipped}: {detail} (details: {r.run_dir}/embed/rejects.jsonl)")
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from embeddings.encoders import write_tiny_open_clip
    from embeddings.store import write_errors

    with write_errors(Path(args.out)):
        out = write_tiny_open_clip(args.out, seed=args.seed)
    print(f"wrote a tiny random open_clip model to {out} (use model = \"local-dir:{out}\")",
          file=sys.stdout)
    return 0
