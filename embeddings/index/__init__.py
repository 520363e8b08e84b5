"""FAISS behind one seam: which index (policy), how to build it (a registry of builders:
in memory, out of core, on Ray), its files (in memory, or on-disk inverted lists), search
(filtered search that is right first, exact k-NN, neighbour batches) and recall.

No stage imports FAISS: they call this package.  Importing it costs no FAISS either (the
policy is plain Python; everything else loads on first use), so ``--help`` stays fast.

    from embeddings import index as ix
    choice = ix.choose_index(n, d, budget)           # policy: factory, on disk or not
    ix.search_filtered(index, queries, 10, allowed)  # k hits whenever k rows match
"""

from __future__ import annotations

import importlib
from typing import Any

from .choice import (
    FLAT_MAX,
    HNSW_MAX,
    BuildPlan,
    IndexChoice,
    choose_index,
    ivf_lists,
    plan_build,
    train_size,
)

_LAZY = {
    "core": ("add_vectors", "check_factory", "describe", "deserialize", "empty_like",
             "index_bytes", "ivf_of", "list_ids", "list_sizes", "load_index", "release_pages",
             "save_index", "search_params", "serialize", "set_search_params", "set_threads",
             "to_gpu", "train_index", "use_gpu", "write_index", "gpu_supported",
             "open_for_add", "faiss_version"),
    "query": ("Allowed", "assignments", "exact_knn", "exact_scores", "exact_search", "merge_topk",
               "neighbours", "search", "search_filtered"),
    "recall": ("TIE_EPS", "Truth", "evaluate", "recall_at_k", "tie_recall", "truth_in_memory",
                "tune", "tune_to"),
    "memory": ("Measured", "build_and_measure", "build_index", "measure", "train_rows"),
    "builders": ("BUILDERS", "BuildJob", "Built", "VectorSource", "add_to", "in_memory",
                 "register_builder", "write_built"),
    "ondisk": ("ondisk_lists",),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["FLAT_MAX", "HNSW_MAX", "BuildPlan", "IndexChoice", "choose_index", "ivf_lists",
           "plan_build", "train_size", *_WHERE]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
