"""Ties at rank k count as hits, in eval-retrieval (exact and through an index) and in
the index stage's recall@10, whatever the row order: duplicate captions and duplicate
images give exactly equal scores."""

from __future__ import annotations

import faiss
import numpy as np

from embeddings import index as ix
from pipeline.evaluate import exact_ranks, first_right_rank, recalls


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def duplicated_gallery(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8 images, each stored twice (duplicate images: rows i and i + 8 are equal), and
    one caption per row with duplicate captions (caption i + 8 is caption i's text)."""
    rng = np.random.default_rng(seed)
    images = unit(rng.standard_normal((8, 16)))
    gallery = np.vstack([images, images])
    captions = unit(images + 0.3 * rng.standard_normal((8, 16)))
    return gallery, np.vstack([captions, captions]), np.arange(16)


def test_duplicate_images_tie_and_both_count_as_rank_one() -> None:
    gallery, captions, right = duplicated_gallery()
    ranks = exact_ranks(captions, gallery, right)
    # Caption i's right image ties with its duplicate: with any order of the two, the
    # right one is "first" (rank 0) whenever the pair is the best match.
    best = (captions @ gallery.T).argmax(1) % 8 == right % 8
    assert (ranks[best] == 0).all()
    order = np.random.default_rng(1).permutation(16)  # row order does not matter
    where = np.argsort(order)
    np.testing.assert_array_equal(exact_ranks(captions, gallery[order], where[right]), ranks)


def test_a_tie_at_rank_k_is_a_hit() -> None:
    # Scores 0.9, 0.8, 0.7 then two rows tied at 0.5 (one right), then 0.1.
    q = np.array([[1.0, 0.0]], np.float32)
    cos = np.array([0.9, 0.8, 0.7, 0.5, 0.5, 0.1])
    gallery = np.stack([cos, np.sqrt(1 - cos**2)], 1).astype(np.float32)
    for right in (3, 4):  # the right row listed before or after its tie
        rank = exact_ranks(q, gallery, np.array([right]))
        assert rank.tolist() == [3]
        assert recalls(rank, (3, 4)) == {"R@3": 0.0, "R@4": 1.0}


def test_image_to_text_with_duplicate_captions_through_a_flat_index() -> None:
    gallery, captions, _ = duplicated_gallery(2)
    # Image i's right captions are rows i and i + 8 (the same text twice).
    right = [np.array([i % 8, i % 8 + 8]) for i in range(16)]
    exact = exact_ranks(gallery, captions, right)
    index = faiss.IndexFlatIP(16)
    index.add(captions)
    scores, hits = index.search(gallery, 5 + 10)  # k + TIE_FETCH, as evaluate does
    via_index = first_right_rank(hits, [set(r.tolist()) for r in right], scores)
    np.testing.assert_array_equal(via_index, exact)
    # Duplicate images ask the same question: the same answer for both copies.
    np.testing.assert_array_equal(exact[:8], exact[8:])


def test_index_recall_counts_ties() -> None:
    rng = np.random.default_rng(0)
    base = unit(rng.standard_normal((200, 32)))
    vectors = np.vstack([base, base, base[:50]])  # many exact duplicates
    index = ix.build_index(vectors, "Flat")
    _, recall, _ = ix.measure(index, vectors, k=10, n_queries=100, seed=0)
    assert recall == 1.0  # exact search is exact: ties are not misses
    scores, truth = ix.exact_knn(vectors, vectors[:100], 10)
    _, found = index.search(vectors[:100], 10)
    for row in found:  # swap rows for a duplicate not listed yet (an equally right answer)
        for j, i in enumerate(row):
            twin = (i + 200) % 400
            if twin not in row:
                row[j] = twin
    assert ix.recall_at_k(found, truth) < 1.0  # by ids alone, duplicates look wrong
    assert ix.tie_recall(found, scores, truth, vectors, vectors[:100]) == 1.0
