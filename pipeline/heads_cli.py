"""Sub-commands ``heads`` (train and compare heads on a run) and ``predict``."""

from __future__ import annotations

import argparse
from typing import Any

from .config import DEFAULT_CONFIG, load_toml
from .heads import heads_config, run_heads, run_predict


def _names(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def register(sub: Any) -> None:
    p = sub.add_parser("heads", help="train and compare classification heads on a run",
                       description="Train the heads and fusions of the [heads] config section "
                       "on RUN/embed, print one comparison table and write RUN/heads "
                       "(comparison.csv/.json/.png, confusion.png, models/).")
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML config (default: %(default)s)")
    p.add_argument("--run", help="run directory (default: the config's `out`)")
    p.add_argument("--heads", help="comma-separated heads, e.g. logistic,concat,late")
    p.add_argument("--inputs", help="comma-separated embedding columns, e.g. "
                   "clip_image,minilm_text")
    p.add_argument("--label", help="single-label target column (default: label)")
    p.add_argument("--metric", choices=("accuracy", "macro_f1"))
    p.add_argument("--seed", type=int)
    p.set_defaults(func=_heads)

    q = sub.add_parser("predict", help="apply a saved head to a run's shards",
                       description="Predict with a saved head (RUN/heads/models/NAME.json) on "
                       "the shards of a run; writes id, label(s) and probabilities as Parquet. "
                       "Shards made by another model are refused.")
    q.add_argument("--head", required=True, help="saved head (.json)")
    q.add_argument("--run", required=True, help="run directory with embed shards")
    q.add_argument("--out", help="Parquet file (default: RUN/heads/predictions/NAME.parquet)")
    q.set_defaults(func=_predict)


def _heads(args: argparse.Namespace) -> int:
    cfg = heads_config(load_toml(args.config), run=args.run, heads=_names(args.heads),
                       inputs=_names(args.inputs), label=args.label, metric=args.metric,
                       seed=args.seed)
    r = run_heads(cfg)
    print(r.table)
    for note in r.notes:
        print(f"note: {note}")
    print(f"best by {cfg.metric}: {r.best['head']} [{r.best['inputs']}] "
          f"{r.best[cfg.metric]:.3f} on the {r.best['eval_split']} split")
    print(f"heads: {len(r.rows)} rows in {r.seconds:.1f} s; wrote {r.run_dir}/heads "
          f"(comparison.csv/.json/.png, confusion.png, models/)")
    return 0


def _predict(args: argparse.Namespace) -> int:
    r = run_predict(args.head, args.run, args.out)
    extra = f" ({r.dropped} image(s) without captions left out)" if r.dropped else ""
    print(f"predict: {r.rows} rows -> {r.path}{extra}")
    return 0
