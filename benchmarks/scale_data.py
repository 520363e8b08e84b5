"""Synthetic data for ``bench_scale``: clustered unit vectors written through the store.

Vectors are a mixture of Gaussians on the sphere (a random center plus noise of norm
``spread``), seeded and generated shard by shard, so any N fits in memory.  Each row gets a
label from its cluster (``l0`` .. ``l99``: about 1% of the rows each), a 1-in-2,000 ``rare``
label, and a train / val / test split (70/15/15).  The columns carry the provenance of a
random open_clip model with 512-d embeddings (written on first use), so ``search`` embeds
text queries with a real encoder, as on an embedded run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from embeddings.encoders import EncoderSpec, load_encoder, write_tiny_open_clip
from embeddings.store import Provenance, Run
from embeddings.store.imported import VectorShard, write_vectors_run

RARE_EVERY = 2_000
MODEL_CFG = {"embed_dim": 512,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                            "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2,
                          "layers": 2}}


def encoder(models: Path) -> tuple[str, Provenance]:
    """The ``local-dir:`` model string and provenance of the benchmark's 512-d model."""
    folder = models / "scale-clip-512"
    if not (folder / "open_clip_config.json").is_file():
        write_tiny_open_clip(folder, seed=0, model_cfg=MODEL_CFG)
    model = f"local-dir:{folder}"
    return model, load_encoder(EncoderSpec("clip", "open_clip", model)).provenance()


def centers(clusters: int, d: int) -> np.ndarray:
    c = np.random.default_rng(1234).standard_normal((clusters, d)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def vectors(n: int, d: int, seed: int, clusters: int = 256,
            spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit vectors (float32) and their cluster numbers."""
    rng = np.random.default_rng(seed)
    which = rng.integers(0, clusters, n)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x *= spread / np.sqrt(d)
    x += centers(clusters, d)[which]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, which


def shards(n: int, d: int, shard_rows: int, first_row: int, seed: int, clusters: int,
           spread: float, captions: bool) -> Iterator[VectorShard]:
    for s, start in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - start)
        x, which = vectors(m, d, seed * 100_003 + s, clusters, spread)
        rows = np.arange(first_row + start, first_row + start + m)
        label = [f"l{c % 100}" for c in which]
        for i in np.flatnonzero(rows % RARE_EVERY == 7):
            label[i] = "rare"
        split = np.where(rows % 20 < 14, "train", np.where(rows % 20 < 17, "val", "test"))
        ids = [f"r{r}" for r in rows]
        shard = VectorShard(ids=ids, vectors={"clip_image": x}, split=split.tolist(),
                            label=label, labels=[[lb] for lb in label],
                            captions=[[f"row {r} of cluster {c}"] for r, c in zip(rows, which)])
        if captions:  # a caption vector near its image's (the same cluster, more noise)
            t, _ = vectors(m, d, seed * 100_003 + s + 50_000_017, clusters, spread)
            t = x + 0.5 * t
            shard.caption_vectors = {"clip_text": t / np.linalg.norm(t, axis=1, keepdims=True)}
        yield shard


def write(run: Path, n: int, prov: Provenance, shard_rows: int = 100_000, seed: int = 0,
          clusters: int = 256, spread: float = 1.0, captions: bool = False,
          append: bool = False) -> Run:
    """Write (or append) ``n`` rows; ``seed`` must differ between appended parts."""
    first = Run(run).embed.manifest().rows("images") if append else 0
    columns: dict[str, int | Provenance] = {"clip_image": prov}
    if captions:
        columns["clip_text"] = prov
    return write_vectors_run(run, columns, shards(n, prov.dim, shard_rows, first, seed,
                                                  clusters, spread, captions), append=append)


def held_out(n: int, d: int, clusters: int = 256, spread: float = 1.0) -> np.ndarray:
    """Queries from the same mixture, not in the run (another seed)."""
    return vectors(n, d, 987_654_321, clusters, spread)[0]
