"""Selection: greedy k-center against a plain reference, stopping conditions, determinism."""
from __future__ import annotations

import numpy as np
import pytest

from app.sampling.coreset import normalize_rows, select_coreset
from app.sampling.samplers.random import select_random
from app.sampling.select import target_count


def reference_k_center(points: np.ndarray, k: int, first: int, min_distance: float = -1.0):
    """The textbook greedy k-center: every pick reads every point once."""
    picks = [first]
    nearest = np.full(len(points), np.inf)
    while len(picks) < min(k, len(points)):
        nearest = np.minimum(nearest, np.linalg.norm(points - points[picks[-1]], axis=1))
        candidate = int(np.argmax(nearest))
        if min_distance >= 0 and nearest[candidate] < min_distance:
            break
        picks.append(candidate)
    return picks


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_coreset_picks_equal_the_reference(seed):
    points = normalize_rows(np.random.default_rng(seed).normal(size=(400, 16)).astype(np.float32))
    chosen = select_coreset(points, 50, seed=seed)
    assert chosen.indices == reference_k_center(points.astype(np.float64), 50, chosen.indices[0])
    assert chosen.stopped_by == "n_samples"
    assert all(a >= b - 1e-6 for a, b in zip(chosen.distances[1:], chosen.distances[2:])), \
        "k-center distances never increase"


def test_coreset_finds_every_cluster_before_a_second_point_of_any():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 8)) * 10
    points = np.concatenate([c + rng.normal(scale=0.01, size=(30, 8)) for c in centers]).astype(np.float32)
    chosen = select_coreset(points, 5, seed=3)
    assert sorted(i // 30 for i in chosen.indices) == [0, 1, 2, 3, 4]


def test_min_distance_stops_before_n_samples():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 8)) * 10
    points = np.concatenate([c + rng.normal(scale=0.01, size=(25, 8)) for c in centers]).astype(np.float32)
    chosen = select_coreset(points, 50, min_distance=1.0, seed=0)
    assert len(chosen.indices) == 4 and chosen.stopped_by == "min_distance"


def test_ties_go_to_the_lowest_index():
    points = np.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    chosen = select_coreset(points, 2, seed=0)
    first = chosen.indices[0]
    if first == 0:  # points 1, 2 and 3 all lie at distance 1: the lowest index wins
        assert chosen.indices[1] == 1


def test_duplicates_are_picked_last():
    points = np.array([[0, 0], [0, 0], [3, 0], [0, 4]], dtype=np.float32)
    chosen = select_coreset(points, 4, seed=0)
    assert set(chosen.indices[:3]) >= {2, 3}
    assert chosen.distances[-1] == 0.0


def test_target_count_counts_fractions_and_off(caplog):
    assert target_count(-1, 40) == 40
    assert target_count(10, 40) == 10
    assert target_count(0.25, 40) == 10
    assert target_count(0.29, 100) == 29
    assert target_count(0.001, 40) == 1
    assert target_count(1.0, 40) == 40
    assert target_count(100, 40) == 40
    assert "only 40 images are left" in caplog.text


def test_random_is_seeded_and_without_replacement():
    assert select_random(100, 10, seed=5) == select_random(100, 10, seed=5)
    assert select_random(100, 10, seed=5) != select_random(100, 10, seed=6)
    assert len(set(select_random(100, 100, seed=1))) == 100


def reference_near_duplicates(points: np.ndarray, threshold: float):
    kept, removed = [], []
    for i, point in enumerate(points):
        if kept:
            distances = np.linalg.norm(points[kept] - point, axis=1)
            j = int(np.argmin(distances))
            if distances[j] < threshold:
                removed.append((i, kept[j]))
                continue
        kept.append(i)
    return removed


@pytest.mark.parametrize("block", [3, 16, 1000])
def test_near_duplicates_match_the_brute_force_greedy_whatever_the_block_size(block):
    from app.sampling.near_duplicates import find_near_duplicates

    rng = np.random.default_rng(4)
    base = rng.normal(size=(40, 8)).astype(np.float32)
    copies = base[rng.integers(0, 40, size=25)] + rng.normal(scale=0.01, size=(25, 8)).astype(np.float32)
    points = np.concatenate([base, copies])[rng.permutation(65)]
    found = find_near_duplicates(points, threshold=0.1, block=block)
    assert [(i, j) for i, j, _ in found] == reference_near_duplicates(points, 0.1)
    assert len(found) >= 20
    assert all(d < 0.1 for _, _, d in found)
