"""Sub-command ``latent``: learn a meta-space column over embedding columns of a run."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

from .config import LatentConfig, load_toml, stage_config
from .options import add_options, common_options, overrides


def register(sub: Any) -> None:
    p = sub.add_parser(
        "latent", help="learn a latent (meta-space) column over embedding columns",
        description="Train an autoencoder (or a VAE) over one or several embedding columns "
        "of a run, without labels (e.g. clip_image + minilm_text: one latent per image, its "
        "captions averaged), and write every row's latent as a new column NAME_latent that "
        "index, search (--id), heads and dedup take like any column. A row missing one "
        "input (an image without a caption) still gets a latent. A rerun after the embed "
        "stage added shards encodes only those with the saved model; --rebuild retrains.",
        epilog="example: python -m pipeline latent --config configs/offline.toml "
        "--inputs clip_image,minilm_text --dim 64\n"
        "         python -m pipeline index --columns meta_latent && python -m pipeline "
        "search --column meta_latent --id IMAGE_ID",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(p)
    add_options(p, LatentConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_latent, memory_hint="lower --max-rows (rows held to train on)")


def _latent(args: argparse.Namespace) -> int:
    from .latent import format_result, run_latent

    cfg = stage_config(LatentConfig, "latent", load_toml(args.config), args.run,
                       **overrides(args, LatentConfig))
    r = run_latent(cfg)
    print(json.dumps(asdict(r), indent=2) if args.json else format_result(r))
    return 0
