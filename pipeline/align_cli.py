"""Sub-command ``align``: train an adapter from one embedding column into another."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import AlignConfig, load_toml, stage_config
from .options import add_options, common_options, overrides


def register(sub: Any) -> None:
    p = sub.add_parser(
        "align", help="train an adapter from one embedding column into another",
        description="Learn a map from the SOURCE column's space into the TARGET column's "
        "over the pairs of a run (same caption, or a caption and its image): ridge in "
        "closed form, or two_layer (ridge plus a GELU branch trained with MSE and a "
        "batch-similarity term). Prints validation MSE and cosine against the zero, mean "
        "and identity baselines and saves RUN/align/NAME.json, bound to both columns' "
        "models. Rows of the held-out splits are never used.",
        epilog="example: python -m pipeline align --config configs/multilingual.toml "
        "--source use_text --target minilm_text")
    common_options(p)
    add_options(p, AlignConfig)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_align)


def _align(args: argparse.Namespace) -> int:
    from .align import format_result, run_align  # numpy-only, but keeps --help lean

    cfg = stage_config(AlignConfig, "align", load_toml(args.config), args.run,
                       **overrides(args, AlignConfig))
    r = run_align(cfg)
    if args.json:
        print(json.dumps({k: v for k, v in vars(r).items() if k != "info"}, indent=2))
    else:
        print(format_result(r))
    return 0
