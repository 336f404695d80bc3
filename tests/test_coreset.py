"""select_coreset against its definition, reference_select_coreset (textbook greedy k-center on
exact float64 distances): the same picks, the same distances to the last bit, the same stop."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from app.sampling import coreset
from app.sampling.coreset import (exact_squared_distances, normalize_rows, reference_select_coreset,
                                  select_coreset)

ROOT = Path(__file__).resolve().parents[1]


def isotropic(n, d, seed=0):
    return normalize_rows(np.random.default_rng(seed).normal(size=(n, d))).astype(np.float32)


def clustered(n, d, n_clusters, spread, seed=0):
    """Tight clusters on the unit sphere: the triangle inequality skips most centers here."""
    rng = np.random.default_rng(seed)
    centers = normalize_rows(rng.normal(size=(n_clusters, d)))
    points = centers[rng.integers(n_clusters, size=n)] + rng.normal(scale=spread / np.sqrt(d), size=(n, d))
    return normalize_rows(points).astype(np.float32)


def grid_with_copies(seed=0):
    """Small integer points, each several times: exact ties everywhere, and copies of picks."""
    rng = np.random.default_rng(seed)
    base = rng.integers(-3, 4, size=(60, 3)).astype(np.float32)
    return base[rng.integers(60, size=400)]


def assert_same(fast, slow):
    assert fast.indices == slow.indices
    assert fast.distances == slow.distances  # bit for bit: both come from exact_squared_distances
    assert fast.stopped_by == slow.stopped_by


@pytest.fixture
def small_blocks(monkeypatch):
    """Tiny blocks and batches, so that small data goes through every path: many rounds, picks
    simulated a few at a time, points brought up to date in several blocks, and the GPU's way of
    checking the stopping flag only every few steps."""
    monkeypatch.setattr(coreset, "_SIZES", coreset._Sizes(
        rows=37, centers=5, groups=3, group_points=11, candidates=16, min_candidates=8, batch=4,
        min_batch=2, max_batch=16, simulated=8, steps_per_check_cpu=3, steps_per_check_gpu=3))


DATASETS = {
    "isotropic 16-d": lambda: isotropic(2000, 16, seed=1),
    "isotropic 128-d": lambda: isotropic(1500, 128, seed=2),
    "clustered 32-d": lambda: clustered(3000, 32, n_clusters=12, spread=0.3, seed=3),
    "clustered 64-d, loose": lambda: clustered(2000, 64, n_clusters=40, spread=1.0, seed=4),
}


def slow_for(names, *slow):
    """`names` as parameters, the ones in `slow` marked for the slow tier (seconds each on two cores)."""
    return [pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in names]


@pytest.mark.parametrize("name", DATASETS)
@pytest.mark.parametrize("n_samples", slow_for([1, 2, 60, 400], 400))
def test_picks_equal_the_reference(name, n_samples):
    points = DATASETS[name]()
    assert_same(select_coreset(points, n_samples, seed=5), reference_select_coreset(points, n_samples, seed=5))


@pytest.mark.parametrize("name", slow_for(DATASETS, "isotropic 16-d", "isotropic 128-d"))
def test_picks_equal_the_reference_with_tiny_blocks(name, small_blocks):
    points = DATASETS[name]()[:800]
    assert_same(select_coreset(points, 150, seed=6), reference_select_coreset(points, 150, seed=6))


@pytest.mark.parametrize("name", slow_for(["isotropic 16-d", "clustered 32-d"], "clustered 32-d"))
def test_min_distance_stops_exactly_where_the_reference_does(name):
    points = DATASETS[name]()
    full = reference_select_coreset(points, 300, seed=2)
    # A threshold equal to pick 100's distance keeps it (the stop is strictly closer); one just above stops before it.
    at = full.distances[100]
    for min_distance in (at, np.nextafter(at, math.inf), 0.0, 10.0):
        fast = select_coreset(points, 300, min_distance=float(min_distance), seed=2)
        assert_same(fast, reference_select_coreset(points, 300, min_distance=float(min_distance), seed=2))
    assert len(select_coreset(points, 300, min_distance=at, seed=2).indices) == 101
    assert len(select_coreset(points, 300, min_distance=float(np.nextafter(at, math.inf)), seed=2).indices) == 100


@pytest.mark.parametrize("tiny", slow_for([False, True], True))
def test_exact_ties_and_copies_go_to_the_lowest_index(tiny, request):
    if tiny:
        request.getfixturevalue("small_blocks")
    points = grid_with_copies()
    for n_samples in (30, 70, 400, 500):
        fast = select_coreset(points, n_samples, seed=3)
        assert_same(fast, reference_select_coreset(points, n_samples, seed=3))
        assert len(set(fast.indices)) == len(fast.indices), "a point is picked at most once"
    everything = select_coreset(points, 500, seed=3)
    assert everything.stopped_by == "exhausted" and sorted(everything.indices) == list(range(400))
    assert everything.distances[-1] == 0.0
    assert select_coreset(points, 500, min_distance=0.5, seed=3).stopped_by == "min_distance"


@pytest.mark.parametrize("seed", slow_for([0, 1, 2, 3], 0, 2))
def test_copies_anywhere_match_the_reference(seed):
    """Each point three times, shuffled, some copies with -0.0 for 0.0 (equal values, other bits):
    the random first pick is often not the lowest copy, and the other copies come last."""
    rng = np.random.default_rng(seed)
    base = isotropic(200, 12, seed=seed)
    base[::5, 3] = 0.0
    points = base[rng.permutation(np.repeat(np.arange(200), 3))]
    zeros = np.flatnonzero(points[:, 3] == 0)[::2]
    points[zeros, 3] = -0.0
    for n_samples in (50, 200, 450, 700):
        assert_same(select_coreset(points, n_samples, seed=seed), reference_select_coreset(points, n_samples, seed=seed))
    assert select_coreset(points, 700, min_distance=0.0, seed=seed).stopped_by == "exhausted"
    assert len(select_coreset(points, 700, min_distance=1e-9, seed=seed).indices) == 200


def test_copies_are_found_by_value():
    points = np.array([[1, 2], [3, 4], [1, 2], [0, -0.0], [3, 4], [0, 0], [5, 6]], dtype=np.float32)
    assert coreset._distinct_rows(torch.as_tensor(points)).tolist() == [0, 1, 0, 3, 1, 3, 6]


def test_points_all_equal():
    points = np.ones((50, 4), np.float32)
    chosen = select_coreset(points, 10, seed=0)
    assert_same(chosen, reference_select_coreset(points, 10, seed=0))
    first = chosen.indices[0]
    assert chosen.indices[1:] == [i for i in range(50) if i != first][:9]
    assert chosen.distances[1:] == [0.0] * 9


@pytest.mark.parametrize("name", slow_for(["isotropic 16-d", "clustered 32-d"], "clustered 32-d"))
def test_pool_points_are_centers_from_the_start(name):
    points = DATASETS[name]()
    pool = DATASETS[name]()[::7] + np.float32(0.01)  # near some points, not equal to any
    fast = select_coreset(points, 200, pool=pool)
    assert_same(fast, reference_select_coreset(points, 200, pool=pool))
    # The first pick is the point farthest from the pool, not a random one.
    farthest = np.sqrt(((points[:, None, :].astype(np.float64) - pool[None].astype(np.float64)) ** 2)
                       .sum(-1)).min(1)
    assert fast.indices[0] == int(np.argmax(farthest))
    assert math.isclose(fast.distances[0], float(farthest.max()), rel_tol=1e-12)
    assert select_coreset(points, 200, pool=pool, seed=1).indices == fast.indices  # no seed involved


def test_pool_with_copies_of_points_and_min_distance(small_blocks):
    points = grid_with_copies(seed=1)
    pool = points[:120]
    for min_distance in (-1.0, 0.0, 1.0, 100.0):
        fast = select_coreset(points, 300, min_distance=min_distance, pool=pool)
        assert_same(fast, reference_select_coreset(points, 300, min_distance=min_distance, pool=pool))
    # min_distance applies to the first pick too: every point is within 100 of the pool.
    assert select_coreset(points, 300, min_distance=100.0, pool=pool).indices == []
    # An empty pool is no pool: the first pick is random again.
    assert select_coreset(points, 5, pool=np.zeros((0, 3), np.float32), seed=4).indices == \
        select_coreset(points, 5, seed=4).indices


def test_same_input_same_picks_and_the_seed_chooses_the_first():
    points = DATASETS["clustered 64-d, loose"]()
    assert select_coreset(points, 100, seed=8) == select_coreset(points, 100, seed=8)
    assert select_coreset(points, 100, seed=8).indices[0] != select_coreset(points, 100, seed=9).indices[0]


def test_exact_distances_do_not_depend_on_the_batch():
    rng = np.random.default_rng(0)
    points = torch.as_tensor(rng.normal(size=(300, 77)).astype(np.float32))
    center = points[5]
    together = exact_squared_distances(points, center)
    alone = torch.stack([exact_squared_distances(points[i:i + 1], center)[0] for i in range(300)])
    assert torch.equal(together, alone)
    pairs = exact_squared_distances(points[:150], points[150:])
    assert torch.equal(pairs, torch.stack([exact_squared_distances(points[i], points[150 + i]) for i in range(150)]))
    numpy = ((points.numpy().astype(np.float64) - center.numpy().astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(together.numpy(), numpy, rtol=1e-14)


def test_bad_input_is_refused_with_the_row():
    points = isotropic(20, 4)
    points[7, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings row 7 is not finite"):
        select_coreset(points, 5)
    with pytest.raises(ValueError, match=r"pool must have shape \(m, 4\)"):
        select_coreset(isotropic(20, 4), 5, pool=np.zeros((3, 5), np.float32))


MEMORY_SCRIPT = """
import json, resource, sys, numpy as np
from app.sampling.coreset import select_coreset
rng = np.random.default_rng(0)
points = rng.standard_normal((200_000, 256), dtype=np.float32)
for block in np.split(points, 20):  # in blocks: a whole-matrix temporary would hide the selection's peak
    block /= np.linalg.norm(block, axis=1, keepdims=True)
select_coreset(points[:1000], 10, seed=0)  # torch's own first-use memory is not the selection's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
chosen = select_coreset(points, 300, seed=0)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"picks": len(chosen.indices), "grew_kib": after - before, "points_kib": points.nbytes // 1024}))
"""


@pytest.mark.slow
def test_memory_is_the_points_plus_vectors_of_length_n():
    """200 000 × 256 float32 points (200 MB): an N×N float32 matrix would take 160 GB and a float64
    copy of the points 400 MB; the selection adds vectors of length N and blocks of bounded size
    only, less than the points themselves (100 MB measured; 650 MB with a float64 copy)."""
    run = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["picks"] == 300
    assert result["grew_kib"] < result["points_kib"], result
