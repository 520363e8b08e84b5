"""Sub-commands ``heads`` (train and compare heads on a run) and ``predict``."""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import tomllib

from embeddings.errors import InputError

from .config import HeadsConfig, load_toml, stage_config
from .options import add_options, common_options, overrides

HEADS_MEMORY = "train fewer heads or inputs at once (--heads, --inputs)"


def register(sub: Any) -> None:
    p = sub.add_parser("heads", help="train and compare classification heads on a run",
                       description="Train the heads and fusions of the [heads] config section "
                       "on RUN/embed, print one comparison table and write RUN/heads "
                       "(comparison.csv/.json/.png, confusion.png, models/).")
    common_options(p)
    add_options(p, HeadsConfig)
    p.add_argument("--param", action="append", default=[], metavar="HEAD.KEY=VALUE",
                   help="a head parameter, over [heads.params.HEAD] (repeatable; VALUE as "
                   "in TOML, lists also as 128,64), e.g. --param mlp.hidden=[128,64]")
    p.add_argument("--list-params", nargs="?", const="", metavar="HEAD",
                   help="print the parameters of every head (or of HEAD) and exit")
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
    if args.list_params is not None:
        print(list_params(args.list_params))
        return 0

    from .heads import run_heads

    cfg = stage_config(HeadsConfig, "heads", load_toml(args.config), args.run,
                       **overrides(args, HeadsConfig))
    if args.param:
        cfg = replace(cfg, params=cli_params(args.param, cfg.params))
    r = run_heads(cfg)
    print(r.table)
    for note in r.notes:
        print(f"note: {note}")
    print(f"best by {r.metric}: {r.best.head} [{r.best.inputs}] "
          f"{getattr(r.best, r.metric):.3f} on the {r.best.eval_split} split")
    print(f"heads: {len(r.rows)} rows in {r.seconds:.1f} s; wrote {r.run_dir}/heads "
          f"(comparison.csv/.json/.png, confusion.png, models/)")
    return 0


def cli_params(items: list[str], base: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``--param HEAD.KEY=VALUE`` items over the config's ``[heads.params]`` (checked
    later, with the TOML's, against each head's declared parameters)."""
    out = {h: dict(v) for h, v in base.items()}
    for item in items:
        key, sep, text = item.partition("=")
        head, dot, name = key.strip().partition(".")
        if not sep or not dot or not head or not name:
            raise InputError(f"--param {item!r}: write HEAD.KEY=VALUE, e.g. "
                             f"--param mlp.hidden=[128,64]")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word: a string (solver=sklearn) or a list (128,64)
        out.setdefault(head, {})[name.strip()] = value
    return out


def list_params(name: str = "") -> str:
    """Every head's parameters (type, default, help), or one head's."""
    from embeddings.heads import HEADS, describe, head_type

    names = [head_type(name).name] if name else list(HEADS)
    lines = []
    for n in names:
        lines.append(f"[heads.params.{n}]  {HEADS[n].doc}")
        for key, kind, default, help_text in describe(HEADS[n].defaults):
            lines.append(f"  {key} = {default!r}  ({kind}) {help_text}")
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    run = stage_config(HeadsConfig, "heads", load_toml(args.config), args.run).run
    r = run_predict(args.head, run, args.output)
    extra = f" ({r.dropped} image(s) without captions left out)" if r.dropped else ""
    labels = f"; labels file sha256 {r.labels_sha256[:12]}" if r.labels_sha256 else ""
    print(f"predict: {r.rows} rows -> {r.path}{extra}{labels}")
    return 0
