"""sampler=typical: TypiClust (Hacohen, Dekel and Weinshall 2022, "Active learning on a budget"),
the published answer to "random beats coreset at tiny budgets": coreset leans to outliers, while a
small labelled set should cover the dense regions of the data with their most typical images.

The candidates (and the datapool's vectors, with a pool) are clustered by k-means
(app.sampling.kmeans) into K = budget + the number of pool vectors clusters. Clusters that hold a
pool vector are covered already; from each other cluster, largest first, the most typical
candidate is picked: typicality = 1 / the mean distance to its `typical_neighbours` nearest
neighbours inside its cluster (fewer in a smaller cluster). In a cluster larger than
TYPICALITY_SAMPLE, a seeded sample of that many of its points is measured, so the work stays
bounded. Should there be fewer uncovered clusters with candidates than the budget (k-means left
some empty), rounds over all clusters, largest first, add each one's next most typical point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from app.errors import UserError
from app.sampling.samplers import Candidates, Sampler, Selection
from app.sampling.schema import SamplerConfig

# Points of one cluster measured for typicality at most (a 2000 × 2000 distance block is 16 MiB).
TYPICALITY_SAMPLE = 2000


@dataclass
class TypicalConfig(SamplerConfig):
    # A point's typicality is 1 / its mean distance to this many nearest neighbours in its cluster
    # (TypiClust's 20).
    typical_neighbours: int = 20


def check(config) -> None:
    if config.typical_neighbours < 1:
        raise UserError(f"sampler.typical_neighbours={config.typical_neighbours} is not allowed: use an integer >= 1")


def select_typical_units(candidates: Candidates, count: int, pool, seed: int, device, config) -> Selection:
    picks = select_typical(candidates.vectors, count, pool, seed, config.typical_neighbours, device)
    return Selection(picks, None, "n_samples" if len(picks) == count else "exhausted")


def select_typical(vectors, count: int, pool, seed: int, neighbours: int, device=None) -> List[int]:
    """Up to `count` rows of `vectors`, in pick order: the most typical row of each uncovered
    cluster, largest cluster first (see the module docstring)."""
    import numpy as np

    from app.progress import Progress
    from app.sampling.kmeans import kmeans

    n = len(vectors)
    count = min(count, n)
    if count <= 0:
        return []
    n_pool = 0 if pool is None else len(pool)
    # The pool joins the clustering, as TypiClust clusters the labelled and unlabelled points together.
    points = vectors if not n_pool else np.concatenate([np.asarray(vectors, dtype=np.float32),
                                                        np.asarray(pool, dtype=np.float32)])
    k = min(count + n_pool, len(points))
    assignments = kmeans(points, k, seed, device).assignments
    candidate_clusters = assignments[:n]
    covered = np.zeros(k, dtype=bool)
    covered[assignments[n:]] = True
    sizes = np.bincount(candidate_clusters, minlength=k)
    # The members of cluster c are by_cluster[starts[c]:starts[c + 1]], in index order.
    by_cluster = np.argsort(candidate_clusters, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    largest_first = np.lexsort((np.arange(k), -sizes))
    rng = np.random.default_rng(seed)
    rankings: Dict[int, np.ndarray] = {}

    def ranking(cluster: int) -> np.ndarray:
        """The cluster's measured members, most typical first (computed once per cluster)."""
        if cluster not in rankings:
            members = by_cluster[starts[cluster]:starts[cluster + 1]]
            rankings[cluster] = most_typical_first(vectors, members, neighbours, rng)
        return rankings[cluster]

    picks: List[int] = []
    uncovered = [int(c) for c in largest_first if not covered[c] and sizes[c] > 0]
    with Progress(min(count, len(uncovered)), "select: typical points", unit="cluster") as progress:
        for cluster in uncovered[:count]:
            picks.append(int(ranking(cluster)[0]))
            progress.update(1)
    if len(picks) < count:  # empty clusters: more points from each cluster, in rounds
        picked = np.zeros(n, dtype=bool)
        picked[picks] = True
        taken = {cluster: 1 for cluster in uncovered}
        while len(picks) < count:
            before = len(picks)
            for cluster in (int(c) for c in largest_first if sizes[c] > 0):
                ranked = ranking(cluster)
                position = taken.get(cluster, 0)
                if position < len(ranked) and len(picks) < count:
                    picks.append(int(ranked[position]))
                    picked[ranked[position]] = True
                    taken[cluster] = position + 1
            if len(picks) == before:  # every measured point is picked: the rest in a seeded order
                rest = np.flatnonzero(~picked)
                picks.extend(int(i) for i in rest[rng.permutation(len(rest))][:count - len(picks)])
    return picks


def most_typical_first(vectors, members, neighbours: int, rng):
    """`members` (row indices of one cluster), or a seeded sample of TYPICALITY_SAMPLE of them,
    ordered by typicality, highest first; ties keep index order. In numpy: clusters are small, and
    torch's thread pool costs more than the work on a busy CPU (20x on 500 clusters of 20)."""
    import numpy as np

    if len(members) > TYPICALITY_SAMPLE:
        members = np.sort(rng.choice(members, TYPICALITY_SAMPLE, replace=False))
    k = min(neighbours, len(members) - 1)
    if k < 1:
        return members
    x = np.asarray(vectors[members], dtype=np.float32)
    norms = np.einsum("ij,ij->i", x, x)
    squared = np.maximum(norms[:, None] + norms[None, :] - 2.0 * (x @ x.T), 0.0)
    np.fill_diagonal(squared, np.inf)  # a point is not its own neighbour
    nearest = np.partition(squared, k - 1, axis=1)[:, :k]
    mean_distance = np.sqrt(nearest).mean(axis=1)
    # Highest typicality (1 / mean distance) first is lowest mean distance first.
    return members[np.argsort(mean_distance, kind="stable")]


SAMPLER = Sampler(name="typical", select=select_typical_units, needs_embeddings=True, schema=TypicalConfig,
                  check=check)
