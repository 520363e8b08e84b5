"""Sub-commands ``heads`` (train and compare heads on a run) and ``predict``."""

from __future__ import annotations

import argparse
from typing import Any

from .config import HeadsConfig, add_options, load_toml, overrides, stage_config
from .options import common_options

HEADS_MEMORY = "train fewer heads or inputs at once (--heads, --inputs)"


def register(sub: Any) -> None:
    p = sub.add_parser("heads", help="train and compare classification heads on a run",
                       description="Train the heads and fusions of the [heads] config section "
                       "on RUN/embed, print one comparison table and write RUN/heads "
                       "(comparison.csv/.json/.png, confusion.png, models/).")
    common_options(p)
    add_options(p, HeadsConfig)
    p.set_defaults(func=_heads, memory_hint=HEADS_MEMORY)

    q = sub.add_parser("predict", help="apply a saved head to a run's shards",
                       description="Predict with a saved head (RUN/heads/models/NAME.json) on "
                       "the shards of a run; writes id, label(s) and probabilities as Parquet. "
                       "Shards made by another model are refused.")
    common_options(q)
    q.add_argument("--head", required=True, help="saved head (.json)")
    q.add_argument("--output", help="Parquet file (default: RUN/heads/predictions/NAME.parquet)")
    q.set_defaults(func=_predict, memory_hint="predict on a smaller run")


def _heads(args: argparse.Namespace) -> int:
    from .heads import run_heads

    cfg = stage_config(HeadsConfig, "heads", load_toml(args.config), args.run,
                       **overrides(args, HeadsConfig))
    r = run_heads(cfg)
    print(r.table)
    for note in r.notes:
        print(f"note: {note}")
    print(f"best by {cfg.metric}: {r.best.head} [{r.best.inputs}] "
          f"{getattr(r.best, cfg.metric):.3f} on the {r.best.eval_split} split")
    print(f"heads: {len(r.rows)} rows in {r.seconds:.1f} s; wrote {r.run_dir}/heads "
          f"(comparison.csv/.json/.png, confusion.png, models/)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    run = stage_config(HeadsConfig, "heads", load_toml(args.config), args.run).run
    r = run_predict(args.head, run, args.output)
    extra = f" ({r.dropped} image(s) without captions left out)" if r.dropped else ""
    print(f"predict: {r.rows} rows -> {r.path}{extra}")
    return 0
