"""Duplicate and near-duplicate groups over a run's rows, from fingerprints or vectors.

Library only (arrays in, arrays out; no run directory, no FAISS import): a stage feeds it
content digests, perceptual hashes (:mod:`embeddings.fingerprint`), neighbour batches from
an index, or cluster assignments, and writes what :func:`group_report`,
:func:`representatives` and :func:`contact_sheet` return through the store.

    uf = exact_groups(digests)                              # byte-identical files
    hash_groups(phashes, max_distance=8, uf=uf)             # same picture, re-encoded
    knn_groups(n, index_batches, threshold=0.95, uf=uf)     # a k-NN graph, any source
    labels = uf.labels()                                    # each row's smallest row
    rep = representatives(labels, ["split", "resolution"], pixels=wh, split=split)
    report = group_report(labels, rep, vector_similarity(vectors), ids=ids, split=split)
"""

from .components import UnionFind, connected_components, dense_groups, group_sizes
from .hashes import exact_groups, hash_groups, lsh_plan, verified_pairs
from .keep import RULES, SPLIT_ORDER, keep_mask, representatives
from .neighbours import Batch, cluster_groups, exact_neighbours, knn_edges, knn_groups
from .report import (
    REPORT_SCHEMA,
    GroupReport,
    group_report,
    hash_similarity_of,
    leaks,
    summary,
    vector_similarity,
)
from .sheet import contact_sheet, to_png

__all__ = ["REPORT_SCHEMA", "RULES", "SPLIT_ORDER", "Batch", "GroupReport", "UnionFind",
           "cluster_groups", "connected_components", "contact_sheet", "dense_groups",
           "exact_groups", "exact_neighbours", "group_report", "group_sizes", "hash_groups",
           "hash_similarity_of", "keep_mask", "knn_edges", "knn_groups", "leaks", "lsh_plan",
           "representatives", "summary", "to_png", "vector_similarity", "verified_pairs"]
