"""select_coreset_on_ray against select_coreset: the points split across Ray actors give the same
picks, the same distances to the last bit and the same stop, on random data and on hostile cases
(copies across shards, a pool, ties, min_distance, more samples than points, tiny shards)."""
import math

import numpy as np
import pytest

from conftest import require_module  # noqa: E402

require_module("ray", "pip install -e '.[ray]'")
import ray  # noqa: E402

from app.executors.ray_coreset import select_coreset_on_ray  # noqa: E402
from app.sampling import coreset  # noqa: E402
from app.sampling.coreset import select_coreset  # noqa: E402
from test_coreset import clustered, grid_with_copies, isotropic  # noqa: E402  (the same test data)

# Every test here starts a local Ray (the module's fixture): the slow tier.
pytestmark = pytest.mark.slow

# Tiny blocks and batches (the actors run in other processes: they get these sizes explicitly), so
# that small data goes through many rounds, reports cut short, stale points and settled ties.
TINY = coreset._Sizes(rows=37, centers=5, groups=3, group_points=11, candidates=16, min_candidates=8, batch=4,
                      min_batch=2, max_batch=16, simulated=8, steps_per_check_cpu=3, steps_per_check_gpu=3)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def assert_same(on_ray, local):
    assert on_ray.indices == local.indices
    assert on_ray.distances == local.distances  # bit for bit: both come from exact_squared_distances
    assert on_ray.stopped_by == local.stopped_by


@pytest.mark.parametrize("actors", [2, 3])
def test_random_data_at_scale_equals_the_local_coreset(actors, tmp_path):
    points = isotropic(100_000, 64, seed=actors)
    path = tmp_path / "points.npy"
    np.save(path, points)
    on_ray = select_coreset_on_ray(path, 1000, seed=7, actors=actors)
    assert_same(on_ray, select_coreset(points, 1000, seed=7))
    stats = on_ray.stats
    assert stats.actors == actors
    assert stats.rounds < 1000 / 4, "picks are batched: far fewer rounds than picks"
    assert stats.round_trips >= stats.rounds and stats.bytes_received > 0 and stats.bytes_sent > 0


@pytest.mark.parametrize("actors, sizes", [
    (2, None), (3, TINY), pytest.param(2, TINY, marks=pytest.mark.slow), pytest.param(3, None, marks=pytest.mark.slow)])
def test_clustered_data_equals_the_local_coreset(actors, sizes):
    points = clustered(3000, 32, n_clusters=12, spread=0.3, seed=3)
    for n_samples in (2, 400):
        assert_same(select_coreset_on_ray(points, n_samples, seed=5, actors=actors, block_sizes=sizes),
                    select_coreset(points, n_samples, seed=5))


@pytest.mark.parametrize("sizes", [pytest.param(None, marks=pytest.mark.slow), TINY],
                         ids=["default sizes", "tiny sizes"])
def test_ties_and_copies_across_shards_go_to_the_lowest_index(sizes):
    points = grid_with_copies()
    for n_samples in (70, 400):
        on_ray = select_coreset_on_ray(points, n_samples, seed=3, actors=3, block_sizes=sizes)
        assert_same(on_ray, select_coreset(points, n_samples, seed=3))
        assert len(set(on_ray.indices)) == len(on_ray.indices)
    everything = select_coreset_on_ray(points, 500, seed=3, actors=2, block_sizes=sizes)
    assert_same(everything, select_coreset(points, 500, seed=3))
    assert everything.stopped_by == "exhausted" and sorted(everything.indices) == list(range(400))
    assert everything.distances[-1] == 0.0
    assert select_coreset_on_ray(points, 500, min_distance=0.5, seed=3, block_sizes=sizes).stopped_by == "min_distance"


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_a_random_first_pick_that_is_a_copy(seed):
    """Each point three times, shuffled, some with -0.0 for 0.0: the first pick is often a copy whose
    lowest twin lives in another shard."""
    rng = np.random.default_rng(seed)
    base = isotropic(200, 12, seed=seed)
    base[::5, 3] = 0.0
    points = base[rng.permutation(np.repeat(np.arange(200), 3))]
    points[np.flatnonzero(points[:, 3] == 0)[::2], 3] = -0.0
    for n_samples in (200, 700):
        assert_same(select_coreset_on_ray(points, n_samples, seed=seed, actors=3, block_sizes=TINY),
                    select_coreset(points, n_samples, seed=seed))
    assert len(select_coreset_on_ray(points, 700, min_distance=1e-9, seed=seed).indices) == 200


def test_points_all_equal():
    points = np.ones((50, 4), np.float32)
    assert_same(select_coreset_on_ray(points, 10, seed=0), select_coreset(points, 10, seed=0))


@pytest.mark.parametrize("sizes", [None, TINY], ids=["default sizes", "tiny sizes"])
def test_a_pool_gives_the_first_pick_and_counts_as_centers(sizes):
    points = clustered(2000, 16, n_clusters=8, spread=0.4, seed=4)
    pool = points[::7] + np.float32(0.01)
    on_ray = select_coreset_on_ray(points, 200, pool=pool, actors=3, block_sizes=sizes)
    assert_same(on_ray, select_coreset(points, 200, pool=pool))
    farthest = np.sqrt(((points[:, None, :].astype(np.float64) - pool[None].astype(np.float64)) ** 2).sum(-1)).min(1)
    assert on_ray.indices[0] == int(np.argmax(farthest))


def test_a_pool_with_copies_of_points_and_min_distance():
    points = grid_with_copies(seed=1)
    pool = points[:120]
    for min_distance in (0.0, 1.0, 100.0):
        assert_same(select_coreset_on_ray(points, 300, min_distance=min_distance, pool=pool, actors=2,
                                          block_sizes=TINY),
                    select_coreset(points, 300, min_distance=min_distance, pool=pool))
    assert select_coreset(points, 300, min_distance=100.0, pool=pool).indices == []  # the case is tested above


def test_min_distance_stops_exactly_where_the_local_coreset_does():
    points = isotropic(2000, 16, seed=1)
    at = select_coreset(points, 300, seed=2).distances[100]
    for min_distance, kept in ((at, 101), (float(np.nextafter(at, math.inf)), 100)):
        on_ray = select_coreset_on_ray(points, 300, min_distance=min_distance, seed=2, block_sizes=TINY)
        assert_same(on_ray, select_coreset(points, 300, min_distance=min_distance, seed=2))
        assert len(on_ray.indices) == kept


def test_more_samples_than_points_and_shards_smaller_than_a_batch():
    points = isotropic(7, 5, seed=3)
    for n_samples, actors in ((3, 2), (7, 3), (20, 4)):  # shards of one to four rows
        on_ray = select_coreset_on_ray(points, n_samples, seed=1, actors=actors)
        assert_same(on_ray, select_coreset(points, n_samples, seed=1))
    assert on_ray.stopped_by == "exhausted" and len(on_ray.indices) == 7
    assert select_coreset_on_ray(points, 0).indices == []


def test_more_actors_than_the_cluster_has_cpus_for_share_the_cpus_it_has():
    points = isotropic(300, 6, seed=4)
    assert_same(select_coreset_on_ray(points, 40, seed=2, actors=9), select_coreset(points, 40, seed=2))
    with pytest.raises(ValueError, match="num_cpus_per_actor=5 is more than the Ray cluster's 4 CPUs"):
        select_coreset_on_ray(points, 40, num_cpus_per_actor=5)


def test_bad_rows_are_refused_with_their_global_index(tmp_path):
    points = isotropic(40, 4)
    points[31, 2] = np.nan
    with pytest.raises(ValueError, match="embeddings row 31 is not finite"):
        select_coreset_on_ray(points, 5, actors=2)
    with pytest.raises(ValueError, match=r"pool must have shape \(m, 4\)"):
        select_coreset_on_ray(isotropic(20, 4), 5, pool=np.zeros((3, 5), np.float32))


def test_the_temporary_copy_of_an_array_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    select_coreset_on_ray(isotropic(100, 4), 5)
    assert list(tmp_path.iterdir()) == []
