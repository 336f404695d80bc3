"""Near-duplicate removal: the clustered search gives exactly the brute-force greedy pass, whatever
the clustering and the block size."""
from __future__ import annotations

import numpy as np
import pytest

from app.sampling.near_duplicates import find_near_duplicates


def brute_force(embeddings: np.ndarray, threshold: float) -> list:
    """The definition: in input order, drop a point when its nearest kept earlier point (the lowest
    index among equally near ones) lies closer than the threshold."""
    points = np.asarray(embeddings, dtype=np.float32).astype(np.float64)
    kept, removed = [], []
    for i, point in enumerate(points):
        if kept:
            distances = np.linalg.norm(points[kept] - point, axis=1)
            nearest = int(np.argmin(distances))
            if distances[nearest] < threshold:
                removed.append((i, kept[nearest], float(distances[nearest])))
                continue
        kept.append(i)
    return removed


def assert_same(found: list, expected: list) -> None:
    assert [r[:2] for r in found] == [r[:2] for r in expected]
    np.testing.assert_allclose([r[2] for r in found], [r[2] for r in expected], rtol=0, atol=1e-12)


def clustered_with_copies(n: int, dim: int, seed: int) -> np.ndarray:
    """Blobs, with exact copies and near copies (of earlier and of later points) mixed in."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(8, dim)) * 2
    points = centres[rng.integers(0, 8, n)] + rng.normal(scale=0.4, size=(n, dim))
    copies = rng.choice(n, n // 5, replace=False)
    sources = rng.integers(0, n, len(copies))
    exact = rng.random((len(copies), 1)) < 0.5
    points[copies] = points[sources] + rng.normal(scale=0.02, size=(len(copies), dim)) * ~exact
    return points.astype(np.float32)


@pytest.mark.parametrize("n_clusters", [1, 3, 17])
@pytest.mark.parametrize("block", [1, 64, 1000])
def test_random_data_equals_brute_force(n_clusters, block):
    points = np.random.default_rng(0).normal(size=(301, 6)).astype(np.float32)  # 301: no whole number of blocks
    expected = brute_force(points, 1.2)
    assert 0 < len(expected) < 300
    assert_same(find_near_duplicates(points, 1.2, block=block, n_clusters=n_clusters), expected)


@pytest.mark.parametrize("threshold", [0.01, 0.1, 0.5, 2.0])
@pytest.mark.parametrize("n_clusters", [1, 12, 40])
def test_clustered_data_with_exact_and_near_copies_equals_brute_force(threshold, n_clusters):
    points = clustered_with_copies(700, 16, seed=1)
    expected = brute_force(points, threshold)
    assert_same(find_near_duplicates(points, threshold, block=97, n_clusters=n_clusters), expected)


def test_normalised_embeddings_equal_brute_force():
    points = clustered_with_copies(600, 32, seed=2)
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    for threshold in (0.005, 0.05, 0.3):
        expected = brute_force(points, threshold)
        assert_same(find_near_duplicates(points, threshold, block=128, n_clusters=24), expected)


def test_a_threshold_beyond_the_spread_leaves_one_point():
    points = clustered_with_copies(250, 5, seed=3)
    found = find_near_duplicates(points, 1e6, block=40, n_clusters=9)
    assert [i for i, _, _ in found] == list(range(1, 250)) and {j for _, j, _ in found} == {0}
    assert_same(found, brute_force(points, 1e6))


def test_ties_go_to_the_lowest_index_and_d_equal_1_works():
    # On a line: 0 and 2 are kept (2 apart); 1 lies exactly 1 from both, so it duplicates 0.
    points = np.array([[0.0], [2.0], [1.0], [1.0], [3.0], [5.0], [4.0]], dtype=np.float32)
    expected = brute_force(points, 1.5)
    assert expected[0] == (2, 0, 1.0) and expected[1] == (3, 0, 1.0)
    for n_clusters in (1, 2, 3, 7):
        for block in (1, 2, 3, 10):
            assert_same(find_near_duplicates(points, 1.5, block=block, n_clusters=n_clusters), expected)

    line = np.random.default_rng(4).integers(0, 200, size=(500, 1)).astype(np.float32)  # many exact ties
    for threshold in (0.5, 1.0, 3.0, 10.0):
        assert_same(find_near_duplicates(line, threshold, block=64, n_clusters=11), brute_force(line, threshold))


def test_kept_points_are_at_least_the_threshold_apart_and_each_removed_one_has_a_kept_match():
    points = clustered_with_copies(800, 8, seed=5)
    threshold = 0.7
    found = find_near_duplicates(points, threshold, block=128, n_clusters=20)
    removed = {i for i, _, _ in found}
    kept = np.array([i for i in range(len(points)) if i not in removed])
    wide = points.astype(np.float64)
    between = np.linalg.norm(wide[kept, None] - wide[None, kept], axis=2)
    np.fill_diagonal(between, np.inf)
    assert between.min() >= threshold
    for i, j, distance in found:
        assert j < i and j not in removed and distance < threshold
        assert np.linalg.norm(wide[i] - wide[j]) == pytest.approx(distance, abs=1e-12)


def test_nothing_to_remove():
    assert find_near_duplicates(np.zeros((0, 4), dtype=np.float32), 0.5) == []
    assert find_near_duplicates(np.eye(5, dtype=np.float32), 0.5) == []
