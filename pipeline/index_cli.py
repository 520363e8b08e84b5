"""Sub-commands ``index``, ``search``, ``eval-retrieval`` and ``verify``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from embeddings.errors import FormatError, InputError

from .config import EvalConfig, IndexConfig, SearchConfig, load_toml, stage_config
from .options import add_options, common_options, overrides

INDEX_MEMORY = ("lower --memory-budget (compressed codes: IVF...,SQ8 or PQ) or index fewer "
                "--columns at once")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "index", help="build FAISS indexes over a run's embeddings (incremental)",
        description="Build one FAISS index per embedding column of RUN/embed into RUN/index, "
        "streaming the shards. The index type is chosen from the number of vectors, their "
        "dimension and the memory budget, which bounds the whole build (exact Flat while "
        "small, else HNSW or IVF, with SQ8 codes, and inverted lists on disk, memory-mapped, "
        "when they do not fit); search parameters are tuned to the target recall, and "
        "recall@10 against exact search is measured and recorded. A rerun after the embed "
        "stage gained shards reads only the new shards; vectors of a different model are "
        "refused. --engine ray adds the vectors on Ray tasks.",
        epilog="examples: python -m pipeline index --config configs/offline.toml "
        "--factory IVF256,Flat\n"
        "          python -m pipeline index --run runs/big --memory-budget 4 --engine ray",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(p)
    add_options(p, IndexConfig)
    p.set_defaults(func=_index, memory_hint=INDEX_MEMORY)

    s = sub.add_parser(
        "search", help="nearest neighbours of a text or an image",
        description="Embed a text (or --image) with exactly the model recorded for the "
        "indexed column and print the nearest rows: rank, cosine score, id, caption, image "
        "path, label. Text->image by default; --modality text returns captions.",
        epilog='examples: python -m pipeline search "a red bicycle" --k 5\n'
        "          python -m pipeline search --image cat.png --modality text --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    common_options(s)
    s.add_argument("query", nargs="?", help="query text (or use --image)")
    s.add_argument("--image", help="query image file (image->image, or image->text with "
                   "--modality text)")
    s.add_argument("--id", dest="row_id", help="query by a stored row: the vector of the "
                   "image (or caption) with this id in the searched column (the query a "
                   "latent column answers)")
    s.add_argument("--split", help="only rows of this split (train, val, test, ...)")
    s.add_argument("--label", help="only rows with this label")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_options(s, SearchConfig)
    s.set_defaults(func=_search, memory_hint="search with --mmap (the default), not --no-mmap")

    e = sub.add_parser(
        "eval-retrieval", help="text->image / image->text recall@1/5/10",
        description="Multi-caption retrieval protocol (Karpathy splits): each caption is a "
        "text->image query with one right image; each image an image->text query, right when "
        "any of its captions is retrieved. Computed through the indexes and exactly; writes "
        "RUN/eval/retrieval.json and retrieval.md. Needs an encoder with image and text "
        "columns (CLIP).")
    common_options(e)
    add_options(e, EvalConfig)
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    e.set_defaults(func=_eval, memory_hint="evaluate one --split at a time")

    v = sub.add_parser("verify", help="check every file of a run against its checksums",
                       description="Check the shards, indexes and saved heads of a run "
                       "against the sizes and digests their manifests record, every manifest "
                       "and head description against its own digest and this machine's seal, "
                       "and that nothing in the run is a link; list every bad or missing "
                       "file, the files killed runs left behind and whether the run was "
                       "sealed here. Exit 0 when all are sound, 2 otherwise (also when there "
                       "is no run).")
    common_options(v)
    v.set_defaults(func=_verify)


def _index(args: argparse.Namespace) -> int:
    from .index import run_index

    cfg = stage_config(IndexConfig, "index", load_toml(args.config), args.run,
                       **overrides(args, IndexConfig))
    for r in run_index(cfg):
        extra = f" ({r.note})" if r.note else ""
        print(f"index {r.column}: {r.action}{extra}, {r.ntotal} vectors, {r.factory}, "
              f"recall@10 {r.recall:.3f}, {r.seconds:.2f} s")
    print(f"manifest: {cfg.run}/index/manifest.json")
    return 0


def _search(args: argparse.Namespace) -> int:
    if sum(q is not None for q in (args.query, args.image, args.row_id)) > 1:
        raise InputError("give one query: a text, --image or --id, not both")
    from .search import format_table, search

    cfg = stage_config(SearchConfig, "search", load_toml(args.config), args.run,
                       **overrides(args, SearchConfig))
    if cfg.hybrid:
        from .hybrid import hybrid_search

        if args.row_id is not None:
            raise InputError("search --hybrid takes a text or an image query, not --id")
        result = hybrid_search(cfg, args.query, args.image, args.split, args.label)
    else:
        result = search(cfg.run, text=args.query, image=args.image, modality=cfg.modality,
                        column=cfg.column, k=cfg.k, split=args.split, label=args.label,
                        device=cfg.device, mmap=cfg.mmap, verify=cfg.verify, via=cfg.via,
                        row_id=args.row_id)
    print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False) if args.json
          else format_table(result))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import format_report, run_retrieval_eval

    cfg = stage_config(EvalConfig, "eval", load_toml(args.config), args.run,
                       **overrides(args, EvalConfig))
    report = run_retrieval_eval(cfg.run, split=cfg.split, encoders=cfg.encoders or None,
                                use_index=not cfg.exact_only,
                                exclude_leaks=cfg.exclude_leaks, via=cfg.via,
                                hybrid=cfg.hybrid, hybrid_sources=cfg.hybrid_sources,
                                hybrid_split=cfg.hybrid_split)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from embeddings.store import Run

    run = stage_config(EvalConfig, "eval", load_toml(args.config), args.run).run
    report = Run(run).report()
    for p in report.problems:
        print(f"bad: {p}")
    for path in report.leftovers:
        print(f"leftover: {path} (no manifest names it: the stage's next run removes it)")
    for note in report.notes:
        print(f"note: {note}")
    if report.problems:
        raise FormatError(f"{len(report.problems)} bad or missing file(s) in {run}")
    print(f"verify: every recorded file of {run} is sound")
    return 0
