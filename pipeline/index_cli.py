"""Sub-commands ``index``, ``search`` and ``eval-retrieval``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import DEFAULT_CONFIG, load_toml
from .evaluate import format_report, run_retrieval_eval
from .index import index_config, run_index
from .search import format_table, search


def register(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="build FAISS indexes over a run's embeddings (incremental)",
        description="Build one FAISS index per embedding column of RUN/embed into RUN/index. "
        "The index type is chosen from the number of vectors, their dimension and the memory "
        "budget (exact Flat while small, else HNSW or IVF, with SQ8 or PQ codes when memory "
        "demands), search parameters are tuned to the target recall, and recall@10 against "
        "exact search is measured and recorded. A rerun after the embed stage gained shards "
        "adds only the new rows; vectors of a different model are refused.",
        epilog="example: python -m pipeline index --config configs/offline.toml "
        "--factory IVF256,Flat")
    _common(p)
    p.add_argument("--column", action="append", dest="columns", metavar="COLUMN",
                   help="embedding column to index (repeatable; default: all)")
    p.add_argument("--factory", help="force a FAISS factory string, e.g. Flat, HNSW32, "
                   "IVF1024,Flat, OPQ64,IVF1024,PQ64")
    p.add_argument("--memory-budget", type=float, dest="memory_budget_gb", metavar="GB",
                   help="memory budget per index in GiB (default: config, 4)")
    p.add_argument("--target-recall", type=float, help="recall@10 the search parameters "
                   "are tuned to (default: config, 0.95)")
    p.add_argument("--rebuild", action="store_true", default=None,
                   help="rebuild from scratch instead of adding new shards")
    p.add_argument("--device", help="auto, cpu or cuda (GPU needs a GPU build of FAISS)")
    p.set_defaults(func=_index)

    s = sub.add_parser(
        "search", help="nearest neighbours of a text or an image",
        description="Embed a text (or --image) with exactly the model recorded for the "
        "indexed column and print the nearest rows: rank, cosine score, id, caption, image "
        "path, label. Text->image by default; --modality text returns captions.",
        epilog='examples: python -m pipeline search "a red bicycle" --k 5\n'
        "          python -m pipeline search --image cat.png --modality text --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(s)
    s.add_argument("query", nargs="?", help="query text (or use --image)")
    s.add_argument("--image", help="query image file (image->image, or image->text with "
                   "--modality text)")
    s.add_argument("--modality", choices=("image", "text"), default="image",
                   help="what to return: image rows or caption rows (default: %(default)s)")
    s.add_argument("--column", help="index to search, e.g. clip_image, clip_text, "
                   "minilm_text (default: picked from --modality and the query)")
    s.add_argument("--k", type=int, default=10, help="number of hits (default: %(default)s)")
    s.add_argument("--split", help="only rows of this split (train, val, test, ...)")
    s.add_argument("--label", help="only rows with this label")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--device", default="auto", help="device for the query encoder")
    s.add_argument("--no-mmap", action="store_true", help="read the index into memory "
                   "instead of memory-mapping it")
    s.set_defaults(func=_search)

    e = sub.add_parser(
        "eval-retrieval", help="text->image / image->text recall@1/5/10",
        description="Multi-caption retrieval protocol (Karpathy splits): each caption is a "
        "text->image query with one right image; each image an image->text query, right when "
        "any of its captions is retrieved. Computed through the indexes and exactly; writes "
        "RUN/eval/retrieval.json and retrieval.md. Needs an encoder with image and text "
        "columns (CLIP).")
    _common(e)
    e.add_argument("--split", help="evaluate only this split (e.g. test); default: all rows")
    e.add_argument("--encoder", action="append", dest="encoders",
                   help="encoder name (repeatable; default: every image+text encoder)")
    e.add_argument("--exact-only", action="store_true", help="skip the index (no index needed)")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_eval)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG),
                   help="TOML config; its `out` is the run (default: %(default)s)")
    p.add_argument("--run", "--out", dest="run", help="run directory (default: config's out)")


def _run_dir(args: argparse.Namespace) -> str:
    return args.run or load_toml(args.config).get("out", "runs/demo")


def _index(args: argparse.Namespace) -> int:
    cfg = index_config(load_toml(args.config), run=args.run, columns=args.columns,
                       factory=args.factory, memory_budget_gb=args.memory_budget_gb,
                       target_recall=args.target_recall, rebuild=args.rebuild,
                       device=args.device)
    for r in run_index(cfg):
        extra = f" ({r.note})" if r.note else ""
        print(f"index {r.column}: {r.action}{extra}, {r.ntotal} vectors, {r.factory}, "
              f"recall@10 {r.recall:.3f}, {r.seconds:.2f} s")
    print(f"manifest: {cfg.run}/index/manifest.json")
    return 0


def _search(args: argparse.Namespace) -> int:
    if args.query is not None and args.image is not None:
        raise ValueError("give either a query text or --image, not both")
    result = search(_run_dir(args), text=args.query, image=args.image,
                    modality=args.modality, column=args.column, k=args.k, split=args.split,
                    label=args.label, device=args.device, mmap=not args.no_mmap)
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if args.json
          else format_table(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    report = run_retrieval_eval(_run_dir(args), split=args.split, encoders=args.encoders,
                                use_index=not args.exact_only)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
