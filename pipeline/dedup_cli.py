"""Sub-command ``dedup``: duplicate groups of a run's images, a keep-list, a contact sheet."""

from __future__ import annotations

import argparse
from typing import Any

from .config import DedupConfig, load_toml, stage_config
from .options import add_options, common_options, overrides


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dedup", help="find duplicate and near-duplicate images (and train/test leaks)",
        description="Group the image rows of RUN/embed that are copies of each other: equal "
        "content digests and perceptual hashes within a few bits (recorded at embed time), "
        "and embeddings at cosine >= a threshold, with neighbours from the run's index "
        "(k-NN graph), exactly within its IVF lists, or by exact search on small runs. "
        "Writes RUN/dedup: groups.parquet (group, row, id, representative, similarity to "
        "it, split), keep.parquet (one row per group plus every row without copies), "
        "sheet.png (the largest groups) and summary.json; prints the summary, with the "
        "val/test rows that have a copy in train.",
        epilog="examples: python -m pipeline dedup --config configs/offline.toml\n"
        "          python -m pipeline dedup --run runs/big --threshold 0.97 --method clusters\n"
        "          python -m pipeline dedup --by digest,phash --keep split,resolution",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(p)
    add_options(p, DedupConfig)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_dedup)


def _dedup(args: argparse.Namespace) -> int:
    import json

    from .dedup import run_dedup

    cfg = stage_config(DedupConfig, "dedup", load_toml(args.config), args.run,
                       **overrides(args, DedupConfig))
    result = run_dedup(cfg)
    s = result.summary
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(format_summary(s))
    print(f"dedup: {result.seconds:.1f} s; wrote {result.run_dir}/dedup "
          f"({', '.join(f['file'] for f in s['files'].values())}, summary.json)")
    return 0


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a Markdown table (what the README shows)."""
    rows = [("image rows", s["rows"]), ("duplicate groups (2+ images)", s["groups"]),
            ("images in groups", s["rows_in_groups"]),
            ("images the keep-list drops", s["removable"]), ("largest group", s["largest"])]
    if "cross_split_groups" in s:
        rows.append(("groups spanning splits", s["cross_split_groups"]))
        rows += [(f"{split} images with a copy in train", n)
                 for split, n in s.get("leaks", {}).items() if split]
    lines = ["signals: " + "; ".join(s["signals"].values()), "", "| | |", "|---|---:|"]
    lines += [f"| {name} | {value:,} |" for name, value in rows]
    sizes = ", ".join(f"{size}: {count:,}" for size, count in s["sizes"].items())
    lines += ["", f"group sizes (size: groups): {sizes or 'none'}"]
    return "\n".join(lines + [f"note: {n}" for n in s.get("notes", [])])
